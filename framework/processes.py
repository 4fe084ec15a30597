"""The one answer to "am I the main process?" for the whole program, asked before and after Accelerate exists.

torchrun and `accelerate launch` give every process its RANK (and WORLD_SIZE) before it starts; rank 0 is the main
process, as Accelerate's `is_main_process` says once it is set up. Without them there is one process: the main one.
"""
from __future__ import annotations

import os


def main_process() -> bool:
    """Whether this process is the one that writes files, logs and reports."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("RANK", "0")) == 0
    except ValueError:  # a malformed launcher variable: Accelerate refuses it when it starts; speak meanwhile
        return True

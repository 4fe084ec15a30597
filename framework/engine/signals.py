"""SIGINT / SIGTERM as a flag the training loop checks between optimizer steps."""
from __future__ import annotations

import signal
import threading

import torch


class StopSignal:
    """SIGINT / SIGTERM set a flag instead of killing the loop; training stops after the current optimizer step,
    saves a resumable checkpoint and exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False

    def should_stop(self, accelerator) -> bool:
        """True on every process as soon as any process received a signal."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            t = torch.tensor([float(flag)], device=accelerator.device)
            flag = bool(accelerator.reduce(t, reduction="sum").item() > 0)
        return flag

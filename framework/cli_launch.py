"""`recipe run --processes N`: N copies of the command under torchrun, with torchrun's own traceback of a failed
process left out (the process has already printed what went wrong and the fix)."""
from __future__ import annotations

import sys


def launch(processes: int, args: list[str]) -> int:
    """Start `processes` copies of `recipe run ARGS` with torchrun (torch.distributed.run): data parallel."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "framework.cli", "run"] + args
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        failed = _without_launcher_traceback(proc.stderr, sys.stderr)
        code = proc.wait()
    return failed if failed and code else code  # the failed process's own code (2: its input), not torchrun's 1


def _without_launcher_traceback(lines, out) -> int:
    """Pass the processes' stderr through, except torchrun's own report of a failed process (its log line, a
    ChildFailedError traceback and the summary table): the process already printed what went wrong and the fix.
    Returns the failed process's exit code (0: none failed)."""
    import re

    block: list[str] = []
    failed = 0
    for line in lines:
        found = re.search(r"\] failed \(exitcode: (-?\d+)\)", line)
        if found:
            failed = failed or int(found.group(1))
            continue
        if block or line.startswith("Traceback (most recent call last):"):
            block.append(line)
            if line[:1].isspace() or line.startswith("Traceback"):
                continue
            if "ChildFailedError" in line:
                for _ in lines:  # torchrun's summary of the failure follows: drop it
                    pass
                return failed
            out.writelines(block)
            block = []
            continue
        out.write(line)
        out.flush()
    out.writelines(block)
    return failed

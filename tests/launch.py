"""Launching real 2-process CPU jobs with torchrun (gloo) from a test."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun(*target: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node processes *target`` (a script and its arguments,
    or ``-m module ...``), one thread per process; its stdout and stderr are captured."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(processes), *target]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

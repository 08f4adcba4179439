"""System metadata recorded with every result, so a number can be traced to the machine that made it."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def _static_info() -> dict:
    import lightning
    import transformers

    cuda = torch.cuda.is_available()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu_driver = None
    if cuda:
        try:
            gpu_driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            gpu_driver = None
    return {
        "git_sha": _git_sha(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_driver": gpu_driver,
        "cuda": torch.version.cuda if cuda else None,
        "cpu": cpu,
    }


def system_info(device: torch.device | str) -> dict:
    return {
        **_static_info(),
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

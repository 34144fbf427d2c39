"""Which machine results come from and where they go, for every command that writes results (``kdkernels bench``,
``kdkernels demo``): the GPU name or the CPU model and usable cores, as a directory name, under
``benchmarks/results`` of the source checkout (else of the working directory)."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def sanitize(name: str) -> str:
    """A device name usable as a directory name: runs of characters outside ``[A-Za-z0-9._-]`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "unknown-device"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable device name: the GPU name, or the CPU model with the number of usable cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} {usable_cores()} cores"


def default_results_root() -> Path:
    """``benchmarks/results`` of the source checkout when kdkernels runs from one (editable install), else of cwd."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"

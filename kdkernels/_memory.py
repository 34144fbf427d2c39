"""Peak extra memory of one fwd+bwd step: on CPU the RSS delta (VmRSS before, VmHWM after, VmHWM reset through
``/proc/self/clear_refs``, after gc + malloc_trim); on CUDA ``max_memory_allocated`` after a peak reset."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable

import torch

CPU_MEMORY_METHOD = ("peak RSS delta of one fwd+bwd: VmRSS before, VmHWM after, VmHWM reset by writing 5 to "
                     "/proc/self/clear_refs (after gc + malloc_trim); includes the student gradient itself (U)")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats() minus memory_allocated() "
                      "before one fwd+bwd (inputs excluded); includes the student gradient itself (U)")

_MALLOC_TRIM = None


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so that the RSS baseline does not hide reused memory."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _MALLOC_TRIM = libc.malloc_trim
        except (OSError, AttributeError):
            pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_supported() -> tuple[bool, str]:
    if _proc_status_kb("VmRSS") is None or _proc_status_kb("VmHWM") is None:
        return False, "/proc/self/status has no VmRSS/VmHWM (not Linux?)"
    if not _reset_hwm():
        return False, "cannot write /proc/self/clear_refs to reset VmHWM"
    return True, CPU_MEMORY_METHOD


def measure_peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    """Peak extra memory (MiB) of one call of ``step``; None where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    _malloc_trim()
    before = _proc_status_kb("VmRSS")
    if before is None or not _reset_hwm():
        return None
    step()
    peak = _proc_status_kb("VmHWM")
    return None if peak is None else (peak - before) / 1024

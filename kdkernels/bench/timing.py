"""Per-call times of one fwd+bwd step: ``time.perf_counter`` on CPU (warm-up, then a rep count from a target
time, gc disabled), ``triton.testing.do_bench`` or CUDA events on GPU (L2 flushed); linear-interpolation quantiles."""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)
TIMING_ROUNDS = 3  # CPU: timed calls are split into rounds that alternate between implementations


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, as triton.testing uses)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_cpu(step: Callable[[], None], reset: Callable[[], None], *, target_s: float, warmup_s: float,
             min_reps: int, max_reps: int) -> tuple[list[float], int]:
    """Per-call wall times (ms) with ``time.perf_counter``; returns (times, number of warm-up calls)."""
    warm = []
    start = time.perf_counter()
    while not warm or (time.perf_counter() - start < warmup_s and len(warm) < 50):
        reset()
        t0 = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t0)
    estimate = statistics.median(warm[1:] if len(warm) > 1 else warm)
    reps = max(min_reps, min(max_reps, int(target_s / max(estimate, 1e-7))))
    # A machine that gets busier after the warm-up must not stretch the run: stop after 4x the target time
    # (once min_reps calls are done).
    deadline = time.perf_counter() + 4 * target_s
    times = []
    gc_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            reset()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            times.append((t1 - t0) * 1e3)
            if t1 > deadline and len(times) >= min_reps:
                break
    finally:
        if gc_enabled:
            gc.enable()
    return times, len(warm)


def time_cuda(step: Callable[[], None], student: torch.Tensor, *, estimate_ms: float, warmup_ms: float,
              rep_ms: float, min_reps: int) -> tuple[list[float], str]:
    """Per-call times (ms): ``triton.testing.do_bench`` (L2 flushed before each call) or CUDA events."""
    rep_ms = max(rep_ms, estimate_ms * min_reps * 1.5)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            times = do_bench(step, warmup=warmup_ms, rep=rep_ms, grad_to_none=[student], return_mode="all")
            if isinstance(times, (list, tuple)):
                return [float(t) for t in times], "triton.testing.do_bench(return_mode='all')"
        except (TypeError, AssertionError, ValueError):  # an older triton without return_mode="all": quantiles only
            q = do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES), grad_to_none=[student])
            return [float(x) for x in q], "triton.testing.do_bench(quantiles=[0.5,0.2,0.8]) (no raw times)"
    cache = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=student.device)
    n_warm = max(1, int(warmup_ms / max(estimate_ms, 1e-3)))
    n_rep = max(min_reps, int(rep_ms / max(estimate_ms, 1e-3)))
    for _ in range(n_warm):
        student.grad = None
        step()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        student.grad = None
        cache.zero_()
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize(student.device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], "torch.cuda.Event (L2 flushed before each call)"

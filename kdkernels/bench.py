"""``kdkernels bench``: time and peak memory of the fused KD loss against PyTorch eager and ``torch.compile``.

For every shape ``[N, V]`` and dtype it runs forward + backward (student requires grad, teacher detached,
``T = 4``) of

* ``kdkernels:auto`` (``kdkernels.kd_loss(..., backend="auto")``; the backend it resolved to is recorded) and
  ``kdkernels:<name>`` for every other available non-reference backend on the device (e.g. ``triton`` on a GPU),
* ``eager``: ``kdkernels.reference.softmax_kl.eager_hinton_kd`` (``F.kl_div(log_softmax(s/T), log_softmax(t/T),
  log_target=True, reduction="batchmean") * T**2``, in the input dtype, as users write it),
* ``compile``: ``torch.compile(eager_hinton_kd, dynamic=False)``; compilation is done (and timed separately) before
  any measurement,

and reports the median time with p20/p80, the peak extra memory of one call, the speed-up vs eager and vs compile,
and the achieved bandwidth against the bytes-moved floor of a two-pass fused kernel, **5U** with
``U = N·V·itemsize`` (read the student and teacher logits twice, write the gradient once; the absolute floor,
row resident on chip, is 3U).

Results go to ``benchmarks/results/<device-name>/kd_loss.{json,md,png}``; see ``benchmarks/README.md``.

    kdkernels bench                         # default shapes, fp32 + bf16
    kdkernels bench --quick                 # CI smoke test (< 30 s on CPU), writes to a temp dir
    python -m kdkernels.bench --shapes 1024x1000 --dtypes fp32 --no-compile
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import kdkernels
from kdkernels import backends as _backends
from kdkernels.reference.softmax_kl import eager_hinton_kd

SCHEMA_VERSION = 1
TEMPERATURE = 4.0
DEFAULT_SHAPES = ((256, 100), (1024, 1000), (4096, 32000))
GPU_EXTRA_SHAPES = ((8192, 128256),)
QUICK_SHAPES = ((256, 100), (1024, 1000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
QUANTILES = (0.5, 0.2, 0.8)
FLOOR_NOTE = ("GB/s = 5U / median time, U = N*V*itemsize: the fwd+bwd bytes-moved floor of a two-pass fused kernel "
              "(read student and teacher twice, write the gradient once); the absolute floor (row kept on chip) is 3U.")
CPU_MEMORY_METHOD = ("peak RSS delta of one fwd+bwd: VmRSS before, VmHWM after, VmHWM reset by writing 5 to "
                     "/proc/self/clear_refs (after gc + malloc_trim); includes the student gradient itself (U)")
CUDA_MEMORY_METHOD = ("torch.cuda.max_memory_allocated() after reset_peak_memory_stats() minus memory_allocated() "
                      "before one fwd+bwd (inputs excluded); includes the student gradient itself (U)")
IMPL_ORDER = ("eager", "compile")  # then the kdkernels:* rows


# ----------------------------------------------------------------------------------------------- device naming

def sanitize(name: str) -> str:
    """A device name usable as a directory name: runs of characters outside ``[A-Za-z0-9._-]`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "unknown-device"


def _usable_cores() -> int:
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
    return f"{cpu_model()} {_usable_cores()} cores"


def default_results_root() -> Path:
    """``benchmarks/results`` of the source checkout when kdkernels runs from one (editable install), else of cwd."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


# ------------------------------------------------------------------------------------------------ statistics

def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default, as triton.testing uses)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------- peak memory

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


# ------------------------------------------------------------------------------------------------- timing

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


# ------------------------------------------------------------------------------------------- implementations

def kdkernels_impls(device: torch.device, requested: list[str] | None, sample: torch.Tensor) -> list[tuple[str, str]]:
    """(impl id, backend argument) for the kdkernels rows: auto plus every other available non-reference backend
    that can run tensors on ``device``, or exactly ``requested``."""
    if requested:
        return [(f"kdkernels:{b}", b) for b in requested]
    resolved = _backends.select_backend("auto", sample, sample)
    impls = [("kdkernels:auto", "auto")]
    for name in _backends.BACKENDS:
        if name in ("reference", resolved) or (name == "triton" and device.type != "cuda"):
            continue  # triton on CPU tensors is the interpreter (tests only): run it only when asked for
        if not _backends.unsupported_reasons(name, sample, sample):
            impls.append((f"kdkernels:{name}", name))
    return impls


def make_loss_fn(impl: str, backend: str | None, temperature: float, compiled: Callable | None) -> Callable:
    if impl == "eager":
        return lambda s, t: eager_hinton_kd(s, t, temperature)
    if impl == "compile":
        return lambda s, t: compiled(s, t, temperature)
    return lambda s, t: kdkernels.kd_loss(s, t, temperature, backend=backend)


def make_inputs(n: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = (torch.randn(n, v, device=device, generator=gen) * 2.0).to(dtype).requires_grad_(True)
    teacher = (torch.randn(n, v, device=device, generator=gen) * 3.0).to(dtype)
    return student, teacher


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _resolved_backend(backend: str, student: torch.Tensor, teacher: torch.Tensor) -> str | None:
    try:
        return _backends.select_backend(backend, student, teacher)
    except Exception:  # noqa: BLE001  (the error shows up again when the row runs)
        return None


def bench_case(n: int, v: int, dtype_name: str, device: torch.device, cfg: argparse.Namespace) -> list[dict]:
    """All implementations for one (shape, dtype): a list of measurement records."""
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    u = n * v * itemsize
    student, teacher = make_inputs(n, v, dtype, device)

    impls: list[tuple[str, str | None]] = [("eager", None)]
    if not cfg.no_compile:
        impls.append(("compile", None))
    impls += kdkernels_impls(device, cfg.backends, student.detach())

    ref_loss, ref_grad = None, None
    records = []
    for impl, backend in impls:
        rec = {
            "shape": [n, v], "N": n, "V": v, "dtype": dtype_name, "impl": impl,
            "backend": _resolved_backend(backend, student, teacher) if backend else None,
            "temperature": cfg.temperature, "status": "ok", "error": None,
            "bytes_U": u, "bytes_floor_5U": 5 * u, "bytes_floor_3U": 3 * u,
        }
        print(f"  {n}x{v} {dtype_name:>4} {impl:<18}", end=" ", flush=True)
        wall0 = time.perf_counter()
        try:
            compiled = None
            if impl == "compile":
                torch._dynamo.reset()  # one compiled graph per (shape, dtype); keeps clear of the recompile limit
                compiled = torch.compile(eager_hinton_kd, dynamic=False)
            fn = make_loss_fn(impl, backend, cfg.temperature, compiled)

            def step(fn=fn):
                fn(student, teacher).backward()

            def reset():
                student.grad = None

            # 1. first call: compiles (torch.compile), checks the result against eager, estimates the cost
            reset()
            _sync(device)
            t0 = time.perf_counter()
            loss = fn(student, teacher)
            loss.backward()
            _sync(device)
            first_s = time.perf_counter() - t0
            if impl == "compile":
                rec["compile_s"] = first_s
            loss_value = float(loss.detach().float())
            rec["loss"] = loss_value
            rec["finite"] = bool(math.isfinite(loss_value) and torch.isfinite(student.grad).all().item())
            if impl == "eager":
                ref_loss, ref_grad = loss_value, student.grad.detach().clone()
            elif ref_grad is not None:
                rec["loss_abs_diff_vs_eager"] = abs(loss_value - ref_loss)
                rec["grad_max_abs_diff_vs_eager"] = float((student.grad.float() - ref_grad.float()).abs().max())
                rec["grad_max_abs_eager"] = float(ref_grad.float().abs().max())
            del loss
            reset()

            # 2. peak memory of one call (after the first, so that one-time costs are excluded)
            rec["peak_extra_mb"] = measure_peak_mb(step, device) if cfg.memory else None
            reset()

            # 3. timing
            if device.type == "cuda":
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                estimate_ms = (time.perf_counter() - t0) * 1e3
                reset()
                times, method = time_cuda(step, student, estimate_ms=estimate_ms, warmup_ms=cfg.warmup_ms,
                                          rep_ms=cfg.rep_ms, min_reps=cfg.min_reps)
                rec["timing_method"] = method
                rec["warmup_calls"] = None
            else:
                times, n_warm = time_cpu(step, reset, target_s=cfg.target_time, warmup_s=cfg.warmup_time,
                                         min_reps=cfg.min_reps, max_reps=cfg.max_reps)
                rec["timing_method"] = "time.perf_counter around one fwd+bwd call"
                rec["warmup_calls"] = n_warm
            reset()
            raw = "no raw times" not in rec["timing_method"]
            rec["times_ms"] = times if raw else None
            rec["reps"] = len(times) if raw else None
            if raw:
                rec["median_ms"], rec["p20_ms"], rec["p80_ms"] = (quantile(times, q) for q in QUANTILES)
                rec["mean_ms"], rec["min_ms"], rec["max_ms"] = statistics.fmean(times), min(times), max(times)
            else:
                rec["median_ms"], rec["p20_ms"], rec["p80_ms"] = times
            rec["gbps_5U"] = 5 * u / (rec["median_ms"] * 1e-3) / 1e9
            rec["gbps_3U"] = 3 * u / (rec["median_ms"] * 1e-3) / 1e9
            if cfg.peak_gbps:
                rec["pct_of_3U_floor"] = 100.0 * (3 * u / (cfg.peak_gbps * 1e9) * 1e3) / rec["median_ms"]
            print(f"median {rec['median_ms']:10.3f} ms  p20 {rec['p20_ms']:10.3f}  p80 {rec['p80_ms']:10.3f}  "
                  f"reps {rec['reps']}  peak {_fmt(rec['peak_extra_mb'], '.1f')} MB  "
                  f"({time.perf_counter() - wall0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001  (a failing implementation is recorded, the run goes on)
            rec["status"] = "error"
            rec["error"] = _short_error(exc)
            student.grad = None
            print(f"ERROR {rec['error'].splitlines()[0][:200]}", flush=True)
        finally:
            if impl == "compile":
                torch._dynamo.reset()
        records.append(rec)

    _check_accuracy(records)
    _add_speedups(records)
    del student, teacher, ref_grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def _check_accuracy(records: list[dict]) -> None:
    """Flag rows whose result is not finite or (fp32) differs from eager by more than a loose tolerance."""
    for rec in records:
        if rec["status"] != "ok":
            continue
        warning = None
        if not rec.get("finite", True):
            warning = "non-finite loss or gradient"
        elif rec["dtype"] in ("fp32", "fp64") and "grad_max_abs_diff_vs_eager" in rec:
            scale = max(rec["grad_max_abs_eager"], 1e-30)
            if (rec["loss_abs_diff_vs_eager"] > 1e-4 * max(1.0, abs(rec["loss"]))
                    or rec["grad_max_abs_diff_vs_eager"] > 1e-3 * scale):
                warning = (f"differs from eager: |dloss|={rec['loss_abs_diff_vs_eager']:.3g}, "
                           f"max|dgrad|={rec['grad_max_abs_diff_vs_eager']:.3g} (max|grad|={scale:.3g})")
        rec["accuracy_warning"] = warning
        if warning:
            print(f"  WARNING {rec['N']}x{rec['V']} {rec['dtype']} {rec['impl']}: {warning}", flush=True)


def _add_speedups(records: list[dict]) -> None:
    medians = {r["impl"]: r.get("median_ms") for r in records if r["status"] == "ok"}
    for rec in records:
        med = rec.get("median_ms")
        for base, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
            ref = medians.get(base)
            rec[key] = ref / med if (med and ref) else None


# ---------------------------------------------------------------------------------------------------- output

def _fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _impl_label(rec: dict) -> str:
    if rec["impl"] == "kdkernels:auto" and rec.get("backend"):
        return f"kdkernels:auto ({rec['backend']})"
    return rec["impl"]


def markdown_table(meta: dict, records: list[dict]) -> str:
    show_pct = any(r.get("pct_of_3U_floor") is not None for r in records)
    lines = [
        f"# kd_loss forward+backward: {meta['device']}",
        "",
        f"torch {meta['torch_version']}, triton {meta['triton_version'] or '-'}, kdkernels {meta['kdkernels_version']}"
        f", {meta['threads']} threads, T = {meta['temperature']}, {meta['date_utc']}",
        "",
        f"Timing: {meta['timing']}. Memory: {meta['memory_method']}.",
        "",
        FLOOR_NOTE,
        "",
    ]
    busy = [x[0] for x in (meta.get("loadavg_start"), meta.get("loadavg_end")) if x]
    if busy and max(busy) > meta.get("usable_cores", 1):
        lines += [f"**Busy machine**: 1-minute load average {', '.join(f'{b:.1f}' for b in busy)} (start, end) on "
                  f"{meta.get('usable_cores')} cores; multi-threaded CPU timings may be unreliable (compare p20 "
                  "with p80, or re-run with --threads 1).", ""]
    header = ["shape", "dtype", "impl", "median ms", "p20 ms", "p80 ms", "reps", "peak extra MB",
              "vs eager", "vs compile", "GB/s (5U floor)"]
    if show_pct:
        header.append("% of 3U floor")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for r in records:
        shape = f"{r['N']}x{r['V']}"
        if r["status"] != "ok":
            err = r["error"].splitlines()[0].replace("|", "/")[:120]
            cells = [shape, r["dtype"], _impl_label(r), f"error: {err}"] + [""] * (len(header) - 4)
        else:
            cells = [shape, r["dtype"], _impl_label(r), _fmt(r["median_ms"], ".3f"), _fmt(r["p20_ms"], ".3f"),
                     _fmt(r["p80_ms"], ".3f"), _fmt(r["reps"], "d"), _fmt(r["peak_extra_mb"], ".1f"),
                     _fmt(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] else ""),
                     _fmt(r["speedup_vs_compile"], ".2f") + ("x" if r["speedup_vs_compile"] else ""),
                     _fmt(r["gbps_5U"], ".1f")]
            if show_pct:
                cells.append(_fmt(r.get("pct_of_3U_floor"), ".0f"))
            if r.get("accuracy_warning"):
                cells[2] += " (!)"
        lines.append("| " + " | ".join(cells) + " |")
    warnings = [r for r in records if r.get("accuracy_warning")]
    if warnings:
        lines += ["", "(!) accuracy warnings:"]
        lines += [f"- {r['N']}x{r['V']} {r['dtype']} {r['impl']}: {r['accuracy_warning']}" for r in warnings]
    compiles = [r for r in records if r["impl"] == "compile" and r.get("compile_s") is not None]
    if compiles:
        lines += ["", "torch.compile time (first call, excluded above): " + ", ".join(
            f"{r['N']}x{r['V']} {r['dtype']} {r['compile_s']:.1f} s" for r in compiles)]
    return "\n".join(lines) + "\n"


def to_json(obj) -> str:
    """Indented JSON with lists of numbers (shapes, per-rep times) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*(-?[0-9][-+0-9.eE]*(?:,\s*-?[0-9][-+0-9.eE]*)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def plot(meta: dict, records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    shapes = list(dict.fromkeys((r["N"], r["V"]) for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    panel_width = max(5.0, 0.35 * len(shapes) * len(impls) + 1.5)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(panel_width * len(dtypes), 4.8), squeeze=False)
    width = 0.8 / max(1, len(impls))
    for ax, dtype in zip(axes[0], dtypes):
        for j, impl in enumerate(impls):
            xs, ys, lo, hi, tops, labels = [], [], [], [], [], []
            for i, shape in enumerate(shapes):
                rec = next((r for r in records if r["dtype"] == dtype and r["impl"] == impl
                            and (r["N"], r["V"]) == shape and r["status"] == "ok"), None)
                if rec is None:
                    continue
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(rec["median_ms"])
                lo.append(rec["median_ms"] - rec["p20_ms"])
                hi.append(rec["p80_ms"] - rec["median_ms"])
                tops.append(max(rec["p80_ms"], rec["median_ms"]))
                s = rec.get("speedup_vs_eager")
                labels.append(f"{s:.1f}x" if (s and impl.startswith("kdkernels")) else "")
            if not xs:
                continue
            label = impl
            backend = next((r.get("backend") for r in records if r["impl"] == impl and r.get("backend")), None)
            if impl == "kdkernels:auto" and backend:
                label = f"{impl} ({backend})"
            bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label)
            for bar, top, text in zip(bars, tops, labels):
                if text:
                    ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{n}x{v}" for n, v in shapes])
        ax.set_xlabel("[N, V]")
        ax.set_ylabel("fwd+bwd median time (ms), bars p20-p80")
        ax.set_title(dtype)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"kd_loss fwd+bwd, T={meta['temperature']}: {meta['device']} (torch {meta['torch_version']})"
                 "\nlabels: speed-up vs eager", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metadata(device: torch.device, cfg: argparse.Namespace, argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        build = kdkernels.build_info()
    except Exception as exc:  # noqa: BLE001
        build = {"error": _short_error(exc)}
    name = device_name(device)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "kd_loss forward+backward",
        "device": name,
        "device_dir": sanitize(name),
        "device_type": device.type,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "kdkernels_version": kdkernels.__version__,
        "build_info": build,
        "available_backends": {k: {"available": s.available, "reason": s.reason}
                               for k, s in kdkernels.available_backends().items()},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "temperature": cfg.temperature,
        "quantiles": list(QUANTILES),
        "bytes_floor": FLOOR_NOTE,
        "command": "kdkernels bench " + " ".join(argv),
    }
    if device.type == "cuda":
        meta["cuda_version"] = torch.version.cuda
        meta["timing"] = (f"triton.testing.do_bench (warmup {cfg.warmup_ms} ms, rep >= {cfg.rep_ms} ms, L2 flushed, "
                          "grad_to_none=[student]) or CUDA events")
        meta["memory_method"] = CUDA_MEMORY_METHOD if cfg.memory else "disabled"
    else:
        meta["cpu_model"] = cpu_model()
        meta["usable_cores"] = _usable_cores()
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        meta["timing"] = (f"time.perf_counter per fwd+bwd call, warm-up >= {cfg.warmup_time} s, reps = "
                          f"{cfg.target_time} s / estimate clamped to [{cfg.min_reps}, {cfg.max_reps}] (stopping after "
                          f"{4 * cfg.target_time:g} s once {cfg.min_reps} are done), "
                          "student.grad = None between calls, gc disabled")
        supported, why = cpu_peak_supported()
        meta["memory_method"] = (why if supported else f"unavailable: {why}") if cfg.memory else "disabled"
        if not supported:
            cfg.memory = False
        try:
            meta["loadavg_start"] = list(os.getloadavg())
        except OSError:
            pass
    return meta


# ------------------------------------------------------------------------------------------------------ CLI

def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\s*[x*,]\s*(\d+)", item)
        if not m:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not NxV (e.g. 1024x1000)")
        shapes.append((int(m.group(1)), int(m.group(2))))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def parse_dtypes(text: str) -> list[str]:
    names = [d.strip().lower() for d in text.split(",") if d.strip()]
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
               "float64": "fp64", "double": "fp64"}
    names = [aliases.get(d, d) for d in names]
    bad = [d for d in names if d not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {bad}; choose from {', '.join(DTYPES)}")
    return names


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b != "auto" and b not in _backends.BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown backend(s) {bad}; choose from auto, {', '.join(_backends.BACKENDS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdkernels bench",
        description="Time forward+backward of kdkernels.kd_loss against PyTorch eager and torch.compile; print a "
                    "markdown table and write kd_loss.json/.md/.png under benchmarks/results/<device>/.",
        epilog=FLOOR_NOTE)
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated NxV list (default: 256x100,1024x1000,4096x32000; plus 8192x128256 on GPU)")
    p.add_argument("--dtypes", type=parse_dtypes, default=None, help="comma-separated, of fp32,bf16,fp16,fp64 "
                                                                     "(default: fp32,bf16; --quick: fp32)")
    p.add_argument("--backends", type=parse_backends, default=None,
                   help="kdkernels backends to run, e.g. auto,triton (default: auto plus every other available "
                        "non-reference backend of the device)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--no-plot", action="store_true", help="do not write kd_loss.png")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke test: small shapes, fp32, few reps; writes to a temporary directory unless --out")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: benchmarks/results/<device>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto = cuda when available, else cpu")
    p.add_argument("--temperature", type=float, default=TEMPERATURE)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--target-time", type=float, default=None,
                   help="CPU: seconds of timed calls per (shape, dtype, impl) (default 2.0; --quick 0.05)")
    p.add_argument("--warmup-time", type=float, default=None, help="CPU: warm-up seconds (default 0.5; --quick 0.02)")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=None, help="CPU: (default 1000; --quick 20)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=None, help="GPU: do_bench rep (ms) (default 200; --quick 20)")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device memory bandwidth (GB/s); adds a '%% of 3U floor' column (floor time / measured time)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = build_parser().parse_args(argv)
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("kdkernels bench: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quick = cfg.quick
    shapes = cfg.shapes or (list(QUICK_SHAPES) if quick else
                            list(DEFAULT_SHAPES) + (list(GPU_EXTRA_SHAPES) if device.type == "cuda" else []))
    dtypes = cfg.dtypes or (["fp32"] if quick else ["fp32", "bf16"])
    cfg.target_time = cfg.target_time if cfg.target_time is not None else (0.05 if quick else 2.0)
    cfg.warmup_time = cfg.warmup_time if cfg.warmup_time is not None else (0.02 if quick else 0.5)
    cfg.max_reps = cfg.max_reps if cfg.max_reps is not None else (20 if quick else 1000)
    cfg.rep_ms = cfg.rep_ms if cfg.rep_ms is not None else (20.0 if quick else 200.0)
    cfg.min_reps = max(1, cfg.min_reps)

    meta = metadata(device, cfg, argv)
    if cfg.out is not None:
        out = cfg.out
    elif quick:
        out = Path(tempfile.mkdtemp(prefix="kdkernels-bench-"))
    else:
        out = default_results_root() / meta["device_dir"]
    meta["shapes"] = [list(s) for s in shapes]
    meta["dtypes"] = dtypes
    meta["quick"] = quick

    print(f"kdkernels bench on {meta['device']} ({meta['threads']} threads), torch {meta['torch_version']}, "
          f"kdkernels {meta['kdkernels_version']}; shapes {', '.join(f'{n}x{v}' for n, v in shapes)}; "
          f"dtypes {', '.join(dtypes)}", flush=True)
    started = time.perf_counter()
    records = []
    for n, v in shapes:
        for dtype_name in dtypes:
            records += bench_case(n, v, dtype_name, device, cfg)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    if device.type == "cpu":
        try:
            meta["loadavg_end"] = list(os.getloadavg())
        except OSError:
            pass

    table = markdown_table(meta, records)
    print()
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_loss.json").write_text(to_json({"metadata": meta, "records": records}))
    (out / "kd_loss.md").write_text(table)
    written = ["kd_loss.json", "kd_loss.md"]
    if not cfg.no_plot:
        try:
            plot(meta, records, out / "kd_loss.png")
            written.append("kd_loss.png")
        except Exception as exc:  # noqa: BLE001  (no matplotlib: the numbers are still written)
            print(f"kdkernels bench: no plot ({_short_error(exc)})", file=sys.stderr)
    print(f"wrote {', '.join(str(out / w) for w in written)} ({meta['wall_s']} s)")
    failed = [r for r in records if r["status"] != "ok" and r["impl"].startswith("kdkernels")]
    bad = [r for r in records if r.get("accuracy_warning") and r["impl"].startswith("kdkernels")]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""One (shape, dtype) case: for every implementation a first call (compile, result check against eager), peak
memory, then timing, as one record each; then the accuracy flags and the speed-ups vs eager and vs compile."""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch

from kdkernels.bench.impls import (DTYPES, benched_loss, kdkernels_impls, make_inputs, make_loss_fn, resolved_backend,
                                   with_state)
from kdkernels._memory import measure_peak_mb
from kdkernels.bench.report import fmt, short_error
from kdkernels.bench.timing import QUANTILES, TIMING_ROUNDS, quantile, time_cpu, time_cuda


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(n: int, v: int, dtype_name: str, device: torch.device, cfg: argparse.Namespace) -> list[dict]:
    """All implementations for one (shape, dtype): a list of measurement records.

    Each implementation first runs once (compiling, checked against eager) and has its peak memory measured. On CPU
    the timed calls then alternate between implementations in TIMING_ROUNDS rounds, so that a slowdown of the
    shared machine lasting a few seconds falls on all of them rather than skewing one ratio."""
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    u = n * v * itemsize
    benched = benched_loss(cfg.loss, cfg.divergence, cfg.beta)
    if benched.inputs is None:
        student, teacher = make_inputs(n, v, dtype, device)
    else:
        student, teacher, state = benched.inputs(n, v, dtype, device)
        benched = with_state(benched, state)
    impls: list[tuple[str, str | None]] = [("eager", None)]
    if not cfg.no_compile:
        impls.append(("compile", None))
    impls += kdkernels_impls(device, cfg.backends, student.detach())

    def reset():
        student.grad = None

    ref_loss, ref_grad = None, None
    records, steps = [], {}
    torch._dynamo.reset()  # one compiled graph per (shape, dtype); keeps clear of the recompile limit
    for impl, backend in impls:
        rec = {
            "shape": [n, v], "N": n, "V": v, "dtype": dtype_name, "impl": impl,
            "backend": resolved_backend(backend, student, teacher) if backend else None,
            "temperature": cfg.temperature, "status": "ok", "error": None,
            "bytes_U": u, "bytes_floor_5U": 5 * u, "bytes_floor_3U": 3 * u,
        }
        records.append(rec)
        try:
            compiled = torch.compile(benched.eager, dynamic=False) if impl == "compile" else None
            fn = make_loss_fn(impl, backend, cfg.temperature, compiled, benched)

            def step(fn=fn):
                fn(student, teacher).backward()

            # 1. first call: compiles (torch.compile), checks the result against eager
            reset()
            _sync(device)
            t0 = time.perf_counter()
            loss = fn(student, teacher)
            loss.backward()
            _sync(device)
            if impl == "compile":
                rec["compile_s"] = time.perf_counter() - t0
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
            steps[impl] = step
        except Exception as exc:  # noqa: BLE001  (a failing implementation is recorded, the run goes on)
            _record_error(rec, exc)
            reset()

    # 3. timing
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    started = {impl: time.perf_counter() for impl in steps}
    rounds = 1 if device.type == "cuda" else TIMING_ROUNDS
    for round_index in range(rounds):
        for impl, step in list(steps.items()):
            rec = next(r for r in records if r["impl"] == impl)
            try:
                if device.type == "cuda":
                    _sync(device)
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    estimate_ms = (time.perf_counter() - t0) * 1e3
                    reset()
                    times[impl], rec["timing_method"] = time_cuda(
                        step, student, estimate_ms=estimate_ms, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms,
                        min_reps=cfg.min_reps)
                    rec["warmup_calls"] = None
                else:
                    round_times, n_warm = time_cpu(
                        step, reset, target_s=cfg.target_time / rounds,
                        warmup_s=cfg.warmup_time if round_index == 0 else 0.0,
                        min_reps=math.ceil(cfg.min_reps / rounds), max_reps=math.ceil(cfg.max_reps / rounds))
                    times[impl] += round_times
                    rec["timing_method"] = (f"time.perf_counter around one fwd+bwd call, in {rounds} rounds "
                                            "alternating between implementations")
                    rec["warmup_calls"] = rec.get("warmup_calls", 0) + n_warm
                reset()
            except Exception as exc:  # noqa: BLE001
                _record_error(rec, exc)
                del steps[impl]
                reset()
    for impl in steps:
        rec = next(r for r in records if r["impl"] == impl)
        _summarise_times(rec, times[impl], u, cfg)
        print(f"  {n}x{v} {dtype_name:>4} {impl:<18} median {rec['median_ms']:10.3f} ms  p20 {rec['p20_ms']:10.3f}  "
              f"p80 {rec['p80_ms']:10.3f}  reps {rec['reps']}  peak {fmt(rec['peak_extra_mb'], '.1f')} MB  "
              f"({time.perf_counter() - started[impl]:.1f} s)", flush=True)
    torch._dynamo.reset()

    _check_accuracy(records)
    _add_speedups(records)
    del student, teacher, ref_grad
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records


def _record_error(rec: dict, exc: BaseException) -> None:
    rec["status"] = "error"
    rec["error"] = short_error(exc)
    print(f"  {rec['N']}x{rec['V']} {rec['dtype']:>4} {rec['impl']:<18} ERROR {rec['error'].splitlines()[0][:200]}",
          flush=True)


def _summarise_times(rec: dict, times, u: int, cfg: argparse.Namespace) -> None:
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

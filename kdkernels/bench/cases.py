"""One (shape, dtype) case: for every implementation a first call (compile, result check against eager), peak
memory, then timing, as one record each; then the accuracy flags and the speed-ups vs eager and vs compile."""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch

from kdkernels.bench.impls import DTYPES, benched_loss, kdkernels_impls, make_inputs, make_loss_fn, resolved_backend
from kdkernels.bench.memory import measure_peak_mb
from kdkernels.bench.report import fmt, short_error
from kdkernels.bench.timing import QUANTILES, quantile, time_cpu, time_cuda


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(n: int, v: int, dtype_name: str, device: torch.device, cfg: argparse.Namespace) -> list[dict]:
    """All implementations for one (shape, dtype): a list of measurement records."""
    dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    u = n * v * itemsize
    student, teacher = make_inputs(n, v, dtype, device)

    benched = benched_loss(cfg.divergence, cfg.beta)
    impls: list[tuple[str, str | None]] = [("eager", None)]
    if not cfg.no_compile:
        impls.append(("compile", None))
    impls += kdkernels_impls(device, cfg.backends, student.detach())

    ref_loss, ref_grad = None, None
    records = []
    for impl, backend in impls:
        rec = {
            "shape": [n, v], "N": n, "V": v, "dtype": dtype_name, "impl": impl,
            "backend": resolved_backend(backend, student, teacher) if backend else None,
            "temperature": cfg.temperature, "status": "ok", "error": None,
            "bytes_U": u, "bytes_floor_5U": 5 * u, "bytes_floor_3U": 3 * u,
        }
        print(f"  {n}x{v} {dtype_name:>4} {impl:<18}", end=" ", flush=True)
        wall0 = time.perf_counter()
        try:
            compiled = None
            if impl == "compile":
                torch._dynamo.reset()  # one compiled graph per (shape, dtype); keeps clear of the recompile limit
                compiled = torch.compile(benched.eager, dynamic=False)
            fn = make_loss_fn(impl, backend, cfg.temperature, compiled, benched)

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
                  f"reps {rec['reps']}  peak {fmt(rec['peak_extra_mb'], '.1f')} MB  "
                  f"({time.perf_counter() - wall0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001  (a failing implementation is recorded, the run goes on)
            rec["status"] = "error"
            rec["error"] = short_error(exc)
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

"""The results as text: run metadata (versions, device, timing and memory methods), the markdown table, and JSON
with number lists kept on one line."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re

import torch

import kdkernels
from kdkernels._results import cpu_model, device_name, sanitize, usable_cores
from kdkernels.bench.impls import benched_loss
from kdkernels._memory import CUDA_MEMORY_METHOD, cpu_peak_supported
from kdkernels.bench.timing import QUANTILES, TIMING_ROUNDS

SCHEMA_VERSION = 1
FLOOR_NOTE = ("GB/s = 5U / median time, U = N*V*itemsize: the fwd+bwd bytes-moved floor of a two-pass fused kernel "
              "(read student and teacher twice, write the gradient once); the absolute floor (row kept on chip) is 3U.")


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def _impl_label(rec: dict) -> str:
    if rec["impl"] == "kdkernels:auto" and rec.get("backend"):
        return f"kdkernels:auto ({rec['backend']})"
    return rec["impl"]


def markdown_table(meta: dict, records: list[dict]) -> str:
    show_pct = any(r.get("pct_of_3U_floor") is not None for r in records)
    lines = [
        f"# {meta['benchmark']}: {meta['device']}",
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
            cells = [shape, r["dtype"], _impl_label(r), fmt(r["median_ms"], ".3f"), fmt(r["p20_ms"], ".3f"),
                     fmt(r["p80_ms"], ".3f"), fmt(r["reps"], "d"), fmt(r["peak_extra_mb"], ".1f"),
                     fmt(r["speedup_vs_eager"], ".2f") + ("x" if r["speedup_vs_eager"] else ""),
                     fmt(r["speedup_vs_compile"], ".2f") + ("x" if r["speedup_vs_compile"] else ""),
                     fmt(r["gbps_5U"], ".1f")]
            if show_pct:
                cells.append(fmt(r.get("pct_of_3U_floor"), ".0f"))
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


def metadata(device: torch.device, cfg: argparse.Namespace, argv: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    try:
        build = kdkernels.build_info()
    except Exception as exc:  # noqa: BLE001
        build = {"error": short_error(exc)}
    name = device_name(device)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": f"{benched_loss(cfg.loss, cfg.divergence, cfg.beta).name} forward+backward",
        "loss": cfg.loss,
        "divergence": cfg.divergence,
        "beta": cfg.beta if cfg.divergence == "jsd" else None,
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
        meta["usable_cores"] = usable_cores()
        meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        meta["timing"] = (f"time.perf_counter per fwd+bwd call in {TIMING_ROUNDS} rounds alternating between "
                          f"implementations, each round {cfg.target_time / TIMING_ROUNDS:g} s of calls after its warm-up (>= {cfg.warmup_time} s in "
                          f"the first), reps clamped to [{cfg.min_reps}, {cfg.max_reps}] in all, "
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

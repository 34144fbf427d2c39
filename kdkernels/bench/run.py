"""``kdkernels bench``: pick the device and defaults, run every (shape, dtype) case, print the table and write
kd_loss.json/.md/.png; exit status 1 when a kdkernels row failed or has an accuracy warning."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdkernels._results import default_results_root
from kdkernels.bench.cases import bench_case
from kdkernels.bench.impls import benched_loss
from kdkernels.bench.impls import RELATION_LOSSES
from kdkernels.bench.options import (ANGLE_SHAPES, CRD_QUICK_SHAPES, CRD_SHAPES, DEFAULT_SHAPES, GPU_EXTRA_SHAPES, QUICK_SHAPES,
                                     RELATION_QUICK_SHAPES, RELATION_SHAPES, build_parser)


def default_shapes(loss: str, quick: bool, device: torch.device) -> list[tuple[int, int]]:
    if loss == "crd":  # BxK: batch x negatives (d = 128, N = 50000)
        return list(CRD_QUICK_SHAPES if quick else CRD_SHAPES)
    if loss in RELATION_LOSSES:
        if quick:
            return list(RELATION_QUICK_SHAPES)
        return list(ANGLE_SHAPES if loss in ("rkd_angle", "rkd") else RELATION_SHAPES)
    if quick:
        return list(QUICK_SHAPES)
    return list(DEFAULT_SHAPES) + (list(GPU_EXTRA_SHAPES) if device.type == "cuda" else [])
from kdkernels.bench.plot import plot
from kdkernels.bench.report import markdown_table, metadata, short_error, to_json


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["linear_kd"]:   # hidden states + lm_head weights, not [N, V] logits: its own options
        from kdkernels.bench import linear_kd

        return linear_kd.main(argv[1:])
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
    shapes = cfg.shapes or default_shapes(cfg.loss, quick, device)
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
    stem = benched_loss(cfg.loss, cfg.divergence, cfg.beta).name
    (out / f"{stem}.json").write_text(to_json({"metadata": meta, "records": records}))
    (out / f"{stem}.md").write_text(table)
    written = [f"{stem}.json", f"{stem}.md"]
    if not cfg.no_plot:
        try:
            plot(meta, records, out / f"{stem}.png")
            written.append(f"{stem}.png")
        except Exception as exc:  # noqa: BLE001  (no matplotlib: the numbers are still written)
            print(f"kdkernels bench: no plot ({short_error(exc)})", file=sys.stderr)
    print(f"wrote {', '.join(str(out / w) for w in written)} ({meta['wall_s']} s)")
    failed = [r for r in records if r["status"] != "ok" and r["impl"].startswith("kdkernels")]
    bad = [r for r in records if r.get("accuracy_warning") and r["impl"].startswith("kdkernels")]
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``kdkernels bench`` command line: options, their parsers (shapes ``NxV``, dtypes, backends) and defaults."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from kdkernels import backends as _backends
from kdkernels.bench.impls import DTYPES, LOSSES
from kdkernels.bench.report import FLOOR_NOTE

TEMPERATURE = 4.0
DEFAULT_SHAPES = ((256, 100), (1024, 1000), (4096, 32000))
GPU_EXTRA_SHAPES = ((8192, 128256),)
QUICK_SHAPES = ((256, 100), (1024, 1000))
# Relation losses (BxD features): the B = 256 cases; the angle's eager B^3 x D cost bounds its shapes.
RELATION_SHAPES = ((256, 128), (256, 512), (1024, 512))
ANGLE_SHAPES = ((64, 128), (256, 512))
RELATION_QUICK_SHAPES = ((32, 16), (64, 32))
# CRD (BxK: batch x negatives, embeddings of 128 over a bank of 50000): RepDistiller's CIFAR K = 16384, and 4096.
CRD_SHAPES = ((64, 4096), (64, 16384))
CRD_QUICK_SHAPES = ((8, 64),)


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
        description="Time forward+backward of a kdkernels loss against its eager formula and torch.compile of it; "
                    "print a markdown table and write <loss>.json/.md/.png under benchmarks/results/<device>/.",
        epilog=FLOOR_NOTE)
    p.add_argument("--shapes", type=parse_shapes, default=None,
                   help="comma-separated NxV list (default: 256x100,1024x1000,4096x32000; plus 8192x128256 on GPU; "
                        "relation losses: BxD, 256x128,256x512,1024x512, angle and rkd 64x128,256x512)")
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
    p.add_argument("--loss", choices=LOSSES, default="kd",
                   help="kd: kd_loss (see --divergence); dkd: dkd_loss vs mdistiller's DKD; nkd: nkd_loss vs cls_KD's "
                        "NKD; dist: dist_loss vs DIST_KD's DIST; rkd_distance, rkd_angle, rkd, sp, pkt, cc: the "
                        "relation losses on [B, D] features vs lenscloth/RKD, RepDistiller, probabilistic_kt and "
                        "KD-Zoo; crd: crd_loss vs RepDistiller's CRD, shapes BxK (results in <loss>_loss.*)")
    p.add_argument("--divergence", choices=("forward", "jsd"), default="forward",
                   help="forward: Hinton KD vs the mdistiller eager formula (kd_loss.*); jsd: generalised JSD vs "
                        "TRL's eager generalized_jsd_loss (jsd_loss.*)")
    p.add_argument("--beta", type=float, default=0.5, help="the JSD skew (with --divergence jsd)")
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

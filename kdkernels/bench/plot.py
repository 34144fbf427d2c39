"""The results as a PNG: per dtype, median fwd+bwd time per shape and implementation (log scale, p20-p80 bars,
speed-up vs eager as labels), drawn with matplotlib (Agg), imported only when plotting."""
from __future__ import annotations

from pathlib import Path


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
    fig.suptitle(f"{meta['benchmark']}, T={meta['temperature']}: {meta['device']} (torch {meta['torch_version']})"
                 "\nlabels: speed-up vs eager", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

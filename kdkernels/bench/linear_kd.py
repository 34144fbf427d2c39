"""``kdkernels bench linear_kd`` (or ``python -m kdkernels.bench.linear_kd``): time and peak memory of one forward +
backward of LM distillation from hidden states (forward KL, some tokens ignored, gradients of the student's hidden
states and lm_head weight).

Implementations, run alternately in rounds so that a slowdown of a shared machine falls on all of them:

* ``eager``: what a training script writes: both logits materialised, ``F.kl_div`` of the log-softmaxes, masked;
* ``compile``: ``torch.compile`` of that eager function;
* ``kdkernels-reference``: ``linear_kd_loss(backend="reference")`` (materialises the logits);
* ``kdkernels``: ``linear_kd_loss`` (``algorithm="auto"``, the token-chunked algorithm at these shapes);
* ``kdkernels-streaming``: ``linear_kd_loss(algorithm="vocab-streaming")``, memory independent of V;
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` at ``beta=0`` (its forward KL), when installed;
* ``gemm-floor``: the four GEMMs the work cannot avoid on the counted tokens (student and teacher logits, the
  student's hidden-state and weight gradients), the time floor.

Every implementation's loss and gradients are checked against the eager ones. Memory is the peak RSS growth of one
call (``kdkernels._memory``), reported with and without the returned gradients.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kdkernels
from kdkernels._results import default_results_root, device_name, sanitize
from kdkernels._memory import CPU_MEMORY_METHOD, measure_peak_mb

IGNORED_SHARE = 0.1


def make_inputs(tokens: int, student_hidden: int, teacher_hidden: int, vocabulary: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return torch.randn(*shape, generator=generator) * scale

    labels = torch.randint(0, vocabulary, (tokens,), generator=generator)
    labels[torch.randperm(tokens, generator=generator)[:int(IGNORED_SHARE * tokens)]] = -100
    return {"student_hidden": randn(tokens, student_hidden, scale=1.0).requires_grad_(),
            "student_weight": randn(vocabulary, student_hidden, scale=student_hidden ** -0.5).requires_grad_(),
            "teacher_hidden": randn(tokens, teacher_hidden, scale=1.0),
            "teacher_weight": randn(vocabulary, teacher_hidden, scale=2 * teacher_hidden ** -0.5),
            "labels": labels}


def eager_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, temperature=1.0):
    """The eager formula as LM distillation scripts write it."""
    student_logits = student_hidden @ student_weight.t()
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.t()
    per_token = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                         F.log_softmax(teacher_logits / temperature, dim=-1), log_target=True,
                         reduction="none").sum(-1)
    mask = labels != -100
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def implementations(include_compile: bool) -> dict:
    def kdkernels_loss(backend, algorithm="auto"):
        def loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            return kdkernels.linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            labels=labels, backend=backend, algorithm=algorithm)
        return loss

    impls = {"eager": eager_loss}
    if include_compile:
        impls["compile"] = torch.compile(eager_loss, dynamic=False)
    impls["kdkernels-reference"] = kdkernels_loss("reference")
    impls["kdkernels"] = kdkernels_loss("auto")
    impls["kdkernels-streaming"] = kdkernels_loss("auto", "vocab-streaming")
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        pass
    else:
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0)

        def liger_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
            return liger(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)

        impls["liger"] = liger_loss
    return impls


def gemm_floor(inputs: dict) -> None:
    """The four GEMMs of the counted tokens: z_s, z_t, dz_s @ W_s and dz_s^T @ x_s (dz_s stands in as z_s)."""
    keep = (inputs["labels"] != -100).nonzero().squeeze(1)
    with torch.no_grad():
        hidden = inputs["student_hidden"].index_select(0, keep)
        student_logits = hidden @ inputs["student_weight"].t()
        inputs["teacher_hidden"].index_select(0, keep) @ inputs["teacher_weight"].t()
        student_logits @ inputs["student_weight"]
        student_logits.t() @ hidden


def run(args) -> dict:
    torch.manual_seed(0)
    inputs = make_inputs(args.tokens, args.student_hidden, args.teacher_hidden, args.vocabulary)
    grad_names = ("student_hidden", "student_weight")
    gradient_mb = sum(inputs[n].numel() * inputs[n].element_size() for n in grad_names) / 2 ** 20
    logits_mb = args.tokens * args.vocabulary * 4 / 2 ** 20
    impls = implementations(not args.no_compile)
    device = torch.device("cpu")

    def reset():
        for name in grad_names:
            inputs[name].grad = None

    def step_of(fn):
        def step():
            fn(**inputs).backward()
        return step

    records = {}
    reset()
    reference = eager_loss(**inputs)
    reference.backward()
    expected = {"loss": reference.item(), **{n: inputs[n].grad.clone() for n in grad_names}}
    for name, fn in impls.items():
        reset()
        t0 = time.perf_counter()
        loss = fn(**inputs)
        loss.backward()
        first = time.perf_counter() - t0
        errors = {n: ((inputs[n].grad - expected[n]).abs().max() / expected[n].abs().max()).item() for n in grad_names}
        reset()
        peak = measure_peak_mb(step_of(fn), device)
        records[name] = {"loss": loss.item(), "loss_relative_error": abs(loss.item() - expected["loss"]) /
                         abs(expected["loss"]), "grad_relative_max_error": errors, "first_call_s": first,
                         "peak_mb": peak, "peak_beyond_gradients_mb": None if peak is None else peak - gradient_mb,
                         "times_s": []}
    records["gemm-floor"] = {"peak_mb": measure_peak_mb(lambda: gemm_floor(inputs), device), "times_s": []}
    for _ in range(args.rounds):
        for name, fn in impls.items():
            reset()
            t0 = time.perf_counter()
            step_of(fn)()
            records[name]["times_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gemm_floor(inputs)
        records["gemm-floor"]["times_s"].append(time.perf_counter() - t0)
    floor = statistics.median(records["gemm-floor"]["times_s"])
    eager = statistics.median(records["eager"]["times_s"])
    for record in records.values():
        record["median_s"] = statistics.median(record["times_s"])
        record["vs_floor"] = record["median_s"] / floor
        record["speedup_vs_eager"] = eager / record["median_s"]
    return {"title": "linear_kd_loss: forward KL from hidden states, forward + backward",
            "device": device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "kdkernels": kdkernels.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "shape": {"tokens": args.tokens, "student_hidden": args.student_hidden,
                      "teacher_hidden": args.teacher_hidden, "vocabulary": args.vocabulary, "dtype": "float32",
                      "ignored_share": IGNORED_SHARE},
            "one_logits_tensor_mb": logits_mb, "returned_gradients_mb": gradient_mb,
            "memory_method": CPU_MEMORY_METHOD, "rounds": args.rounds, "results": records}


def markdown(result: dict) -> str:
    shape = result["shape"]
    lines = [f"# {result['title']}", "",
             f"{result['device']}, {result['threads']} threads, torch {result['torch']}, kdkernels "
             f"{result['kdkernels']}, {result['date']}. N = {shape['tokens']} tokens ({shape['ignored_share']:.0%} "
             f"ignored), student H {shape['student_hidden']}, teacher H {shape['teacher_hidden']}, V "
             f"{shape['vocabulary']}, float32; gradients of the student's hidden states and weight. Median of "
             f"{result['rounds']} alternating rounds. One [N, V] float32 tensor is {result['one_logits_tensor_mb']:.0f} "
             f"MiB; the returned gradients are {result['returned_gradients_mb']:.0f} MiB.", "",
             "| implementation | median s | × GEMM floor | speed-up vs eager | peak extra MiB beyond gradients | "
             "÷ one [N, V] | loss rel. error | grad rel. error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    for name, record in result["results"].items():
        beyond = record.get("peak_beyond_gradients_mb")
        share = None if beyond is None else beyond / result["one_logits_tensor_mb"]
        grad_error = record.get("grad_relative_max_error")
        cells = [name, number(record["median_s"], ".3f"), number(record["vs_floor"], ".2f"),
                 number(record["speedup_vs_eager"], ".2f"), number(beyond, ".0f"), number(share, ".3f"),
                 number(record.get("loss_relative_error"), ".1e"),
                 number(None if grad_error is None else max(grad_error.values()), ".1e")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Memory: {result['memory_method']}; the GEMM floor's row is its own peak (its outputs)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Two bar panels: median time (with the GEMM floor) and peak extra memory beyond the gradients, per
    implementation; matplotlib (Agg), imported only here."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["results"])
    records = [result["results"][name] for name in names]
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    time_axis.bar(names, [r["median_s"] for r in records], color="tab:blue")
    time_axis.set_ylabel("forward + backward, median s")
    memory_names = [n for n, r in zip(names, records) if r.get("peak_beyond_gradients_mb") is not None]
    memory_axis.bar(memory_names, [result["results"][n]["peak_beyond_gradients_mb"] for n in memory_names],
                    color="tab:orange")
    memory_axis.axhline(result["one_logits_tensor_mb"], color="grey", linestyle="--", label="one [N, V] fp32")
    memory_axis.set_ylabel("peak extra MiB beyond the gradients")
    memory_axis.legend()
    for axis in (time_axis, memory_axis):
        axis.tick_params(axis="x", rotation=30)
    shape = result["shape"]
    fig.suptitle(f"linear_kd_loss, N {shape['tokens']}, H {shape['student_hidden']}/{shape['teacher_hidden']}, "
                 f"V {shape['vocabulary']}, fp32 — {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels bench linear_kd", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--student-hidden", type=int, default=512)
    parser.add_argument("--teacher-hidden", type=int, default=1024)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-plot", action="store_true", help="do not write linear_kd_loss.png")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for linear_kd_loss.{json,md,png} (default: benchmarks/results/<device>/)")
    args = parser.parse_args(argv)
    result = run(args)
    out = args.out or default_results_root() / sanitize(result["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_kd_loss.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "linear_kd_loss.md").write_text(markdown(result))
    if not args.no_plot:
        plot(result, out / "linear_kd_loss.png")
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

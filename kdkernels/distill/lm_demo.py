"""``kdkernels lm-demo``: language-model distillation from hidden states with :func:`kdkernels.linear_kd_loss`.

A byte-level causal transformer teacher is trained here on text shipped with Python (source files of its standard
library, so no download), then smaller students are trained for the same number of steps with the cross-entropy
alone and with ``hard_weight · CE + soft_weight · D(p_t, p_s)`` for each divergence (forward KL, reverse KL, JSD,
skew forward KL) and for a top-k teacher (its k = 16 largest log-probabilities per token, as an offline teacher
stores them, and no teacher GEMM in the loss). Reported per method: held-out perplexity (mean ± std over seeds),
time per training step and the peak extra memory of one loss forward + backward.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._memory import measure_peak_mb
from kdkernels._results import default_results_root, device_name, sanitize

CORPUS_MODULES = ("textwrap.py", "string.py", "difflib.py", "heapq.py", "bisect.py", "shlex.py", "fractions.py",
                  "statistics.py", "argparse.py", "tokenize.py", "pprint.py", "calendar.py")
VOCABULARY = 256
METHODS = {
    "ce": None,
    "forward-kl": dict(divergence="forward"),
    "reverse-kl": dict(divergence="reverse"),
    "jsd": dict(divergence="jsd", beta=0.5),
    "skew-kl": dict(divergence="skew_forward", skew_alpha=0.1),
    "top-16": dict(divergence="forward", topk=16),
}


def corpus_bytes() -> torch.Tensor:
    """The bytes of CORPUS_MODULES from this Python's standard library, as int64 token ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join((root / name).read_bytes() for name in CORPUS_MODULES if (root / name).is_file())
    if len(text) < 10_000:
        raise RuntimeError(f"lm-demo: found too little standard-library text under {root} ({len(text)} bytes)")
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


class TinyCausalLM(nn.Module):
    """Token + position embeddings, pre-norm transformer blocks with a causal mask, a final LayerNorm, and an
    untied ``lm_head`` [V, width]: ``hidden(tokens)`` gives the final hidden states the loss takes."""

    def __init__(self, width: int, layers: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(VOCABULARY, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, VOCABULARY, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        x = self.embed(tokens) + self.position[:length]
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens))


def batches(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Endless random windows: (inputs [B, C], next tokens [B, C])."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch_size,), generator=generator)
        window = torch.stack([data[s:s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def perplexity(model: TinyCausalLM, data: torch.Tensor, context: int) -> float:
    """exp(mean next-byte cross-entropy) over the held-out text in consecutive windows."""
    model.eval()
    usable = (len(data) - 1) // context * context
    inputs = data[:usable].view(-1, context)
    targets = data[1:usable + 1].view(-1, context)
    total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                for x, y in zip(inputs.split(64), targets.split(64)))
    model.train()
    return math.exp(total / targets.numel())


def distillation_loss(student: TinyCausalLM, teacher: TinyCausalLM, inputs, targets, options: dict | None,
                      hard_weight: float) -> torch.Tensor:
    hidden = student.hidden(inputs)
    if options is None:
        return F.cross_entropy(student.lm_head(hidden).flatten(0, 1), targets.flatten())
    options = dict(options)
    topk = options.pop("topk", None)
    with torch.no_grad():
        teacher_hidden = teacher.hidden(inputs)
        if topk is not None:   # what an offline teacher stores: its top-k log-probabilities per token
            logprobs, indices = F.log_softmax(teacher.lm_head(teacher_hidden), dim=-1).topk(topk, dim=-1)
    teacher_side = (dict(teacher_topk_logprobs=logprobs, teacher_topk_indices=indices) if topk is not None else
                    dict(teacher_hidden=teacher_hidden, teacher_weight=teacher.lm_head.weight))
    return kdkernels.linear_kd_loss(hidden, student.lm_head.weight, **teacher_side, labels=targets,
                                    hard_weight=hard_weight, soft_weight=1.0 - hard_weight, **options)


def train(model: TinyCausalLM, data: torch.Tensor, steps: int, args, seed: int, teacher=None, options=None) -> float:
    """AdamW with a cosine schedule; returns the seconds per step."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    stream = batches(data, args.batch_size, args.context, generator)
    start = time.perf_counter()
    for _ in range(steps):
        inputs, targets = next(stream)
        if teacher is None:
            loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        else:
            loss = distillation_loss(model, teacher, inputs, targets, options, args.hard_weight)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
    return (time.perf_counter() - start) / steps


def loss_peak_mb(student, teacher, data, args, options) -> float | None:
    inputs, targets = next(batches(data, args.batch_size, args.context, torch.Generator().manual_seed(0)))

    def step():
        distillation_loss(student, teacher, inputs, targets, options, args.hard_weight).backward()

    return measure_peak_mb(step, torch.device("cpu"))


def run(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = corpus_bytes()
    split = int(0.9 * len(data))
    train_data, held_out = data[:split], data[split:]
    torch.manual_seed(0)
    teacher = TinyCausalLM(args.teacher_width, args.teacher_layers, 4, args.context)
    teacher_step_s = train(teacher, train_data, args.teacher_steps, args, seed=0)
    teacher.eval().requires_grad_(False)
    print(f"lm-demo: teacher trained ({args.teacher_steps} steps, {teacher_step_s:.2f} s/step)", file=sys.stderr)
    result = {"title": "kdkernels lm-demo: byte-level LM distillation from hidden states",
              "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": sys.version.split()[0], "kdkernels": kdkernels.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "corpus": {"modules": list(CORPUS_MODULES), "bytes": len(data), "held_out_bytes": len(held_out)},
              "setting": {k: v for k, v in vars(args).items() if k != "out"},
              "teacher": {"perplexity": perplexity(teacher, held_out, args.context), "step_s": teacher_step_s,
                          "parameters": sum(p.numel() for p in teacher.parameters())},
              "methods": {}}
    for name in args.methods:
        runs = []
        for seed in range(args.seeds):
            torch.manual_seed(100 + seed)
            student = TinyCausalLM(args.student_width, args.student_layers, 2, args.context)
            step_s = train(student, train_data, args.steps, args, seed=100 + seed, teacher=teacher,
                           options=METHODS[name])
            runs.append({"seed": seed, "perplexity": perplexity(student, held_out, args.context), "step_s": step_s})
        values = [r["perplexity"] for r in runs]
        result["methods"][name] = {
            "options": METHODS[name], "runs": runs, "perplexity_mean": statistics.mean(values),
            "perplexity_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "step_s": statistics.median(r["step_s"] for r in runs),
            "loss_peak_mb": loss_peak_mb(student, teacher, train_data, args, METHODS[name])}
        print(f"lm-demo: {name}: perplexity {result['methods'][name]['perplexity_mean']:.3f}", file=sys.stderr)
    return result


def markdown(result: dict) -> str:
    setting, teacher = result["setting"], result["teacher"]
    lines = [f"# {result['title']}", "",
             f"{result['device']}, {result['threads']} threads, torch {result['torch']}, Python {result['python']}, "
             f"kdkernels {result['kdkernels']}, {result['date']}. Corpus: {result['corpus']['bytes']} bytes of "
             f"Python {result['python']}'s standard library ({', '.join(result['corpus']['modules'])}), the last 10 % "
             f"held out. Teacher: width {setting['teacher_width']}, {setting['teacher_layers']} layers, "
             f"{teacher['parameters']} parameters, {setting['teacher_steps']} steps, held-out perplexity "
             f"{teacher['perplexity']:.3f}. Students: width {setting['student_width']}, {setting['student_layers']} "
             f"layers, {setting['steps']} steps of {setting['batch_size']} × {setting['context']} bytes, AdamW lr "
             f"{setting['lr']}, cosine; distilled with `linear_kd_loss(hard_weight={setting['hard_weight']}, "
             f"soft_weight={1 - setting['hard_weight']:.2g}, T = 1)`; {setting['seeds']} seed(s).", "",
             "| method | loss options | held-out perplexity (mean ± std) | vs ce | s / step | loss peak MiB |",
             "|---|---|---:|---:|---:|---:|"]
    base = result["methods"].get("ce", {}).get("perplexity_mean")
    for name, record in result["methods"].items():
        delta = "-" if base is None or name == "ce" else f"{record['perplexity_mean'] - base:+.3f}"
        peak = record["loss_peak_mb"]
        options = "cross-entropy only" if record["options"] is None else ", ".join(
            f"{k}={v}" for k, v in record["options"].items())
        lines.append(f"| {name} | {options} | {record['perplexity_mean']:.3f} ± {record['perplexity_std']:.3f} | "
                     f"{delta} | {record['step_s']:.3f} | {'-' if peak is None else f'{peak:.1f}'} |")
    lines += ["", "Loss peak: the RSS growth of one loss forward + backward of the last student (kdkernels._memory); "
              "for `ce` the eager cross-entropy on the student's logits."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdkernels lm-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=None, help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=250, help="student steps")
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--teacher-width", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--student-width", type=int, default=48)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for lm_demo.{json,md} (default: benchmarks/results/<device>/lm-demo)")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "teacher_steps", "context", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.hard_weight <= 1.0:
        parser.error(f"--hard-weight must be in [0, 1], got {args.hard_weight}")
    args.methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    result = run(args)
    out = args.out or default_results_root() / sanitize(result["device"]) / "lm-demo"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm_demo.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "lm_demo.md").write_text(markdown(result))
    sys.stdout.write(markdown(result))
    return 0

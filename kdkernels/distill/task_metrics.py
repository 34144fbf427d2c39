"""Task metrics: streaming test-set metrics whose state is a few float64 tensors of sums.

The interface (:class:`TaskMetric`), one job: accumulate, then compute.

* ``update(output, target, teacher=None)`` adds one batch's sums to ``metric.sums`` (name -> float64 tensor),
  computed in float64 from the model's output (logits), the batch's ``"target"`` and, for a metric with
  ``uses_teacher``, the teacher's output on the same batch (``None`` when the run has no teacher).
* Every sum is additive over samples: two states (two data-parallel ranks, two halves of a batch) merge by adding
  their sums (:meth:`TaskMetric.merge`; the trainer all-reduces them), so a metric is exact over the whole test set
  however it is split. A sum may appear at the first batch that gives it (a confusion matrix sized by the classes).
* ``compute()`` turns the sums into ``{key: value}`` (``None`` when nothing was counted); the trainer reports each
  value of model ``m`` as ``test_<key>_<m>``.

The metrics (``TrainConfig.metrics`` selects them by name; default ``("classification",)``):

* ``"classification"``: outputs [N, C], targets [N] class indices. ``acc`` top-1 accuracy (%); ``nll`` mean
  cross-entropy (nats); ``ece`` expected calibration error with 15 equal-width confidence bins (Guo et al. 2017):
  ``sum_b |B_b| / n · |acc(B_b) − conf(B_b)|``, confidence = max softmax probability, bin b = (b/15, (b+1)/15], a
  fraction in [0, 1]. With a teacher: ``agreement`` (% of samples where the student's top-1 class is the
  teacher's) and ``teacher_kl`` (mean over samples of KL(p_t ‖ p_s) at T = 1, nats).
* ``"miou"``: dense prediction, outputs [N, C, H, W], targets [N, H, W] (pixels equal to ``ignore_index`` = 255
  are skipped). ``miou``: mean IoU (%) from the summed confusion matrix, over the classes present in the prediction
  or the target.
* ``"language_model"``: outputs [N, L, V], targets [N, L] aligned with the outputs (already shifted), tokens equal
  to ``ignore_index`` = -100 are skipped. ``token_acc`` token top-1 accuracy (%); ``ppl`` perplexity,
  exp(mean token cross-entropy).
* ``"knn"`` and ``"linear_probe"``: representation learning, on the model's embedding (its
  ``feature_points(model).embedding`` tap) against the whole training set's embeddings: ``knn_acc`` weighted k-NN
  accuracy (%, DINO's ``eval_knn.py``: k = 20, T = 0.07), ``probe_acc`` the test accuracy (%) of a logistic
  regression fitted by full-batch L-BFGS on the standardised training embeddings (:class:`RepresentationMetric`).

A new metric subclasses :class:`TaskMetric` and is made selectable with :func:`register` (a name and a factory
taking no argument, e.g. ``register("miou-void0", lambda: MeanIoU(ignore_index=0))``).
"""
from __future__ import annotations

import difflib
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks

ECE_BINS = 15


class TaskMetric:
    """A streaming metric: :meth:`update` per batch, :meth:`merge` / all-reduce of :attr:`sums`, :meth:`compute`.
    ``reads``: what :meth:`update` gets as ``output``: the model's output (``"logits"``) or its embedding
    (``"embedding"``, :class:`RepresentationMetric`)."""

    name = "metric"
    uses_teacher = False
    reads = "logits"

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.check = Checks(f"task metric {self.name!r}")

    def update(self, output: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float | None]:
        raise NotImplementedError

    def add(self, key: str, value: torch.Tensor) -> None:
        """Adds ``value`` (as float64) to the sum ``key``."""
        value = value.detach().to(torch.float64)
        if key not in self.sums:
            self.sums[key] = value.clone()
        elif self.sums[key].shape != value.shape:
            self.check.value_error(key, f"must keep its shape {tuple(self.sums[key].shape)} from batch to batch "
                                   "(the number of classes changed?)", f"shape {tuple(value.shape)}")
        else:
            self.sums[key] = self.sums[key] + value.to(self.sums[key].device)

    def merge(self, other: "TaskMetric") -> "TaskMetric":
        """Adds ``other``'s sums to this metric's (what the all-reduce over data-parallel ranks does)."""
        for key, value in other.sums.items():
            self.add(key, value)
        return self

    def total(self, key: str) -> float:
        """A scalar sum as a float (0 when it was never given)."""
        return float(self.sums[key]) if key in self.sums else 0.0

    # ------------------------------------------------------------------------------------------------- checks

    def logits(self, output, shape: str, dims: int, class_dim: int = 1) -> torch.Tensor:
        """Float logits with ``dims`` dims and at least one class (``shape`` describes them), as float64."""
        output = self.check.tensor("outputs", output)
        if not output.dtype.is_floating_point:
            self.check.type_error("outputs", "float logits", output.dtype)
        if output.dim() != dims or output.shape[class_dim] == 0:
            self.check.value_error("outputs", f"must have shape {shape} (logits)", f"shape {tuple(output.shape)}")
        return output.detach().to(torch.float64)

    def targets(self, target, shape: torch.Size, what: str, classes: int, ignore_index: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer targets of ``shape`` in [0, classes) (or ``ignore_index``): (targets as int64, valid mask)."""
        target = self.check.integers("targets", target)
        if target.shape != shape:
            self.check.value_error("targets", f"must have shape {what} {tuple(shape)}", f"shape {tuple(target.shape)}")
        target = target.long()
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        bad = valid & ((target < 0) | (target >= classes))
        if bool(bad.any()):
            allowed = f"class indices in [0, {classes})" + (f" or {ignore_index}" if ignore_index is not None else "")
            self.check.value_error("targets", f"must be {allowed}", f"{target[bad][0].item()}")
        return target, valid


class Classification(TaskMetric):
    """Top-1 accuracy, NLL and ECE of [N, C] logits; teacher agreement and KL(p_t ‖ p_s) when given a teacher."""

    name = "classification"
    uses_teacher = True

    def __init__(self, bins: int = ECE_BINS):
        super().__init__()
        self.bins = self.check.integer("bins", bins, minimum=1)

    def update(self, output, target, teacher=None) -> None:
        logits = self.logits(output, "[N, C]", 2)
        target, _ = self.targets(target, logits.shape[:1], "[N]", logits.shape[1])
        log_p = F.log_softmax(logits, dim=1)
        prediction = logits.argmax(dim=1)
        confidence = log_p.exp().amax(dim=1)
        correct = (prediction == target).to(torch.float64)
        edges = torch.linspace(0.0, 1.0, self.bins + 1, dtype=torch.float64, device=logits.device)
        bins = torch.bucketize(confidence, edges[1:-1])         # bin b holds confidences in (b/15, (b+1)/15]
        zeros = logits.new_zeros(self.bins)
        self.add("count", torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device))
        self.add("correct", correct.sum())
        self.add("nll", F.nll_loss(log_p, target, reduction="sum"))
        self.add("bin_count", zeros.index_add(0, bins, torch.ones_like(confidence)))
        self.add("bin_confidence", zeros.index_add(0, bins, confidence))
        self.add("bin_correct", zeros.index_add(0, bins, correct))
        if teacher is None:
            return
        teacher = self.check.tensor("teacher outputs", teacher)
        if teacher.shape != output.shape:
            self.check.value_error("teacher outputs", f"must have the outputs' shape {tuple(output.shape)}",
                                   f"shape {tuple(teacher.shape)}")
        teacher = teacher.detach().to(device=logits.device, dtype=torch.float64)
        log_t = F.log_softmax(teacher, dim=1)
        self.add("agreement", (teacher.argmax(dim=1) == prediction).sum())
        # KL(p_t || p_s) = sum_c p_t (log p_t - log p_s); classes with p_t = 0 add nothing (also for -inf logits)
        self.add("teacher_kl", torch.where(log_t > -math.inf, log_t.exp() * (log_t - log_p), 0.0).sum())

    def compute(self) -> dict[str, float | None]:
        n = self.total("count")
        if n == 0:
            values = dict.fromkeys(("acc", "nll", "ece"))
        else:
            counts, confidences, corrects = (self.sums[key] for key in ("bin_count", "bin_confidence", "bin_correct"))
            filled = counts > 0
            gaps = (corrects[filled] / counts[filled] - confidences[filled] / counts[filled]).abs()
            values = {"acc": 100.0 * self.total("correct") / n, "nll": self.total("nll") / n,
                      "ece": float((counts[filled] / n * gaps).sum())}
        if "agreement" in self.sums:
            values["agreement"] = 100.0 * self.total("agreement") / n if n else None
            values["teacher_kl"] = self.total("teacher_kl") / n if n else None
        return values


class MeanIoU(TaskMetric):
    """Mean IoU (%) of dense predictions: [N, C, H, W] logits, [N, H, W] targets, from a summed confusion matrix."""

    name = "miou"

    def __init__(self, ignore_index: int = 255):
        super().__init__()
        self.ignore_index = self.check.integer("ignore_index", ignore_index)

    def update(self, output, target, teacher=None) -> None:
        logits = self.logits(output, "[N, C, H, W]", 4)
        classes = logits.shape[1]
        shape = torch.Size([logits.shape[0], *logits.shape[2:]])
        target, valid = self.targets(target, shape, "[N, H, W]", classes, self.ignore_index)
        pairs = target[valid] * classes + logits.argmax(dim=1)[valid]   # confusion[target, prediction]
        self.add("confusion", torch.bincount(pairs, minlength=classes * classes).view(classes, classes))

    def compute(self) -> dict[str, float | None]:
        if "confusion" not in self.sums:
            return {"miou": None}
        confusion = self.sums["confusion"]
        hits = confusion.diagonal()
        union = confusion.sum(dim=0) + confusion.sum(dim=1) - hits
        present = union > 0
        return {"miou": 100.0 * float((hits[present] / union[present]).mean()) if bool(present.any()) else None}


class LanguageModel(TaskMetric):
    """Token accuracy (%) and perplexity of [N, L, V] logits against [N, L] targets (ignore_index skipped)."""

    name = "language_model"

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = self.check.integer("ignore_index", ignore_index)

    def update(self, output, target, teacher=None) -> None:
        logits = self.logits(output, "[N, L, V]", 3, class_dim=2)
        target, valid = self.targets(target, logits.shape[:2], "[N, L]", logits.shape[2], self.ignore_index)
        self.add("tokens", valid.sum())
        self.add("correct", ((logits.argmax(dim=2) == target) & valid).sum())
        self.add("nll", F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=self.ignore_index,
                                        reduction="sum"))

    def compute(self) -> dict[str, float | None]:
        tokens = self.total("tokens")
        if tokens == 0:
            return {"token_acc": None, "ppl": None}
        return {"token_acc": 100.0 * self.total("correct") / tokens, "ppl": math.exp(self.total("nll") / tokens)}


# ----------------------------------------------------------------------------------------------- representations

class RepresentationMetric(TaskMetric):
    """A metric of a model's embedding rather than its output: the evaluator taps the model's
    ``feature_points(model).embedding`` (the pooled feature entering the classifier, e.g. ``"fc/input"``), hands
    :meth:`fit` the embeddings and labels of the whole training set once per evaluation (every rank gets all of
    them), then :meth:`update` the test batches' embeddings as ``output``."""

    reads = "embedding"

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def embeddings(self, output) -> torch.Tensor:
        """[N, ...] features flattened per sample, as float64."""
        output = self.check.tensor("embeddings", output)
        if not output.dtype.is_floating_point or output.dim() < 2 or output.shape[0] == 0 and output.numel():
            self.check.value_error("embeddings", "must be float features [N, D, ...]", f"{output.dtype} shape "
                                   f"{tuple(output.shape)}")
        return output.detach().to(torch.float64).flatten(1)


class KNN(RepresentationMetric):
    """Weighted k-NN accuracy (%) of the embeddings, as facebookresearch/dino ``eval_knn.py`` ``knn_classifier``:
    cosine similarities of L2-normalised features, the k most similar training samples vote for their class with
    weight ``exp(similarity / T)``, the class with the largest vote wins (k = 20, T = 0.07 there)."""

    name = "knn"

    def __init__(self, k: int = 20, temperature: float = 0.07):
        super().__init__()
        self.k = self.check.integer("k", k, minimum=1)
        self.temperature = self.check.real("temperature", temperature, positive=True)
        self.bank: torch.Tensor | None = None
        self.bank_labels: torch.Tensor | None = None

    def fit(self, features, labels) -> None:
        self.bank = F.normalize(self.embeddings(features), dim=1)
        self.bank_labels = labels.long().to(self.bank.device)

    def update(self, output, target, teacher=None) -> None:
        if self.bank is None:
            raise RuntimeError("task metric 'knn': fit() the training embeddings before update()")
        queries = F.normalize(self.embeddings(output), dim=1)
        target = target.long().to(queries.device)
        classes = int(max(self.bank_labels.max().item(), target.max().item())) + 1
        similarity, neighbours = (queries @ self.bank.to(queries.device).T).topk(min(self.k, self.bank.shape[0]),
                                                                                 dim=1)
        votes = queries.new_zeros(queries.shape[0], classes).scatter_add_(
            1, self.bank_labels.to(queries.device)[neighbours], (similarity / self.temperature).exp())
        self.add("count", torch.tensor(float(queries.shape[0]), dtype=torch.float64))
        self.add("correct", (votes.argmax(dim=1) == target).sum())

    def compute(self) -> dict[str, float | None]:
        n = self.total("count")
        return {"knn_acc": 100.0 * self.total("correct") / n if n else None}


class LinearProbe(RepresentationMetric):
    """Linear-probe accuracy (%): a multinomial logistic regression on the frozen training embeddings, fitted to
    convergence by L-BFGS in float64 (full batch, deterministic), objective ``mean CE + λ/2 ‖W‖²`` on features
    standardised with the training set's mean and standard deviation; then its test accuracy. The linear-evaluation
    protocol of SimCLR / BYOL (there an SGD-trained linear layer on ImageNet); here the full-batch form, as CLIP's
    linear probes (scikit-learn's L-BFGS logistic regression)."""

    name = "linear_probe"

    def __init__(self, weight_decay: float = 1e-4, max_iter: int = 500):
        super().__init__()
        self.weight_decay = self.check.real("weight_decay", weight_decay, nonnegative=True)
        self.max_iter = self.check.integer("max_iter", max_iter, minimum=1)
        self.weight = self.bias = self.mean = self.scale = None

    def fit(self, features, labels) -> None:
        x = self.embeddings(features)
        y = labels.long().to(x.device)
        self.mean, self.scale = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-12)
        x = (x - self.mean) / self.scale
        classes = int(y.max().item()) + 1
        weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, device=x.device, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, device=x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-10,
                                      tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = self.objective(x, y, weight, bias)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()

    def objective(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``mean CE(x W + b, y) + λ/2 ‖W‖²`` on standardised features."""
        return F.cross_entropy(x @ weight + bias, y) + 0.5 * self.weight_decay * weight.pow(2).sum()

    def update(self, output, target, teacher=None) -> None:
        if self.weight is None:
            raise RuntimeError("task metric 'linear_probe': fit() the training embeddings before update()")
        x = (self.embeddings(output) - self.mean) / self.scale
        prediction = (x @ self.weight + self.bias).argmax(dim=1)
        self.add("count", torch.tensor(float(x.shape[0]), dtype=torch.float64))
        self.add("correct", (prediction == target.long().to(x.device)).sum())

    def compute(self) -> dict[str, float | None]:
        n = self.total("count")
        return {"probe_acc": 100.0 * self.total("correct") / n if n else None}


# ------------------------------------------------------------------------------------------------------ registry

METRICS: dict[str, Callable[[], TaskMetric]] = {"classification": Classification, "miou": MeanIoU,
                                                "language_model": LanguageModel, "knn": KNN,
                                                "linear_probe": LinearProbe}
DEFAULT = ("classification",)


def register(name: str, factory: Callable[[], TaskMetric]) -> None:
    """Makes ``factory`` (no arguments, returns a fresh :class:`TaskMetric`) selectable as ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register: factory must be callable, got {type(factory).__name__}")
    METRICS[name] = factory


def check_names(names) -> tuple[str, ...]:
    """``names`` as a tuple of known, distinct metric names (a TypeError or ValueError naming ``metrics``)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"metrics must be a list or tuple of metric names, got {names!r}")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"metrics must hold metric names (str), got {name!r}")
        if name not in METRICS:
            close = difflib.get_close_matches(name.lower(), list(METRICS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"metrics: unknown task metric {name!r}{hint}; the metrics are {sorted(METRICS)}")
    if not names:
        raise ValueError(f"metrics must name at least one task metric, e.g. {DEFAULT}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"metrics must be distinct; repeated: {repeated}")
    return names


def build(names: Sequence[str]) -> list[TaskMetric]:
    """Fresh metrics of the given names."""
    return [METRICS[name]() for name in check_names(names)]

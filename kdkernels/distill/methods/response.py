"""Response-based methods: losses on the logits (../shared/reference/methods.md §1, and WSL from §4).

Offline methods distil a frozen teacher's logits (KD, DKD, NKD, DIST, WSL, SSLD, Tf-KD self); teacher-free ones
shape the student's own soft labels (tf-NKD, Tf-KD reg, label smoothing, Zipf's label smoothing). Under the
trainer's MixUp, label-reading terms use the mixup criterion over both labels, except NKD and tf-NKD, which take
the mixed soft labels as cls_KD does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels._validation import Checks
from kdkernels.distill.distiller import Distiller
from kdkernels.distill.hooks import find_module
from kdkernels.distill.methods._common import offline, single_stage, stage_tap
from kdkernels.distill.recipe import Recipe, Setup, feature_points
from kdkernels.distill.registry import register
from kdkernels.distill.term_gradients import GradientSimilarityGate
from kdkernels.distill.terms import CrossEntropyTerm, FunctionTerm, StepContext, Term, mixup_average
from kdkernels.losses.response import DEIT_DISTILLATION_TYPES
from kdkernels.losses.soft_label import LABEL_SMOOTHING_CONVENTIONS


def teacher_free(method: str, setup: Setup, terms: list[Term]) -> Recipe:
    """The student alone (teacher-free methods), one stage."""
    return single_stage(method, Distiller({"student": setup.student}, terms))


# ----------------------------------------------------------------------------------------------------------- KD

@register("kd", category="response",
          paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv:1503.02531, 2015",
          presets={"imagenet": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}})
def kd(setup: Setup, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9) -> Recipe:
    """Hinton KD: ``ce_weight·CE + kd_weight·T²·KL(p_t ‖ p_s)`` (batchmean), mdistiller ``KD.py`` defaults."""
    terms = [CrossEntropyTerm("student", ce_weight),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight, temperature=temperature)]
    return offline("kd", setup, terms)


# ---------------------------------------------------------------------------------------------- labels and MixUp

class HardLabelTerm(FunctionTerm):
    """``fn(*values, labels)`` with the labels read last; under MixUp, :func:`mixup_average` over both labels."""

    def loss(self, *values, context):
        *inputs, target = values
        return mixup_average(lambda labels: self.fn(*inputs, labels, **self.kwargs), target, context)


def mixed_labels(target: torch.Tensor, context: StepContext, classes: int) -> torch.Tensor:
    """Hard labels, or under MixUp the soft labels ``lam·onehot(y) + (1 − lam)·onehot(y[perm])`` that cls_KD's
    batch augments produce (its NKD takes their argmax, tf-NKD their top 2)."""
    if context.mixup is None:
        return target
    onehot = F.one_hot(target.long(), classes).float()
    lam = context.mixup.lam
    return lam * onehot + (1.0 - lam) * onehot[context.mixup.permutation]


class SoftLabelTerm(FunctionTerm):
    """``fn(*logits, labels)`` with the labels read last, given as soft labels under MixUp (:func:`mixed_labels`)."""

    def loss(self, *values, context):
        *logits, target = values
        return self.fn(*logits, mixed_labels(target, context, logits[0].shape[-1]), **self.kwargs)


# ---------------------------------------------------------------------------------------------------------- DKD

def warmup_factor(epoch: int, warmup: float) -> float:
    """mdistiller's ``min(epoch / warmup, 1)``: epochs count from 1, the factor is constant within an epoch."""
    return min(epoch / warmup, 1.0)


class WarmupTerm(HardLabelTerm):
    """``weight · min(epoch / warmup, 1) · fn(*values, **kwargs)`` (DKD's linear warm-up over the first epochs)."""

    def __init__(self, name, fn, reads, weight: float = 1.0, *, warmup: float, **kwargs):
        super().__init__(name, fn, reads, weight, **kwargs)
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not warmup > 0:
            raise ValueError(f"term {name!r}: warmup must be a positive number of epochs, got {warmup!r}")
        self.warmup = warmup

    def weight_at(self, context: StepContext) -> float:
        return self.weight * warmup_factor(context.epoch, self.warmup)


DKD_PRESETS = {
    "cifar-res56-res20": {"beta": 2.0}, "cifar-res110-res32": {"beta": 2.0},
    "cifar-vgg13-vgg8": {"beta": 6.0}, "cifar-wrn40-2-wrn16-2": {"beta": 6.0},
    "cifar-wrn40-2-wrn40-1": {"beta": 6.0}, "cifar-vgg13-mv2": {"beta": 6.0},
    "imagenet-r34-r18": {"temperature": 1.0, "beta": 0.5, "warmup": 1},
    "imagenet-r50-mv1": {"temperature": 1.0, "beta": 2.0, "warmup": 1},
}


@register("dkd", category="response",
          paper="Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022", presets=DKD_PRESETS)
def dkd(setup: Setup, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0, warmup: float = 20,
        ce_weight: float = 1.0) -> Recipe:
    """DKD: ``ce_weight·CE + min(epoch/warmup, 1)·(alpha·TCKD + beta·NCKD)``, mdistiller ``DKD.py`` (batchmean, T²).

    Defaults are mdistiller's ``cfg.py`` (the CIFAR res32x4→res8x4 family uses beta 8); presets carry the per-pair
    CIFAR betas of ``configs/cifar100/dkd/*.yaml`` and the ImageNet ``r34_r18`` / ``r50_mv1`` configs.
    """
    terms = [CrossEntropyTerm("student", ce_weight),
             WarmupTerm("dkd", kdkernels.dkd_loss, ("student", "teacher", "target"), warmup=warmup,
                        temperature=temperature, alpha=alpha, beta=beta)]
    return offline("dkd", setup, terms)


# --------------------------------------------------------------------------------------------------------- ATKD

ATKD_PRESETS = {
    "dkd": {"base": "dkd", "ce_weight": 1.0},
    "imagenet": {"ce_weight": 1.0},
    "dkd-imagenet-r34-r18": {"base": "dkd", "ce_weight": 1.0, "beta": 0.5, "warmup": 1},
    "cifar-vgg13-vgg8": {"temperature": 3.0},
    "cifar-res110-res20": {"temperature": 4.0, "kd_weight": 12.0},
    "cifar-res50-mv2": {"temperature": 3.0, "kd_weight": 1.0},
}
STANDARDIZED_BASES = ("kd", "dkd")


@register("atkd", category="response",
          paper="Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation. CVPR 2024",
          presets=ATKD_PRESETS)
def atkd(setup: Setup, base: str = "kd", temperature: float = 2.0, kd_weight: float = 9.0, ce_weight: float = 0.1,
         alpha: float = 1.0, beta: float = 8.0, warmup: float = 20) -> Recipe:
    """Logit-standardised KD: ``ce_weight·CE + kd_weight·T²·KL(softmax(Z(z_t)/T) ‖ softmax(Z(z_s)/T))`` with
    ``Z(z) = (z − mean z)/(std z + 1e-7)`` per sample (unbiased std), :func:`kdkernels.logit_standardized_kd_loss`.

    Provenance: sunshangquan/logit-standardization-KD @f6e5aa5, ``mdistiller/distillers/KD.py`` / ``DKD.py``
    (``normalize``) and ``tools/train.py`` (``--logit-stand --base-temp 2 --kd-weight 9``: T = 2 and weight 9 replace
    the config's; the CE weight stays the config's, 0.1 in ``mdistiller/engine/cfg.py``). ``base="dkd"`` (preset
    ``dkd``) standardises DKD instead: ``CE + min(epoch/warmup, 1)·kd_weight·(alpha·TCKD + beta·NCKD)`` (train.py
    multiplies alpha and beta by the weight; T = 2; alpha 1, beta 8, warmup 20 from cfg.py). Presets ``imagenet``
    (``r34_r18/kd.yaml``: CE weight 1) and ``dkd-imagenet-r34-r18`` (``r34_r18/dkd.yaml``: beta 0.5, warm-up 1);
    the ``cifar-*`` presets take (T, weight) from the names of the repository's KD logs
    (``KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT``), not from a config file.
    """
    if base not in STANDARDIZED_BASES:
        raise ValueError(f"atkd: base must be one of {STANDARDIZED_BASES}, got {base!r}")
    if base == "kd":
        distill = FunctionTerm("atkd", kdkernels.logit_standardized_kd_loss, ("student", "teacher"), kd_weight,
                               temperature=temperature)
    else:
        distill = WarmupTerm("atkd", kdkernels.logit_standardized_kd_loss, ("student", "teacher", "target"),
                             kd_weight, warmup=warmup, temperature=temperature, base="dkd", alpha=alpha, beta=beta)
    return offline("atkd", setup, [CrossEntropyTerm("student", ce_weight), distill])


# -------------------------------------------------------------------------------------------------------- FN-KD

@register("fn-kd", category="response",
          paper="Xu, Rui, Li, Gu. Feature Normalized Knowledge Distillation for Image Classification. ECCV 2020",
          approximation="no official code found: the per-sample temperature ‖f_s‖₂/τ, the KL without T², the "
                        "detached norm and the defaults (τ 1, weights 1) are our reading of the paper, unconfirmed")
def fn_kd(setup: Setup, tau: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 1.0,
          student_layer: str | None = None) -> Recipe:
    """FN-KD: ``ce·CE + kd·mean_i KL(softmax(z^t_i/T_i) ‖ softmax(z^s_i/T_i))`` with ``T_i = ‖f_i‖₂/τ``, f_i the
    student's penultimate feature (``kd_points.embedding``, the classifier's input),
    :func:`kdkernels.feature_normalized_kd_loss`.

    Provenance: the paper (Xu et al., ECCV 2020) replaces KD's one temperature by a sample-specific factor, the L2
    norm of the penultimate feature; no official code was found, so the exact scaling τ, the absence of T² and the
    weights are our choices (flagged as an approximation).
    """
    setup.require_teacher("fn-kd")
    feature_tap = student_layer or feature_points(setup.student).embedding
    distill = FunctionTerm("fn-kd", kdkernels.feature_normalized_kd_loss,
                           ("student", "teacher", f"student:{feature_tap}"), kd_weight, tau=tau)
    return offline("fn-kd", setup, [CrossEntropyTerm("student", ce_weight), distill])


# --------------------------------------------------------------------------------------------------------- DeiT

DEIT_STUDENTS = "student-vit-distilled (digits) or student-vit-distilled-cifar (CIFAR)"


@register("deit", category="response",
          paper="Touvron, Cord, Douze, Massa, Sablayrolles, Jégou. Training data-efficient image transformers & "
                "distillation through attention. ICML 2021",
          presets={"hard": {"distillation_type": "hard"}, "soft": {"distillation_type": "soft"}},
          default_student="student-vit-distilled")
def deit(setup: Setup, distillation_type: str = "hard", alpha: float = 0.5, temperature: float = 1.0) -> Recipe:
    """DeiT: ``(1 − α)·CE(z_cls, y) + α·D`` through the distillation token, :func:`kdkernels.deit_loss`; hard
    ``D = CE(z_dist, argmax z_t)``, soft ``D = T²·KL(softmax(z_t/T) ‖ softmax(z_dist/T))`` summed / (B·C).

    Provenance: facebookresearch/deit @7e160fe ``losses.py`` ``DistillationLoss`` (the formula; defaults from
    ``main.py``: ``--distillation-type`` 'none' (here 'hard', the paper's best and our default),
    ``--distillation-alpha`` 0.5, ``--distillation-tau`` 1.0) and ``models.py`` ``DistilledVisionTransformer`` (a
    distillation token beside the class token, its own head ``head_dist``; at test time the mean of the two heads).
    The student must be such a ViT: the zoo's ``student-vit-distilled`` (its forward is the mean of the heads; the
    method reads the heads apart, the taps ``head`` (the student's ``kd_points.classifier``) and ``head_dist``). The
    teacher is any classifier (the paper's best: a convnet; here the digits ``teacher-cnn``), frozen. Presets
    ``hard`` (default) and ``soft``; ``distillation_type="none"`` is the official CE-only baseline of the same model.
    The base criterion is CE on the labels; the official recipe's default base criterion, soft-target CE under its
    MixUp/CutMix (or label smoothing 0.1 without them), belongs to the training recipe, not to ``DistillationLoss``:
    the trainer's ``--mixup`` gives the soft-target form (the term averages over both labels). ViT students train
    with AdamW as DeiT's recipe does (``--optimizer adamw``; the digits recipe's SGD barely moves them).
    """
    check = Checks("deit")
    distillation_type = check.choice("distillation_type", distillation_type, DEIT_DISTILLATION_TYPES)
    alpha = check.probability("alpha", alpha)
    temperature = check.temperature(temperature)
    setup.require_teacher("deit")
    student = setup.student
    if not isinstance(getattr(student, "head_dist", None), nn.Linear):
        raise ValueError(f"method 'deit' trains a ViT with a distillation token and its head `head_dist` (DeiT's "
                         f"DistilledVisionTransformer), got a {type(student).__name__}: pass --student "
                         f"{DEIT_STUDENTS}")
    classifier = feature_points(student).classifier
    term = HardLabelTerm("deit", kdkernels.deit_loss, (f"student:{classifier}", "student:head_dist", "teacher",
                                                       "target"),
                         distillation_type=distillation_type, alpha=alpha, temperature=temperature)
    return offline("deit", setup, [term])


# --------------------------------------------------------------------------------------------------------- SCKD

class CosineThreshold:
    """SCKD's switch γ on the detached gradient cosine: 1 when ``cos ≥ threshold``, else 0 (the KD term is left out
    of that step)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, cosine: torch.Tensor) -> torch.Tensor:
        return (cosine >= self.threshold).to(cosine.dtype)

    def __repr__(self) -> str:
        return f"CosineThreshold({self.threshold:g})"


SCKD_APPROXIMATION = ("no official code found, and the paper's text was not available here: the rule (per step, "
                      "KD kept iff cos(∇_θ KD, ∇_θ CE) ≥ φ over all of the student's parameters, φ = 0) is taken from "
                      "a summary of the paper; the base KD's T and weights are the kd method's (ours)")


@register("sckd", category="response",
          paper="Zhu, Wang. Student Customized Knowledge Distillation: Bridging the Gap Between Student and Teacher. "
                "ICCV 2021",
          presets={"imagenet": {"temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5}},
          approximation=SCKD_APPROXIMATION)
def sckd(setup: Setup, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
         threshold: float = 0.0) -> Recipe:
    """SCKD: ``ce_weight·CE + γ·kd_weight·T²·KL(p_t ‖ p_s)`` with, at every step, ``γ = 1[cos(∇_θ KD, ∇_θ CE) ≥
    threshold]``: the distillation task is kept only while its gradient agrees with the task's (KD as multi-task
    learning: the teacher teaches only what the student can benefit from), through
    :class:`~kdkernels.distill.term_gradients.GradientSimilarityGate` (θ: every trainable parameter of the student,
    the parameters both tasks share; the cosine of the flattened gradients from the step's own graph, no second
    forward; the gate's last cosine is in ``gate.last_cosine``). The loss is plain KD (:func:`kdkernels.kd_loss`):
    SCKD adds no loss of its own, only the switch.

    Provenance: Zhu & Wang, ICCV 2021; no official code was found (searches of the code, page and issue stores for
    the title, "SCKD" and gradient-similarity KD). The rule — a binary switch γ ∈ {0, 1} per KD loss and iteration,
    off when the cosine similarity of the KD loss's and the student loss's gradients falls below φ, φ = 0 the
    paper's best setting — comes from a summary of the paper, not its text; the base KD's temperature and weights
    are those of the ``kd`` method (mdistiller defaults; preset ``imagenet`` as kd's), our choice (approximation flag).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1.0 <= threshold <= 1.0:
        raise ValueError(f"sckd: threshold must be a cosine in [-1, 1], got {threshold!r}")
    distill = FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), kd_weight, temperature=temperature)
    gated = GradientSimilarityGate(distill, reference=CrossEntropyTerm("student"), of="student",
                                   gate=CosineThreshold(float(threshold)))
    return offline("sckd", setup, [CrossEntropyTerm("student", ce_weight), gated])


# ------------------------------------------------------------------------------------------------ NKD and tf-NKD

@register("nkd", category="response",
          paper="Yang, Zeng, Li, Zhang, Yuan, Li. From Knowledge Distillation to Self-Knowledge Distillation: "
                "A Unified Approach with Normalized Loss and Customized Soft Labels. ICCV 2023")
def nkd(setup: Setup, temperature: float = 1.0, gamma: float = 1.5, ce_weight: float = 1.0,
        nkd_weight: float = 1.0) -> Recipe:
    """NKD: ``CE − mean_b p_t[y]·log p_s[y] − gamma·T²·mean_b Σ_{c≠y} q_t log q_s``, yzd-v/cls_KD ``nkd.py`` @9466b3f.

    ``q`` are the softmaxes over the non-target classes at temperature T; defaults ``temp=1, gamma=1.5`` from
    ``res34_distill_res18_img.py``. Under MixUp the labels are the mixed soft labels, reduced by argmax as cls_KD.
    """
    terms = [CrossEntropyTerm("student", ce_weight),
             SoftLabelTerm("nkd", kdkernels.nkd_loss, ("student", "teacher", "target"), nkd_weight,
                       temperature=temperature, gamma=gamma)]
    return offline("nkd", setup, terms)


@register("tf-nkd", category="response", needs_teacher=False,
          paper="Yang, Zeng, Li, Zhang, Yuan, Li. Rethinking Knowledge Distillation via Cross-Entropy. "
                "arXiv:2208.10139, 2022")
def tf_nkd(setup: Setup, ce_weight: float = 1.0, tf_nkd_weight: float = 1.0) -> Recipe:
    """Teacher-free NKD: ``CE − mean_b w_t·log p_s[y]``, ``w_t = p_s[y] + 1 − mean_b p_s[y]`` (detached), cls_KD
    ``classification_distiller.py`` @8a16562 (``tf_nkd=True``); under MixUp the top-2 mixed labels, as coded."""
    terms = [CrossEntropyTerm("student", ce_weight),
             SoftLabelTerm("tf_nkd", kdkernels.tf_nkd_loss, ("student", "target"), tf_nkd_weight)]
    return teacher_free("tf-nkd", setup, terms)


# --------------------------------------------------------------------------------------------------------- DIST

@register("dist", category="response",
          paper="Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher. NeurIPS 2022",
          presets={"cifar": {"temperature": 4.0}})
def dist(setup: Setup, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0, ce_weight: float = 1.0,
         kd_weight: float = 2.0) -> Recipe:
    """DIST: ``ce_weight·CE + kd_weight·T²·(beta·(1 − inter Pearson) + gamma·(1 − intra Pearson))``, DIST_KD
    ``dist_kd.py``; defaults ``kd='dist'`` with ``kd_loss_weight 2`` (``resnet_dist.yaml``); preset ``cifar`` is
    ``dist_t4`` (T = 4) with the same weights (``dist_cifar.yaml``)."""
    terms = [CrossEntropyTerm("student", ce_weight),
             FunctionTerm("dist", kdkernels.dist_loss, ("student", "teacher"), kd_weight, temperature=temperature,
                          beta=beta, gamma=gamma)]
    return offline("dist", setup, terms)


# -------------------------------------------------------------------------------------------------------- Tf-KD

TF_KD_PAPER = ("Yuan, Tay, Li, Wang, Feng. Revisiting Knowledge Distillation via Label Smoothing Regularization. "
               "CVPR 2020")


@register("tfkd-self", category="self", paper=TF_KD_PAPER, teacher_architecture="student")
def tfkd_self(setup: Setup, alpha: float = 0.95, temperature: float = 6.0, multiplier: float = 50.0) -> Recipe:
    """Tf-KD self: ``(1−α)·CE + α·multiplier·T²·KL(p_t ‖ p_s)`` with the KL an ELEMENT mean over B·C, as coded.

    yuanli2333/Teacher-free-Knowledge-Distillation ``my_loss_function.py::loss_kd_self`` uses ``nn.KLDivLoss()``,
    whose default ``reduction='mean'`` divides by ``B·C`` (C times smaller than the batchmean of Hinton KD in
    mdistiller; the ``multiplier`` compensates), so this calls ``kd_loss(reduction="mean")``. The teacher
    (``setup.teacher``) is a pretrained copy of the student's own architecture. Defaults from
    ``resnet18_self_teacher/params.json``: alpha 0.95, T 6, multiplier 50.
    """
    terms = [CrossEntropyTerm("student", 1.0 - alpha),
             FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), alpha * multiplier,
                          temperature=temperature, reduction="mean")]
    return offline("tfkd-self", setup, terms)


@register("tfkd-reg", category="response", paper=TF_KD_PAPER, needs_teacher=False, presets={
    "mobilenetv2": {"temperature": 40.0, "alpha": 0.95, "multiplier": 1.0},
    "shufflenetv2": {"temperature": 10.0, "alpha": 0.95, "multiplier": 1.0},
    "googlenet": {"temperature": 40.0, "alpha": 0.1, "multiplier": 50.0}})
def tfkd_reg(setup: Setup, alpha: float = 0.1, temperature: float = 20.0, multiplier: float = 100.0,
             correct_prob: float = 0.99) -> Recipe:
    """Tf-KD reg AS CODED: ``(1−α)·CE + α·multiplier·KLDiv_mean(log_softmax(z_s), softmax(q/T))``, q a probability
    vector (``correct_prob`` on y), ``my_loss_function.py::loss_kd_regularization``.

    Documented as such: ``softmax(q/T)`` of a probability vector is nearly uniform, so as coded the "virtual
    teacher" is effectively a near-uniform (maximum-entropy) prior, with no temperature on the student and no T²
    (see :func:`kdkernels.tf_kd_reg_loss`). Defaults are ``base_resnet18/params.json`` (T 20, alpha 0.1,
    multiplier 100); presets the other ``experiments/base_experiments`` architectures.
    """
    terms = [CrossEntropyTerm("student", 1.0 - alpha),
             HardLabelTerm("tf_kd_reg", kdkernels.tf_kd_reg_loss, ("student", "target"), alpha,
                          temperature=temperature, correct_prob=correct_prob, multiplier=multiplier)]
    return teacher_free("tfkd-reg", setup, terms)


# ---------------------------------------------------------------------------------------------- label smoothing

@register("label-smoothing", category="response", needs_teacher=False,
          paper="Müller, Kornblith, Hinton. When Does Label Smoothing Help? NeurIPS 2019",
          presets={"others": {"convention": "others"}})
def label_smoothing(setup: Setup, epsilon: float = 0.1, convention: str = "uniform") -> Recipe:
    """Label smoothing: CE against ``(1−ε)·onehot + ε/C`` (``uniform``: Müller et al., timm) or ``1−ε`` on y and
    ``ε/(C−1)`` elsewhere (``others``: Tf-KD ``loss_label_smoothing``, zipfls, Self-KD-Lib)."""
    if convention not in LABEL_SMOOTHING_CONVENTIONS:
        raise ValueError(f"label-smoothing: convention must be one of {LABEL_SMOOTHING_CONVENTIONS}, "
                         f"got {convention!r}")
    terms = [HardLabelTerm("label_smoothing", kdkernels.label_smoothing_loss, ("student", "target"),
                          epsilon=epsilon, convention=convention)]
    return teacher_free("label-smoothing", setup, terms)


# --------------------------------------------------------------------------------------- Zipf's label smoothing

UPSAMPLE_MODES = (None, "bilinear", "bicubic")


class ZipfTerm(Term):
    """Zipf's label smoothing: the student's classifier applied at every location of its last feature map votes
    for a class ranking, whose Zipf distribution is the non-target soft label (:func:`kdkernels.zipf_ls_loss`).

    The classifier is held by reference, outside the term's submodules, so its parameters are neither duplicated
    in the state dict nor optimised twice."""

    def __init__(self, feature: str, classifier: nn.Module, weight: float, *, power: float, mask: bool,
                 upsample: str | None):
        super().__init__("zipf", ("student", feature, "target"), weight)
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"term 'zipf': upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self._classifier = [classifier]
        self.power, self.mask, self.upsample = power, mask, upsample

    def build(self, example):
        logits, feature = example["student"], example[self.reads[1]]
        if feature.dim() not in (3, 4):
            raise ValueError(f"term 'zipf': {self.reads[1]!r} must be a feature map [B, C, H, W] (or tokens "
                             f"[B, L, D]) for dense voting, got shape {tuple(feature.shape)}")
        dense = self.dense_logits(feature)
        if dense.shape[-1] != logits.shape[-1]:
            raise ValueError(f"term 'zipf': the classifier applied to {self.reads[1]!r} gives {dense.shape[-1]} "
                             f"classes but 'student' has {logits.shape[-1]}")

    def locations(self, feature: torch.Tensor) -> torch.Tensor:
        """[B, L, D] per-location features (upsampled ×2 first when ``upsample`` names a mode, as zipfls)."""
        if feature.dim() == 3:
            return feature
        if self.upsample is not None:
            feature = F.interpolate(feature, scale_factor=2.0, mode=self.upsample)
        return feature.flatten(2).transpose(1, 2)

    def dense_logits(self, feature: torch.Tensor) -> torch.Tensor:
        locations = self.locations(feature)
        classifier = self._classifier[0]
        in_features = getattr(classifier, "in_features", None)
        if in_features is not None and in_features != locations.shape[-1]:
            raise ValueError(f"term 'zipf': {self.reads[1]!r} has {locations.shape[-1]} channels but the classifier "
                             f"takes {in_features}: pass feature_layer= the map that the classifier pools")
        with torch.no_grad():
            return classifier(locations)

    def loss(self, logits, feature, target, *, context):
        dense = self.dense_logits(feature).float()
        return mixup_average(lambda labels: kdkernels.zipf_ls_loss(logits, dense, labels, power=self.power,
                                                                    mask=self.mask), target, context)


@register("zipf-ls", category="response", needs_teacher=False,
          paper="Liang, Li, Zhou, Yang, Li, Wang, Hu, Xu, Wen, Wu. Efficient One Pass Self-distillation with "
                "Zipf's Label Smoothing. ECCV 2022",
          presets={"tiny-imagenet": {"loss_lambda": 1.0},
                   "imagenet": {"loss_lambda": 0.1, "upsample": None},
                   "inat21": {"loss_lambda": 1.0, "upsample": None}})
def zipf_ls(setup: Setup, loss_lambda: float = 0.1, power: float = 1.0, mask: bool = False,
            upsample: str | None = "bilinear", feature_layer: str | None = None,
            classifier: str | None = None) -> Recipe:
    """Zipf's label smoothing: ``CE + loss_lambda·KL(zipf(rank of dense votes) ‖ p_s over non-targets)``,
    megvii-research/zipfls ``pytorch_zipfls/losses.py`` + ``train.py`` (``--dense``, ``rank='hard'``).

    Defaults are the README's CIFAR command (``--loss_lambda 0.1 --dense --upsample bilinear``); presets the
    TinyImageNet (1.0, bilinear), ImageNet (0.1, no upsampling) and iNat21 (1.0) commands. ``feature_layer`` is the
    last stage map (default: the student's last ``kd_points`` stage) and ``classifier`` the linear head applied at
    each of its locations (default: ``kd_points.classifier``).
    """
    feature_layer = feature_layer or stage_tap("zipf-ls", setup.student, -1, "feature_layer")
    classifier = classifier or feature_points(setup.student).classifier
    head = find_module(setup.student, classifier, "student")
    terms = [CrossEntropyTerm("student", 1.0),
             ZipfTerm(f"student:{feature_layer}", head, loss_lambda, power=power, mask=mask, upsample=upsample)]
    return teacher_free("zipf-ls", setup, terms)


# --------------------------------------------------------------------------------------------------------- SSLD

@register("ssld", category="response",
          paper="Cui, Guo, Du, et al. Beyond Self-Supervision: A Simple Yet Effective Network Distillation "
                "Alternative to Improve Backbones. arXiv:2103.05959, 2021")
def ssld(setup: Setup, temperature: float = 1.0, weight: float = 1.0) -> Recipe:
    """SSLD, label-free: ``(KL(p_t ‖ p_s) + KL(p_s ‖ p_t)) / 2`` per-sample sum / B, PaddleClas ``DMLLoss``.

    No label term (``PPLCNet_x2_5_ssld.yaml`` has only ``DistillationDMLLoss``), so it trains on unlabeled batches;
    the frozen teacher keeps its batch norm in train mode, as the SSLD docs say.
    """
    terms = [FunctionTerm("ssld", kdkernels.kd_loss, ("student", "teacher"), weight, temperature=temperature,
                          divergence="symmetric")]
    return offline("ssld", setup, terms, frozen_train_mode=True)


# ---------------------------------------------------------------------------------------------------------- WSL

@register("wsl", category="response",
          paper="Zhou, Song, Chen, Zhou, Wang, Yuan, Zhang. Rethinking Soft Labels for Knowledge Distillation: "
                "A Bias-Variance Tradeoff Perspective. ICLR 2021")
def wsl(setup: Setup, temperature: float = 2.0, wsl_weight: float = 2.5, ce_weight: float = 1.0) -> Recipe:
    """WSL: ``CE + 2.5·T²·mean_b w_b·softCE(p_t, p_s)``, ``w = 1 − exp(−CE_s/CE_t)``, PaddleClas ``wslloss.py``
    (``resnet34_distill_resnet18_wsl.yaml``: T 2, weight 2.5)."""
    terms = [CrossEntropyTerm("student", ce_weight),
             HardLabelTerm("wsl", kdkernels.wsl_loss, ("student", "teacher", "target"), wsl_weight,
                          temperature=temperature)]
    return offline("wsl", setup, terms)

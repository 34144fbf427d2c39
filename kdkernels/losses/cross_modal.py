"""Cross-modal and privileged distillation losses (plain PyTorch; each function IS the reference of its method).

The teacher reads one modality of a sample (the privileged, clean or labelled one), the student another (the one
available at test time); the losses only see their outputs, so they are ordinary tensors here (see
:mod:`kdkernels.distill.modalities` for the paired views the trainer gives each model).

* :func:`privileged_loss` — generalised distillation / learning using privileged information (Lopez-Paz et al.,
  ICLR 2016): ``(1 − λ)·CE(y, σ(z_s)) + λ·T²·CE(σ(z_t / T), σ(z_s))``;
* :func:`supervision_transfer_loss` — cross-modal supervision transfer (Gupta, Hoffman, Malik, CVPR 2016): the L2
  regression of the teacher modality's mid-level features, ``Σ_b ½‖φ_s(x_b) − φ_t(x*_b)‖² / B``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels._validation import Checks, Reduction, SampleReduction
from kdkernels.losses._common import accumulate, reduce_rows, soft_cross_entropy_rows


def privileged_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0, imitation: float = 1.0, *,
                    reduction: Reduction = "batchmean") -> torch.Tensor:
    """Generalised distillation (Lopez-Paz, Bottou, Schölkopf, Vapnik, ICLR 2016, "Unifying distillation and
    privileged information", Eq. 2 and §4), as the authors' code (lopezpaz/distillation_privileged_information
    @cdc4cae ``code/mnist.py`` ``distillation``: a ``hard`` and a ``soft`` softmax output of the same logits, Keras
    ``categorical_crossentropy`` weighted ``1 − l`` and ``t·t·l``)::

        loss = mean_b [ (1 − λ)·(−log σ(z_s)_{b,y_b}) + λ·T²·(−Σ_c s_bc log σ(z_s)_bc) ],   s = σ(z_t / T)

    ``z_s``: the student's logits on its regular features x (e.g. a degraded image); ``z_t``: the teacher's logits on
    the privileged features x* (the clean image); the soft labels ``s`` are constants (computed once by the official
    code; detached here). The student's softmax is NOT tempered (the paper's σ(f(x_i)) in both terms); the T² factor
    is the official code's (the paper's Eq. 2 omits it). ``imitation`` λ ∈ [0, 1]: 0 is the student trained on its
    own features alone, 1 pure imitation of the teacher. Defaults T = λ = 1, the paper's §5 simulations
    (``code/synthetic.py``: ``t = 1``, ``l = 1``). ``reduction`` over samples: ``"batchmean"`` (above), ``"sum"``,
    ``"mean"`` (over samples · C) or ``"none"`` ([B]).
    """
    check = Checks("privileged_loss")
    check.logits_pair(student_logits, teacher_logits, dims=(2,))
    temperature = check.temperature(temperature)
    imitation = check.probability("imitation", imitation)
    reduction = check.reduction(reduction)
    targets = check.class_labels(labels, student_logits)
    student = accumulate(student_logits)
    log_p = F.log_softmax(student, dim=1)
    with torch.no_grad():
        soft = F.softmax(accumulate(teacher_logits).to(student.dtype) / temperature, dim=1)
    hard = -log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    rows = (1.0 - imitation) * hard + imitation * temperature ** 2 * soft_cross_entropy_rows(soft, log_p)
    return reduce_rows(rows, reduction, elements=student_logits.shape[1])


def supervision_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, *,
                              reduction: SampleReduction = "batchmean") -> torch.Tensor:
    """Cross-modal supervision transfer (Gupta, Hoffman, Malik, CVPR 2016, "Cross Modal Distillation for
    Supervision Transfer", §3): the network of the unlabelled modality regresses, on paired samples, the mid-level
    features of the network trained on the labelled modality with an L2 loss::

        loss = Σ_b ½ ‖φ_s(x_b) − φ_t(x*_b)‖² / B

    (the ½ and the division by the batch size are Caffe's ``EuclideanLoss``, the framework of the paper's code; the
    paper states only "L2"). ``student_features``: the student's features (through its connector when the widths
    differ), ``teacher_features`` the teacher's, one shape ``[B, ...]``; the teacher is used as given (detach it).
    ``reduction`` over samples: ``"batchmean"`` (above), ``"sum"`` or ``"none"`` ([B]).
    """
    check = Checks("supervision_transfer_loss")
    check.feature_pair("student_features", student_features, "teacher_features", teacher_features,
                       dims=(2, 3, 4, 5), same_shape=True, hint=" (use a connector to map the student feature)")
    reduction = check.reduction(reduction, allowed=("batchmean", "sum", "none"))
    student = accumulate(student_features)
    difference = student - accumulate(teacher_features).to(student.dtype)
    rows = 0.5 * difference.pow(2).reshape(difference.shape[0], -1).sum(dim=1)
    return reduce_rows(rows, reduction)

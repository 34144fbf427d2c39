"""pcl_loss against PCL's objective transcribed here in eager PyTorch (the reproduction
shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation ``src/losses/loss_wrapper.py``, ``kd_loss.py``;
no official code exists), value and gradients in float64, which inputs receive gradients, and its argument errors."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from losses_testing import assert_equals_official, class_labels, randn

B, C = 8, 10


def logits(count, seed, grad=False):
    return [randn(B, C, seed=seed + k, scale=3.0, grad=grad) for k in range(count)]


# ------------------------------------------------------------------------------------ official formula (eager)

def kd(pred, target, temperature=3.0):
    """``KDLoss``: ``KLDivLoss(batchmean)(log_softmax(pred/T), softmax(target/T)) · T²``."""
    return F.kl_div(F.log_softmax(pred / temperature, dim=1), F.softmax(target / temperature, dim=1),
                    reduction="batchmean") * temperature * temperature


def pm(pred, targets, temperature=3.0):
    """``PMLoss``: the mean of ``KDLoss`` towards each detached target."""
    return sum(kd(pred, target.detach(), temperature) for target in targets) / len(targets)


def pcl_official(peers, en_output, means, label, rampup_weight, temperature=3.0):
    """``LossWrapper.forward`` (``ema=False``) generalised from its three peers to m: the ensemble's CE, and per peer
    ``CE + KD(z_i, z_e.detach())·w + PM(z_i, [mean teachers of the others])·w``."""
    en_label = en_output.detach()
    loss = F.cross_entropy(en_output, label)
    for i, pred in enumerate(peers):
        others = [mean for j, mean in enumerate(means) if j != i]
        loss = loss + (F.cross_entropy(pred, label) + kd(pred, en_label, temperature) * rampup_weight
                       + pm(pred, others, temperature) * rampup_weight)
    return loss


# ------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("m, weight, temperature", [(3, 1.0, 3.0), (3, 0.3, 1.0), (2, 0.0, 3.0), (4, 0.7, 4.0)])
def test_pcl_loss_is_the_official_objective(m, weight, temperature):
    """Value and gradients of every peer and of the ensemble (the mean teachers require grad too: they get none)."""
    peers, means = logits(m, seed=10, grad=True), logits(m, seed=30, grad=True)
    ensemble = randn(B, C, seed=50, scale=3.0, grad=True)
    y = class_labels(B, C, seed=4)
    assert_equals_official(
        lambda ps, e, ms: kdkernels.pcl_loss(ps, e, ms, y, temperature, weight),
        lambda ps, e, ms: pcl_official(ps, e, ms, y, weight, temperature), peers, ensemble, means, what="pcl")


def test_pcl_loss_targets_are_detached_and_reductions_agree():
    peers, means = logits(3, seed=10, grad=True), logits(3, seed=30, grad=True)
    ensemble = randn(B, C, seed=50, scale=3.0, grad=True)
    y = class_labels(B, C, seed=4)
    kl_only = kdkernels.pcl_loss(peers, ensemble, means, y, 3.0, 1.0) - kdkernels.pcl_loss(peers, ensemble, means, y,
                                                                                           3.0, 0.0)
    assert kl_only > 0
    grads = torch.autograd.grad(kl_only, [ensemble, *means, *peers], allow_unused=True)
    assert all(g is None or g.abs().max() < 1e-12 for g in grads[:4]), "no gradient into the KL targets"
    assert all(g.abs().max() > 0 for g in grads[4:]), "every peer learns from the KL terms"
    # peer 0 is taught by the mean teachers of peers 1 and 2, not by its own
    swapped = [means[1], means[0], means[2]]
    own = torch.autograd.grad(kdkernels.pcl_loss(peers, ensemble, means, y), peers[0])[0]
    other = torch.autograd.grad(kdkernels.pcl_loss(peers, ensemble, swapped, y), peers[0])[0]
    assert not torch.allclose(own, other)
    rows = kdkernels.pcl_loss(peers, ensemble, means, y, reduction="none")
    assert rows.shape == (B,)
    torch.testing.assert_close(rows.sum(), kdkernels.pcl_loss(peers, ensemble, means, y, reduction="sum"))
    torch.testing.assert_close(rows.mean(), kdkernels.pcl_loss(peers, ensemble, means, y))
    torch.testing.assert_close(rows.mean() / C, kdkernels.pcl_loss(peers, ensemble, means, y, reduction="mean"))
    low = kdkernels.pcl_loss([p.to(torch.bfloat16) for p in peers], ensemble.half(), [m.float() for m in means], y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), kdkernels.pcl_loss(peers, ensemble, means, y), rtol=2e-2, atol=0)


def _z(*shape):
    return torch.randn(*shape)


LABELS = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.pcl_loss([_z(4, 10)], _z(4, 10), [_z(4, 10)], LABELS),
     ValueError, r"^pcl_loss: peer_logits must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.pcl_loss(_z(4, 10), _z(4, 10), [_z(4, 10)] * 2, LABELS),
     TypeError, r"^pcl_loss: peer_logits must be a list or tuple of tensors"),
    (lambda: kdkernels.pcl_loss([_z(4, 10), _z(4, 9)], _z(4, 10), [_z(4, 10)] * 2, LABELS),
     ValueError, r"^pcl_loss: peer_logits\[1\] must have the same shape as peer_logits\[0\]"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 9), [_z(4, 10)] * 2, LABELS),
     ValueError, r"^pcl_loss: ensemble_logits must have the same shape as peer_logits\[0\]"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10)] * 3, LABELS),
     ValueError, r"^pcl_loss: mean_logits must hold one temporal-mean output per peer \(2\), got 3$"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10), _z(3, 10)], LABELS),
     ValueError, r"^pcl_loss: mean_logits\[1\] must have the same shape as peer_logits\[0\]"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10)] * 2, LABELS, 0.0),
     ValueError, r"^pcl_loss: temperature must be positive and finite, got 0.0$"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10)] * 2, LABELS, 3.0, -1.0),
     ValueError, r"^pcl_loss: kl_weight must be >= 0 and finite, got -1.0$"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, torch.ones(4, 10, dtype=torch.long), [_z(4, 10)] * 2, LABELS),
     TypeError, r"^pcl_loss: ensemble_logits must be"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10)] * 2, torch.full((4,), 10)),
     ValueError, r"^pcl_loss: labels"),
    (lambda: kdkernels.pcl_loss([_z(4, 10)] * 2, _z(4, 10), [_z(4, 10)] * 2, LABELS, reduction="avg"),
     ValueError, r"^pcl_loss: reduction must be one of"),
])
def test_pcl_loss_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()

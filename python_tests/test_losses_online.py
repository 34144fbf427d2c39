"""pcl_loss against PCL's objective transcribed here in eager PyTorch (the reproduction
shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation ``src/losses/loss_wrapper.py``, ``kd_loss.py``;
no official code exists) and mcl_loss against winycg/MCL ``losses/cifar_sup_mcl_loss.py``: value and gradients in
float64, which inputs receive gradients, and their argument errors."""
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


# ---- MCL -----------------------------------------------------------------------------------------------------------

def kl_div(y_s, y_t, T):
    """winycg/MCL ``KLDiv``."""
    return F.kl_div(F.log_softmax(y_s / T, dim=1), F.softmax(y_t / T, dim=1), reduction="batchmean") * (T ** 2)


def sup_mcl_official(embeddings, labels, tau=0.1, kd_T=3.0, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0):
    """winycg/MCL ``Sup_MCL_Loss.forward`` (``Embed``'s ``Normalize``) then ``SupMCL.forward``, weighted as
    ``main_cifar.py``: ``alpha·vcl + gamma·soft_vcl + beta·icl + lam·soft_icl`` (CPU instead of ``.cuda()``)."""
    embeddings = [x.div(x.pow(2).sum(1, keepdim=True).pow(0.5)) for x in embeddings]
    number_net = len(embeddings)
    labels = labels.unsqueeze(0)
    intra_mask = torch.eq(labels, labels.T).double() - torch.eye(labels.size(1), dtype=torch.float64)
    diag_mask = 1. - torch.eye(labels.size(1), dtype=torch.float64)
    inter_logits = []
    soft_icl_loss = 0.
    for i in range(number_net):
        for j in range(i + 1, number_net):
            cos_simi_ij = torch.div(torch.mm(embeddings[i], embeddings[j].T), tau)
            inter_logits.append(cos_simi_ij)
            cos_simi_ji = torch.div(torch.mm(embeddings[j], embeddings[i].T), tau)
            inter_logits.append(cos_simi_ji)
            soft_icl_loss += kl_div(cos_simi_ij, cos_simi_ji.detach(), kd_T)
            soft_icl_loss += kl_div(cos_simi_ji, cos_simi_ij.detach(), kd_T)
    icl_loss = 0.
    for logit in inter_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        icl_loss += - mean_log_prob_pos.mean()
    intra_logits = [torch.div(torch.mm(embeddings[i], embeddings[i].T), tau) for i in range(number_net)]
    soft_vcl_loss = 0.
    for i in range(number_net):
        for j in range(number_net):
            if i != j:
                soft_vcl_loss += kl_div(intra_logits[i], intra_logits[j].detach(), kd_T)
    vcl_loss = 0.
    for logit in intra_logits:
        log_prob = logit - torch.log((torch.exp(logit) * diag_mask).sum(1, keepdim=True))
        mean_log_prob_pos = (intra_mask * log_prob).sum(1) / intra_mask.sum(1)
        vcl_loss += - mean_log_prob_pos.mean()
    return alpha * vcl_loss + gamma * soft_vcl_loss + beta * icl_loss + lam * soft_icl_loss


def paired_labels(pairs, classes=4, seed=0):
    """Every class present at least twice (MPerClassSampler m = 2): the official formula is defined."""
    first = class_labels(pairs, classes, seed)
    return torch.cat([first, first[torch.randperm(pairs, generator=torch.Generator().manual_seed(seed + 1))]])


@pytest.mark.parametrize("m, weights, tau, kd_T", [
    (2, (0.1, 1.0, 0.1, 1.0), 0.1, 3.0), (3, (0.1, 1.0, 0.1, 1.0), 0.1, 3.0), (2, (1.0, 0.0, 0.5, 0.0), 0.5, 1.0),
    (4, (0.0, 0.3, 0.0, 2.0), 0.07, 4.0)])
def test_mcl_loss_is_the_official_objective(m, weights, tau, kd_T):
    """Value and gradients of every network's embedding (un-normalised: the loss normalises as ``Embed`` does)."""
    embeddings = [randn(B, 6, seed=60 + k, scale=2.0, grad=True) for k in range(m)]
    y = paired_labels(B // 2)
    assert_equals_official(
        lambda *es: kdkernels.mcl_loss(list(es), y, tau, kd_T, *weights),
        lambda *es: sup_mcl_official(list(es), y, tau, kd_T, *weights), *embeddings, what="mcl")


def test_mcl_loss_soft_targets_are_detached_and_reductions_agree():
    e1, e2 = randn(B, 6, seed=60, grad=True), randn(B, 6, seed=61, grad=True)
    y = paired_labels(B // 2)
    soft_vcl = kdkernels.mcl_loss([e1, e2], y, vcl_weight=0.0, icl_weight=0.0, soft_icl_weight=0.0)
    # soft VCL: network 1's relation rows learn towards network 2's and back; each gradient comes from its own KL
    g1 = torch.autograd.grad(soft_vcl, e1, retain_graph=True)[0]
    alone = torch.autograd.grad(kl_div(*(lambda a, b: (a @ a.t() / 0.1, (b @ b.t() / 0.1).detach()))(
        F.normalize(e1, dim=1), F.normalize(e2, dim=1)), 3.0), e1)[0]
    torch.testing.assert_close(g1, alone)
    rows = kdkernels.mcl_loss([e1, e2], y, reduction="none")
    assert rows.shape == (B,)
    torch.testing.assert_close(rows.sum(), kdkernels.mcl_loss([e1, e2], y, reduction="sum"))
    torch.testing.assert_close(rows.mean(), kdkernels.mcl_loss([e1, e2], y))
    # an anchor without a same-class partner contributes no contrastive term (the official code would divide 0 by 0)
    lonely = torch.cat([y[:-1], torch.tensor([9])])
    assert torch.isfinite(kdkernels.mcl_loss([e1, e2], lonely))
    low = kdkernels.mcl_loss([e1.to(torch.bfloat16), e2.half()], y)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), kdkernels.mcl_loss([e1, e2], y), rtol=3e-2, atol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.mcl_loss([_z(4, 5)], LABELS), ValueError,
     r"^mcl_loss: embeddings must hold at least 2 tensor\(s\), got 1$"),
    (lambda: kdkernels.mcl_loss(_z(4, 5), LABELS), TypeError, r"^mcl_loss: embeddings must be a list or tuple"),
    (lambda: kdkernels.mcl_loss([_z(4, 5), _z(4, 6)], LABELS), ValueError,
     r"^mcl_loss: embeddings\[1\] must have the same shape as embeddings\[0\]"),
    (lambda: kdkernels.mcl_loss([_z(4, 5, 2), _z(4, 5, 2)], LABELS), ValueError, r"^mcl_loss: embeddings\[0\] must"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS, 0.0), ValueError,
     r"^mcl_loss: temperature must be positive and finite, got 0.0$"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS, 0.1, -3.0), ValueError,
     r"^mcl_loss: kl_temperature must be positive and finite, got -3.0$"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS, icl_weight=-1.0), ValueError,
     r"^mcl_loss: icl_weight must be >= 0 and finite, got -1.0$"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS.float()), TypeError, r"^mcl_loss: labels must be"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS[:3]), ValueError, r"^mcl_loss: labels must have"),
    (lambda: kdkernels.mcl_loss([_z(4, 5)] * 2, LABELS, reduction="mean"), ValueError,
     r"^mcl_loss: reduction must be one of"),
])
def test_mcl_loss_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()

"""darkrank_loss against lenscloth/RKD's HardDarkRank transcribed here in eager PyTorch, value and gradients in
float64 (list lengths longer than the batch, other scores, features of any shape), and its argument errors."""
import pytest
import torch

import kdkernels
from losses_testing import assert_equals_official, randn


def pdist(e, squared=False, eps=1e-12):
    """lenscloth/RKD ``metric/utils.py::pdist``."""
    e = e.reshape(e.shape[0], -1)
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        res = res.sqrt()
    res = res.clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def official_darkrank(s, t, alpha=3.0, beta=3.0, permute_len=4):
    """lenscloth/RKD ``metric/loss.py::HardDarkRank``."""
    score_t = -1 * alpha * pdist(t).pow(beta)
    score_s = -1 * alpha * pdist(s).pow(beta)
    idx = score_t.sort(dim=1, descending=True)[1][:, 1:permute_len + 1]
    ordered = torch.gather(score_s, 1, idx)
    log_prob = (ordered - torch.stack([torch.logsumexp(ordered[:, i:], dim=1) for i in range(idx.size(1))],
                                      dim=1)).sum(dim=1)
    return (-1 * log_prob).mean()


@pytest.mark.parametrize("alpha, beta, list_length", [(3.0, 3.0, 4), (2.0, 3.0, 4), (1.0, 2.0, 2), (0.5, 1.0, 8)])
@pytest.mark.parametrize("shapes", [((12, 6), (12, 9)), ((8, 3, 2, 2), (8, 5)), ((3, 5), (3, 5))],
                         ids=["unequal-widths", "maps-flattened", "batch-shorter-than-the-list"])
def test_darkrank_is_lenscloth_hard_darkrank(shapes, alpha, beta, list_length):
    """The teacher only orders the samples: it gets no gradient."""
    student = randn(*shapes[0], seed=1, grad=True)
    teacher = randn(*shapes[1], seed=2, scale=2.0, grad=True)
    assert_equals_official(lambda s, t: kdkernels.darkrank_loss(s, t, alpha, beta, list_length),
                           lambda s, t: official_darkrank(s, t, alpha, beta, list_length), student, teacher,
                           what="darkrank")


def test_darkrank_rows_are_per_anchor_log_likelihoods():
    student, teacher = randn(10, 4, seed=3), randn(10, 4, seed=4)
    rows = kdkernels.darkrank_loss(student, teacher, reduction="none")
    assert rows.shape == (10,) and (rows > 0).all()
    torch.testing.assert_close(rows.mean(), official_darkrank(student, teacher), rtol=1e-12, atol=0)


X = torch.randn(4, 3)


@pytest.mark.parametrize("call, error, match", [
    (lambda: kdkernels.darkrank_loss(X, X, list_length=0), ValueError,
     r"^darkrank_loss: list_length must be an int >= 1, got 0$"),
    (lambda: kdkernels.darkrank_loss(X, X, list_length=2.0), TypeError,
     r"^darkrank_loss: list_length must be an int, got 2.0$"),
    (lambda: kdkernels.darkrank_loss(X[:1], X[:1]), ValueError,
     r"^darkrank_loss: student must hold at least 2 samples \(a ranking needs at least 2 samples\), got a batch "
     r"of 1$"),
    (lambda: kdkernels.darkrank_loss(X, X, beta=0.0), ValueError,
     r"^darkrank_loss: beta must be positive and finite, got 0.0$"),
    (lambda: kdkernels.darkrank_loss(X, torch.randn(5, 3)), ValueError,
     r"^darkrank_loss: teacher must have the same batch size as student \(4, 3\), got shape \(5, 3\)$"),
])
def test_bad_arguments_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()

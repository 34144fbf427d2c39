"""linear_kd_loss (kdkernels/losses/linear_kd.py) against the formula transcribed here with torch ops on materialised
logits, in float64, value and every gradient; against kd_loss on the same logits; gradcheck; the flash-attention
criterion for bf16 inputs; argument validation. Every test runs both algorithms: the token-chunked one (with tiles of
two rows, so that every input spans several tiles) and the materialising reference."""
import itertools
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kdkernels.losses import linear_kd_chunked, linear_kd_streaming
from kd_testing import assert_close_to_reference

TOKENS, H_STUDENT, H_TEACHER, VOCAB, PADDING, TOPK = 6, 5, 4, 11, 3, 4
DIVERGENCES = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd", "symmetric")
KD_LOSS_DIVERGENCES = ("forward", "reverse", "jsd", "symmetric")
TEACHER_NAMES = ("teacher_hidden", "teacher_weight", "teacher_bias")
RTOL = 1e-10


def randn(*shape, seed, scale=1.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)


def ignored_labels(pattern, shape=(TOKENS,), seed=0):
    labels = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))
    if pattern == "some":
        labels.view(-1)[1::3] = -100
    elif pattern == "all":
        labels.fill_(-100)
    return labels


def dense_inputs(*, bias=True, padding=True, ignore="some", leading=(TOKENS,), dtype=torch.float64, seed=0):
    """A dense teacher: hidden states scaled so that the logits spread over several units."""
    teacher_vocab = VOCAB + (PADDING if padding else 0)
    inputs = {"student_hidden": randn(*leading, H_STUDENT, seed=seed + 1, dtype=dtype),
              "student_weight": randn(VOCAB, H_STUDENT, seed=seed + 2, scale=0.8, dtype=dtype),
              "teacher_hidden": randn(*leading, H_TEACHER, seed=seed + 3, dtype=dtype),
              "teacher_weight": randn(teacher_vocab, H_TEACHER, seed=seed + 4, scale=1.2, dtype=dtype)}
    if bias:
        inputs["student_bias"] = randn(VOCAB, seed=seed + 5, dtype=dtype)
        inputs["teacher_bias"] = randn(teacher_vocab, seed=seed + 6, dtype=dtype)
    if ignore is not None:
        inputs["labels"] = ignored_labels(ignore, leading, seed)
    return inputs


def topk_inputs(*, k=TOPK, ignore="some", bias=True, seed=0):
    """A sparse teacher: the top-k of a teacher's log-softmax at distinct indices (k = V: every class, shuffled)."""
    teacher = randn(TOKENS, VOCAB, seed=seed + 7, scale=2.0)
    logprobs, indices = F.log_softmax(teacher, dim=-1).topk(k, dim=-1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    inputs = dense_inputs(bias=bias, ignore=ignore, seed=seed)
    for name in TEACHER_NAMES:
        inputs.pop(name, None)
    inputs.update(teacher_topk_logprobs=logprobs[:, order], teacher_topk_indices=indices[:, order])
    return inputs


def transcribed(inputs, *, temperature=1.0, divergence="forward", beta=0.5, skew_alpha=0.1, hard_weight=0.0,
                soft_weight=1.0, reduction="batchmean", scale_by_t2=False, logit_softcap=None, num_items=None,
                topk_convention="renormalize", ignore_index=-100):
    """The loss written directly with torch ops in the inputs' dtype (float64: the reference; bf16: the eager
    formula users would run)."""
    hidden, weight = inputs["student_hidden"], inputs["student_weight"]
    leading, vocab = hidden.shape[:-1], weight.shape[0]

    def capped(z):
        return z if logit_softcap is None else logit_softcap * torch.tanh(z / logit_softcap)

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def log_mix(weight_p, log_p, log_q):
        return torch.log(weight_p * log_p.exp() + (1 - weight_p) * log_q.exp())

    student_logits = capped(F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, inputs.get("student_bias")))
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    if inputs.get("teacher_topk_logprobs") is not None:
        logprobs = inputs["teacher_topk_logprobs"].reshape(log_s.shape[0], -1)
        gathered = log_s.gather(1, inputs["teacher_topk_indices"].reshape(log_s.shape[0], -1))
        if topk_convention == "renormalize":
            soft = kl(F.log_softmax(logprobs / temperature, dim=-1), gathered)
        else:
            q = torch.cat([logprobs.exp(), 1 - logprobs.exp().sum(-1, keepdim=True)], dim=-1).clamp_min(0)
            p = torch.cat([gathered.exp(), 1 - gathered.exp().sum(-1, keepdim=True)], dim=-1)
            soft = (torch.xlogy(q, q) - torch.xlogy(q, p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)
    else:
        teacher_hidden = inputs["teacher_hidden"]
        teacher_logits = F.linear(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), inputs["teacher_weight"],
                                  inputs.get("teacher_bias"))
        log_t = F.log_softmax(capped(teacher_logits[:, :vocab]) / temperature, dim=-1)
        if divergence == "forward" or (divergence == "jsd" and beta == 0):
            soft = kl(log_t, log_s)
        elif divergence == "reverse" or (divergence == "jsd" and beta == 1):
            soft = kl(log_s, log_t)
        elif divergence == "jsd":
            log_m = log_mix(beta, log_t, log_s)
            soft = beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)
        elif divergence == "skew_forward":
            soft = kl(log_t, log_mix(skew_alpha, log_t, log_s))
        elif divergence == "skew_reverse":
            soft = kl(log_s, log_mix(skew_alpha, log_s, log_t))
        elif divergence == "tvd":
            soft = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
        else:
            soft = 0.5 * (kl(log_t, log_s) + kl(log_s, log_t))
    rows = soft_weight * soft * (temperature ** 2 if scale_by_t2 else 1.0)
    labels = inputs.get("labels")
    count = rows.shape[0]
    if hard_weight:
        rows = rows + hard_weight * F.cross_entropy(student_logits, labels.reshape(-1), ignore_index=ignore_index,
                                                    reduction="none")
    if labels is not None:
        keep = labels.reshape(-1) != ignore_index
        rows = rows * keep.to(rows.dtype)
        count = keep.sum().clamp_min(1)
    if reduction == "none":
        return rows.reshape(leading)
    total = rows.sum()
    return total if reduction == "sum" else total / (count if num_items is None else num_items)


BACKEND = "auto"
ALGORITHM = "auto"


@pytest.fixture(autouse=True, params=["chunked", "streaming", "reference"])
def algorithm(request, monkeypatch):
    """Runs the test with the token-chunked algorithm on tiles of two rows (row math one row at a time), with the
    vocabulary-streaming one on blocks of three rows and vocabulary tiles of five columns (several of each, a
    ragged last one), and with the reference."""
    if request.param == "streaming":
        monkeypatch.setattr(linear_kd_streaming, "STREAM_ROWS", 3)
        monkeypatch.setattr(linear_kd_chunked, "TILE_ELEMENTS", 3 * 5)
    else:
        monkeypatch.setattr(linear_kd_chunked, "TILE_ELEMENTS", 2 * (VOCAB + PADDING))
        monkeypatch.setattr(linear_kd_chunked, "ROW_SLICE", 1)
    monkeypatch.setattr(sys.modules[__name__], "BACKEND", "reference" if request.param == "reference" else "auto")
    monkeypatch.setattr(sys.modules[__name__], "ALGORITHM",
                        "vocab-streaming" if request.param == "streaming" else "token-chunked")
    return request.param


def linear_kd(inputs, **options):
    return kdkernels.linear_kd_loss(**inputs, **{"backend": BACKEND, "algorithm": ALGORITHM, **options})


def value_and_grads(fn, inputs, grad_names, **options):
    """fn(leaves, **options) and the gradients of the named inputs under a seeded upstream gradient (not ones)."""
    leaves = {name: value.detach().clone().requires_grad_(name in grad_names) if value.dtype.is_floating_point
              else value for name, value in inputs.items()}
    value = fn(leaves, **options)
    generator = torch.Generator().manual_seed(7)
    upstream = (torch.rand(value.shape, generator=generator, dtype=torch.float64) + 0.5).to(value.dtype)
    grads = torch.autograd.grad(value, [leaves[name] for name in grad_names], upstream, allow_unused=True)
    return value, {name: torch.zeros_like(leaves[name]) if grad is None else grad
                   for name, grad in zip(grad_names, grads)}


def assert_matches(inputs, grad_names, fn=transcribed, **options):
    ours, our_grads = value_and_grads(linear_kd, inputs, grad_names, **options)
    expected, expected_grads = value_and_grads(fn, inputs, grad_names, **options)
    assert ours.dtype == torch.float64 and torch.isfinite(ours).all()
    assert_close_to_reference(ours, expected, "loss", rtol=RTOL)
    for name in grad_names:
        assert our_grads[name].dtype == inputs[name].dtype and torch.isfinite(our_grads[name]).all(), name
        assert_close_to_reference(our_grads[name], expected_grads[name], f"grad {name}", rtol=RTOL)
    return ours, our_grads


# ----------------------------------------------------------------------------------- the dense teacher, pairwise

FACTORS = {"divergence": DIVERGENCES, "reduction": ("batchmean", "sum", "none"), "ignore": (None, "some", "all"),
           "bias": (False, True), "softcap": (None, 2.5), "padding": (False, True), "temperature": (0.5, 1.0, 2.0),
           "mix": ((0.0, 1.0), (0.4, 0.7)), "teacher_grad": (False, True), "scale_by_t2": (False, True)}


def pairwise_cases(factors, seed=0):
    """A small set of configurations covering every pair of factor values (greedy over random candidates)."""
    names = list(factors)
    uncovered = {((a, i), (b, j)) for a, b in itertools.combinations(names, 2)
                 for i in range(len(factors[a])) for j in range(len(factors[b]))}
    rng, cases = random.Random(seed), []
    while uncovered:
        best, best_gain = None, -1
        for _ in range(300):
            candidate = {name: rng.randrange(len(factors[name])) for name in names}
            gain = sum(((a, candidate[a]), (b, candidate[b])) in uncovered for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = candidate, gain
        uncovered -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
        cases.append({name: factors[name][index] for name, index in best.items()})
    return cases


PAIRWISE = pairwise_cases(FACTORS)


def case_id(case):
    return "-".join(f"{value}" for value in case.values()).replace(" ", "")


@pytest.mark.parametrize("case", PAIRWISE, ids=[case_id(c) for c in PAIRWISE])
def test_dense_teacher_matches_the_transcribed_formula(case):
    inputs = dense_inputs(bias=case["bias"], padding=case["padding"], ignore=case["ignore"])
    hard_weight, soft_weight = case["mix"]
    if hard_weight and case["ignore"] is None:
        inputs["labels"] = ignored_labels(None)
    grad_names = ["student_hidden", "student_weight"] + (["student_bias"] if case["bias"] else [])
    if case["teacher_grad"]:
        grad_names += ["teacher_hidden", "teacher_weight"] + (["teacher_bias"] if case["bias"] else [])
    options = dict(temperature=case["temperature"], divergence=case["divergence"], beta=0.3, skew_alpha=0.2,
                   hard_weight=hard_weight, soft_weight=soft_weight, reduction=case["reduction"],
                   scale_by_t2=case["scale_by_t2"], logit_softcap=case["softcap"])
    loss, grads = assert_matches(inputs, grad_names, **options)
    if case["ignore"] == "all":
        assert not loss.any() and all(not g.any() for g in grads.values())
    if case["padding"] and case["teacher_grad"]:
        assert not grads["teacher_weight"][VOCAB:].any()
        if case["bias"]:
            assert not grads["teacher_bias"][VOCAB:].any()


def test_the_pairwise_cases_cover_every_pair_and_stay_few():
    assert len(PAIRWISE) <= 40
    for a, b in itertools.combinations(FACTORS, 2):
        seen = {(case[a], case[b]) for case in PAIRWISE}
        assert seen == set(itertools.product(FACTORS[a], FACTORS[b])), (a, b)


@pytest.mark.parametrize("divergence", KD_LOSS_DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_equals_kd_loss_on_the_materialised_logits(divergence, temperature):
    inputs = dense_inputs(ignore="some")

    def via_kd_loss(leaves, **options):
        student = F.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
        teacher = F.linear(leaves["teacher_hidden"], leaves["teacher_weight"], leaves["teacher_bias"])[:, :VOCAB]
        return kdkernels.kd_loss(student, teacher, options["temperature"], reduction=options["reduction"],
                                 scale_by_t2=options["scale_by_t2"], labels=leaves["labels"],
                                 divergence=options["divergence"], beta=options["beta"],
                                 logit_softcap=options["logit_softcap"], backend="reference")

    for reduction in ("batchmean", "none"):
        assert_matches(inputs, ["student_hidden", "student_weight", "student_bias", "teacher_hidden",
                                "teacher_weight", "teacher_bias"], via_kd_loss, temperature=temperature,
                       divergence=divergence, beta=0.3, reduction=reduction, scale_by_t2=True, logit_softcap=3.0)


@pytest.mark.parametrize("convention,temperature,k", [("renormalize", 0.5, TOPK), ("renormalize", 2.0, TOPK),
                                                      ("renormalize", 1.0, VOCAB), ("tail", 1.0, TOPK),
                                                      ("tail", 1.0, VOCAB)])
def test_topk_teacher_matches_the_transcribed_formula_and_kd_loss(convention, temperature, k):
    inputs = topk_inputs(k=k)
    grad_names = ["student_hidden", "student_weight", "student_bias"]
    options = dict(temperature=temperature, topk_convention=convention, hard_weight=0.5, soft_weight=0.8,
                   logit_softcap=4.0, scale_by_t2=True)
    assert_matches(inputs, grad_names, **options)

    def via_kd_loss(leaves, **options):
        student = F.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
        soft = kdkernels.kd_loss(student, None, temperature, labels=leaves["labels"], scale_by_t2=True,
                                 teacher_topk_logprobs=leaves["teacher_topk_logprobs"],
                                 teacher_topk_indices=leaves["teacher_topk_indices"], topk_convention=convention,
                                 logit_softcap=4.0, backend="reference")
        return soft

    assert_matches(inputs, grad_names, via_kd_loss, temperature=temperature, topk_convention=convention,
                   logit_softcap=4.0, scale_by_t2=True)
    if k == VOCAB:  # every class: the dense forward KL against the teacher the top-k came from
        student = F.linear(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
        dense = kdkernels.kd_loss(4.0 * torch.tanh(student / 4.0), randn(TOKENS, VOCAB, seed=7, scale=2.0),
                                  temperature, labels=inputs["labels"], scale_by_t2=True, backend="reference")
        ours = linear_kd(inputs, temperature=temperature, topk_convention=convention, logit_softcap=4.0,
                         scale_by_t2=True)
        torch.testing.assert_close(ours, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("convention", ["renormalize", "tail"])
@pytest.mark.parametrize("ignore", [None, "all"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_topk_teacher_reductions_and_ignore_patterns(convention, ignore, reduction):
    inputs = topk_inputs(ignore=ignore, bias=False)
    loss, grads = assert_matches(inputs, ["student_hidden", "student_weight"], topk_convention=convention,
                                 reduction=reduction)
    if ignore == "all":
        assert not loss.any() and not grads["student_weight"].any()


# ------------------------------------------------------------------------------------------- edges and endpoints

def test_jsd_and_skew_endpoints_are_the_kls_and_zero():
    inputs = dense_inputs()
    forward, reverse = linear_kd(inputs, divergence="forward"), linear_kd(inputs, divergence="reverse")
    assert torch.equal(linear_kd(inputs, divergence="jsd", beta=0.0), forward)
    assert torch.equal(linear_kd(inputs, divergence="jsd", beta=1.0), reverse)
    assert torch.equal(linear_kd(inputs, divergence="skew_forward", skew_alpha=0.0), forward)
    assert torch.equal(linear_kd(inputs, divergence="skew_reverse", skew_alpha=0.0), reverse)
    for divergence in ("skew_forward", "skew_reverse"):
        assert linear_kd(inputs, divergence=divergence, skew_alpha=1.0).item() == 0.0
    symmetric = linear_kd(inputs, divergence="symmetric")
    torch.testing.assert_close(symmetric, (forward + reverse) / 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_underflowing_probabilities_and_masked_columns_give_no_nan(divergence):
    """Logits of +-1e4 at T = 0.5 (both probabilities underflow in most columns) and columns masked by a -inf bias
    on both sides: finite losses and gradients, equal to kd_loss where it has the divergence."""
    inputs = dense_inputs(padding=False)
    inputs["student_hidden"] = inputs["student_hidden"] * 2000
    inputs["teacher_hidden"] = inputs["teacher_hidden"] * 2000
    inputs["student_bias"][[2, 7]] = float("-inf")
    inputs["teacher_bias"][[2, 7]] = float("-inf")
    names = ["student_hidden", "student_weight", "teacher_hidden", "teacher_weight"]
    loss, grads = value_and_grads(linear_kd, inputs, names, temperature=0.5, divergence=divergence, beta=0.5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    if divergence in KD_LOSS_DIVERGENCES:
        student = F.linear(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"])
        teacher = F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"])
        expected = kdkernels.kd_loss(student, teacher, 0.5, labels=inputs["labels"], divergence=divergence,
                                     scale_by_t2=False, backend="reference")
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_an_all_ignored_batch_gives_zero_and_zero_gradients(reduction):
    inputs = dense_inputs(ignore="all")
    names = ["student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight"]
    loss, grads = value_and_grads(linear_kd, inputs, names, reduction=reduction, hard_weight=0.5, num_items=None)
    assert not loss.any() and not torch.isnan(loss).any()
    assert all(not g.any() for g in grads.values())


def test_num_items_makes_micro_batches_add_up_to_the_batch():
    inputs = dense_inputs(ignore="some")
    names = ["student_weight", "student_bias", "teacher_weight"]
    whole, whole_grads = value_and_grads(linear_kd, inputs, names, hard_weight=0.3, divergence="jsd")
    counted = int((inputs["labels"] != -100).sum())
    total, total_grads = 0.0, {name: 0.0 for name in names}
    for rows, num_items in ((slice(0, 2), counted), (slice(2, TOKENS), torch.tensor(counted))):
        micro = {k: v[rows] if k in ("student_hidden", "teacher_hidden", "labels") else v for k, v in inputs.items()}
        loss, grads = value_and_grads(linear_kd, micro, names, hard_weight=0.3, divergence="jsd",
                                      num_items=num_items)
        total = total + loss
        total_grads = {name: total_grads[name] + grads[name] for name in names}
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=0)
    for name in names:
        torch.testing.assert_close(total_grads[name], whole_grads[name], rtol=1e-12, atol=1e-15)


def test_batched_hidden_states_are_flattened_and_none_keeps_the_token_shape():
    batched = dense_inputs(leading=(2, 3), ignore="some")
    flat = {k: v.reshape(-1, v.shape[-1]) if k.endswith("hidden") else v for k, v in batched.items()}
    flat["labels"] = batched["labels"].reshape(-1)
    per_token = linear_kd(batched, reduction="none", divergence="skew_reverse", hard_weight=0.5)
    assert per_token.shape == (2, 3)
    torch.testing.assert_close(per_token.reshape(-1), linear_kd(flat, reduction="none", divergence="skew_reverse",
                                                                hard_weight=0.5), rtol=0, atol=0)
    assert_matches(batched, ["student_hidden", "teacher_hidden"], divergence="tvd", reduction="none")


def test_gradcheck():
    def as_function(divergence, labels, **options):
        def function(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias):
            return kdkernels.linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            student_bias=student_bias, teacher_bias=teacher_bias, labels=labels,
                                            divergence=divergence, backend=BACKEND, **options)
        return function

    tensors = (randn(3, 3, seed=1), randn(5, 3, seed=2), randn(5, seed=3), randn(3, 2, seed=4),
               randn(7, 2, seed=5), randn(7, seed=6))
    tensors = [t.requires_grad_() for t in tensors]
    labels = torch.tensor([1, -100, 4])
    for divergence, options in (("jsd", dict(beta=0.3, logit_softcap=2.0, temperature=0.5)),
                                ("skew_reverse", dict(skew_alpha=0.2, hard_weight=0.5, reduction="none")),
                                ("tvd", dict(temperature=2.0, scale_by_t2=True, reduction="sum"))):
        assert torch.autograd.gradcheck(as_function(divergence, labels, **options), tensors), divergence

    def topk(student_hidden, student_weight):
        return kdkernels.linear_kd_loss(student_hidden, student_weight, teacher_topk_logprobs=logprobs,
                                        teacher_topk_indices=indices, temperature=2.0, labels=labels, hard_weight=1.0,
                                        backend=BACKEND)

    logprobs, indices = F.log_softmax(randn(3, 5, seed=8), dim=-1).topk(2, dim=-1)
    assert torch.autograd.gradcheck(topk, tensors[:2])


# ----------------------------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("divergence", ["forward", "jsd", "skew_forward", "tvd"])
def test_bf16_inputs_meet_the_flash_attention_criterion(divergence):
    """Logits are formed in float32 from bf16 inputs: the loss (float32) and the bf16 gradients are at most twice as
    far from the float64 formula (on the same rounded inputs) as the eager formula run in bf16."""
    low = {k: v.to(torch.bfloat16) if v.dtype.is_floating_point else v
           for k, v in dense_inputs(ignore="some", leading=(24,), seed=3).items()}
    low["student_hidden"] = low["student_hidden"] * 3
    wide = {k: v.double() if v.dtype.is_floating_point else v for k, v in low.items()}
    names = ["student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight"]
    options = dict(divergence=divergence, temperature=2.0, hard_weight=0.5, scale_by_t2=True)
    ours, our_grads = value_and_grads(linear_kd, low, names, **options)
    expected, expected_grads = value_and_grads(transcribed, wide, names, **options)
    eager, eager_grads = value_and_grads(transcribed, low, names, **options)
    assert ours.dtype == torch.float32
    assert_close_to_reference(ours, expected, "loss", eager=eager)
    for name in names:
        assert our_grads[name].dtype == torch.bfloat16, name
        assert_close_to_reference(our_grads[name], expected_grads[name], f"grad {name}", eager=eager_grads[name])
    assert not our_grads["teacher_weight"][VOCAB:].any()


def test_float32_result_and_padding_gradient_in_float32():
    inputs = {k: v.float() if v.dtype.is_floating_point else v for k, v in dense_inputs().items()}
    loss, grads = value_and_grads(linear_kd, inputs, ["teacher_weight", "teacher_bias"], divergence="symmetric")
    assert loss.dtype == torch.float32 and grads["teacher_weight"].dtype == torch.float32
    assert not grads["teacher_weight"][VOCAB:].any() and not grads["teacher_bias"][VOCAB:].any()


def test_module_matches_the_function():
    inputs = dense_inputs(ignore="some")
    criterion = kdkernels.nn.LinearKDLoss(temperature=2.0, divergence="skew_forward", hard_weight=0.5)
    torch.testing.assert_close(criterion(**inputs), linear_kd(inputs, temperature=2.0, divergence="skew_forward",
                                                              hard_weight=0.5), rtol=0, atol=0)
    assert "divergence='skew_forward'" in repr(criterion)


# ------------------------------------------------------------------------------------------------------- errors

def _without(*names):
    return lambda inputs: {k: v for k, v in inputs.items() if k not in names}


def _with(**changes):
    return lambda inputs: {**inputs, **{k: (v(inputs) if callable(v) else v) for k, v in changes.items()}}


def _topk(**changes):
    def build(inputs):
        sparse = topk_inputs()
        return {**sparse, **{k: (v(sparse) if callable(v) else v) for k, v in changes.items()}}
    return build


BAD_INPUTS = [
    (_with(student_hidden=lambda i: i["student_hidden"][0]), ValueError, r"student_hidden must have 2 or 3 dims"),
    (_with(student_hidden=lambda i: i["student_hidden"].long()), TypeError, r"student_hidden must be float32"),
    (_with(student_weight=lambda i: i["student_weight"][:, :4]), ValueError,
     r"student_weight must have shape \[V, 5\] \(student_hidden's hidden size\), got shape \(11, 4\)"),
    (_with(teacher_weight=lambda i: i["teacher_weight"][:, :3]), ValueError, r"teacher_weight must have shape \[V, 4\]"),
    (_with(teacher_hidden=lambda i: i["teacher_hidden"][:4]), ValueError,
     r"teacher_hidden must have student_hidden's token shape \(6,\)"),
    (_with(student_weight=lambda i: i["student_weight"].float()), TypeError,
     r"student_weight must be student_hidden's dtype torch.float64, got torch.float32"),
    (_with(teacher_weight=lambda i: i["teacher_weight"].bfloat16()), TypeError,
     r"teacher_weight must be teacher_hidden's dtype"),
    (_with(student_bias=lambda i: i["student_bias"][:-1]), ValueError, r"student_bias must have shape \[11\]"),
    (_with(teacher_bias=lambda i: i["teacher_bias"][:-1]), ValueError, r"teacher_bias must have shape \[14\]"),
    (_with(teacher_weight=lambda i: i["teacher_weight"][:VOCAB - 1], teacher_bias=lambda i: i["teacher_bias"][:10]),
     ValueError,
     r"teacher_weight must have at least the student's 11 rows"),
    (_without("teacher_hidden", "teacher_weight", "teacher_bias"), TypeError,
     r"teacher_hidden must be a torch.Tensor \(linear_kd_loss needs"),
    (_without("teacher_weight"), TypeError, r"teacher_weight must be a torch.Tensor"),
    (_with(labels=lambda i: i["labels"][:5]), ValueError, r"labels must have student_hidden's token shape \(6,\)"),
    (_with(labels=lambda i: i["labels"].double()), TypeError, r"labels must be an integer tensor"),
    (_with(labels=lambda i: i["labels"] + 20, hard_weight=1.0), ValueError, r"labels must be in \[0, 11\)"),
    (_with(labels=None, hard_weight=0.5), ValueError, r"labels must be given when hard_weight > 0"),
    (_with(divergence="kl"), ValueError, r"divergence must be one of 'forward'"),
    (_with(reduction="mean"), ValueError, r"reduction must be one of 'batchmean', 'sum', 'none'"),
    (_with(backend="fast"), ValueError, r"backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got "
                                        r"'fast'"),
    (_with(temperature=0.0), ValueError, r"temperature must be positive and finite, got 0.0"),
    (_with(temperature=-1.0), ValueError, r"temperature must be positive"),
    (_with(beta=1.5), ValueError, r"beta must be in \[0, 1\], got 1.5"),
    (_with(skew_alpha=-0.1), ValueError, r"skew_alpha must be in \[0, 1\], got -0.1"),
    (_with(hard_weight=-1.0, labels=lambda i: i["labels"]), ValueError, r"hard_weight must be >= 0"),
    (_with(logit_softcap=0.0), ValueError, r"logit_softcap must be positive"),
    (_with(num_items=0), ValueError, r"num_items must be an int >= 1"),
    (_with(num_items=2.5), TypeError, r"num_items must be an int"),
    (_with(num_items=3, reduction="sum"), ValueError, r"num_items must be None unless reduction='batchmean'"),
    (_with(scale_by_t2=1), TypeError, r"scale_by_t2 must be a bool"),
    (_topk(teacher_topk_indices=lambda i: i["teacher_topk_indices"][:, :2]), ValueError,
     r"teacher_topk_indices must have the same shape as teacher_topk_logprobs"),
    (_topk(teacher_topk_logprobs=lambda i: i["teacher_topk_logprobs"][:5]), ValueError,
     r"teacher_topk_logprobs must have shape \[6, k\]"),
    (_topk(teacher_topk_indices=None), ValueError, r"teacher_topk_logprobs, teacher_topk_indices must both be given"),
    (_topk(teacher_topk_indices=lambda i: i["teacher_topk_indices"] + VOCAB), ValueError,
     r"teacher_topk_indices must be in \[0, 11\)"),
    (_topk(teacher_topk_logprobs=lambda i: i["teacher_topk_logprobs"].long()), TypeError,
     r"teacher_topk_logprobs must be float32"),
    (_topk(teacher_hidden=lambda i: randn(TOKENS, H_TEACHER, seed=1)), ValueError,
     r"teacher_hidden must be None with a top-k teacher"),
    (_topk(divergence="reverse"), ValueError, r"divergence must be 'forward' with a top-k teacher"),
    (_topk(topk_convention="tail", temperature=2.0), ValueError, r"temperature must be 1 with topk_convention='tail'"),
    (_topk(topk_convention="both"), ValueError, r"topk_convention must be one of"),
]


@pytest.mark.parametrize("build,error,message", BAD_INPUTS, ids=[f"{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_naming_the_argument(build, error, message):
    arguments = build(dense_inputs())
    with pytest.raises(error, match=rf"^linear_kd_loss: {message}"):
        kdkernels.linear_kd_loss(**arguments)


# ------------------------------------------------------------------------------- the token-chunked algorithm itself

def test_tiles_hold_few_rows_and_ignored_tokens_never_reach_a_gemm(monkeypatch, algorithm):
    """Every logits tile is small (never the [N, V] logits: token-chunked tiles of at most two rows, streaming
    tiles of at most 3 rows × 5 vocabulary columns) and only the counted tokens are projected, in the forward and in
    the recomputing backward of reduction='none'. Token-chunked projects each side once per pass, streaming three
    times (log-sum-exp, divergence, gradient; the forward of 'none' needs only the first two).
    backend='reference' never tiles."""
    tiles = []
    if algorithm == "streaming":
        original = linear_kd_streaming._StreamSide.tile_logits
        method = "tile_logits"
    else:
        original = linear_kd_chunked._Side.logits
        method = "logits"

    def recording(side, *where):
        logits = original(side, *where)
        tiles.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(linear_kd_streaming._StreamSide if algorithm == "streaming" else linear_kd_chunked._Side,
                        method, recording)
    inputs = dense_inputs(ignore="some", leading=(2, 5))
    counted = int((inputs["labels"] != -100).sum())
    passes = {"chunked": {"batchmean": 1, "none": 2}, "streaming": {"batchmean": 3, "none": 5}}.get(algorithm)
    for reduction in ("batchmean", "none"):
        tiles.clear()
        value_and_grads(linear_kd, inputs, ["student_hidden", "teacher_weight"], reduction=reduction)
        if algorithm == "reference":
            assert tiles == []
            continue
        rows, columns = (2, VOCAB) if algorithm == "chunked" else (3, 5)
        assert max(r for r, _ in tiles) <= rows and max(c for _, c in tiles) <= columns, (reduction, tiles)
        projected = sum(r * c for r, c in tiles)
        assert projected == 2 * passes[reduction] * counted * VOCAB, (reduction, tiles)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients(reduction):
    """The chunked forward forms the gradients and the first backward scales them in place: a second backward
    (retain_graph) must recompute them, not reuse the scaled buffers."""
    inputs = dense_inputs(ignore="some")
    leaves = {k: v.clone().requires_grad_(k in ("student_hidden", "teacher_weight")) if v.dtype.is_floating_point
              else v for k, v in inputs.items()}
    loss = linear_kd(leaves, reduction=reduction, divergence="jsd", beta=0.3)
    upstream = torch.full_like(loss, 0.7)
    first = torch.autograd.grad(loss, [leaves["student_hidden"], leaves["teacher_weight"]], upstream,
                                retain_graph=True)
    second = torch.autograd.grad(loss, [leaves["student_hidden"], leaves["teacher_weight"]], 2 * upstream)
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, rtol=1e-12, atol=0)


def test_torch_compile_fullgraph_matches_eager():
    inputs = {k: v.float() if v.dtype.is_floating_point else v for k, v in dense_inputs(ignore="some").items()}
    names = ["student_hidden", "student_weight", "teacher_hidden"]
    options = dict(divergence="jsd", beta=0.3, temperature=2.0, hard_weight=0.5, backend=BACKEND)
    compiled = torch.compile(lambda leaves, **o: linear_kd(leaves, **o), fullgraph=True, dynamic=False)
    eager, eager_grads = value_and_grads(linear_kd, inputs, names, **options)
    ours, our_grads = value_and_grads(compiled, inputs, names, **options)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
    for name in names:
        torch.testing.assert_close(our_grads[name], eager_grads[name], rtol=1e-5, atol=1e-6)


def test_autocast_does_not_round_the_logits():
    """Under bf16 autocast the GEMMs would run in bf16; the loss turns autocast off and forms float32 logits (the
    backward runs outside the autocast region, as PyTorch recommends)."""
    inputs = {k: v.float() if v.dtype.is_floating_point else v for k, v in dense_inputs(ignore="some").items()}
    names = ["student_hidden", "student_weight", "teacher_hidden"]

    def autocast_loss(leaves, **options):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_kd(leaves, **options)

    plain, plain_grads = value_and_grads(linear_kd, inputs, names, divergence="jsd", hard_weight=0.5)
    autocast, autocast_grads = value_and_grads(autocast_loss, inputs, names, divergence="jsd", hard_weight=0.5)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-7)
    for name in names:
        torch.testing.assert_close(autocast_grads[name], plain_grads[name], rtol=1e-6, atol=1e-7)

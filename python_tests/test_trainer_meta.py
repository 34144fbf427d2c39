"""Meta-steps (kdkernels.distill.meta): the unrolled fast parameters against torch.optim.SGD steps, hypergradients
(a temperature, a loss weight, synthetic inputs, the initial parameters) against central finite differences in
float64, the first-order mode against its formula, the model left untouched, and the errors."""
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkernels.distill import meta

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float64


def linear_model():
    torch.manual_seed(0)
    return nn.Linear(4, 3).to(DTYPE)


def bn_mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def make_batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(n, 4, generator=g, dtype=DTYPE), "target": torch.randint(0, 3, (n,), generator=g),
            "teacher": 2.0 * torch.randn(n, 3, generator=g, dtype=DTYPE)}


def kd(outputs, teacher, t):
    return t ** 2 * F.kl_div(F.log_softmax(outputs / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                             reduction="batchmean")


def ce_loss(outputs, batch, hyper):
    return F.cross_entropy(outputs, batch["target"])


def kd_inner(outputs, batch, hyper):
    """CE + w·KD at T = exp(log_t): every hyperparameter the tests learn, with defaults when one is absent."""
    t = hyper["log_t"].exp() if "log_t" in hyper else torch.tensor(2.0, dtype=DTYPE)
    w = hyper.get("weight", torch.tensor(0.7, dtype=DTYPE))
    return F.cross_entropy(outputs, batch["target"]) + w * kd(outputs, batch["teacher"], t)


# ----------------------------------------------------------------------------------------------- the inner steps


SGD_SETTINGS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, weight_decay=0.01),
                dict(momentum=0.8, dampening=0.3), dict(momentum=0.9, nesterov=True, weight_decay=0.01)]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("factory", [linear_model, bn_mlp])
def test_unroll_equals_torch_sgd_steps(factory, settings):
    model = factory()
    reference = copy.deepcopy(model)
    batches = [make_batch(seed) for seed in range(3)]
    momentum = settings["momentum"]
    fast = meta.unroll(model, ce_loss, batches=batches, lr=0.3, **settings)
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.3, **settings)
    reference.train()
    for batch in batches:
        optimiser.zero_grad()
        F.cross_entropy(reference(batch["input"]), batch["target"]).backward()
        optimiser.step()
    assert fast.steps == 3
    for name, p in reference.named_parameters():
        torch.testing.assert_close(fast.params[name], p, rtol=0, atol=1e-12)
        if momentum:
            torch.testing.assert_close(fast.momentum_buffers[name], optimiser.state[p]["momentum_buffer"], rtol=0,
                                       atol=1e-12)
    for name, b in reference.named_buffers():      # batch norm's running statistics and counter, as three steps
        torch.testing.assert_close(fast.buffers[name], b, rtol=0, atol=1e-12)
    x = make_batch(9)["input"]
    reference.eval()
    torch.testing.assert_close(fast(x, train=False), reference(x), rtol=0, atol=1e-12)


def test_one_batch_repeated_equals_the_batch_listed_k_times():
    model, batch = bn_mlp(), make_batch(0)
    repeated = meta.unroll(model, ce_loss, batch=batch, steps=4, lr=0.2, momentum=0.5)
    listed = meta.unroll(model, ce_loss, batches=[batch] * 4, lr=0.2, momentum=0.5)
    for name in repeated.params:
        torch.testing.assert_close(repeated.params[name], listed.params[name], rtol=0, atol=0)


def test_the_model_is_unchanged_after_unrolling_and_the_outer_backward():
    model = bn_mlp()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    log_t = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    fast = meta.unroll(model, kd_inner, batch=make_batch(0), steps=3, lr=0.5, momentum=0.9, hyper={"log_t": log_t})
    F.cross_entropy(fast(make_batch(1)["input"], train=True), make_batch(1)["target"]).backward()
    assert log_t.grad is not None
    assert not model.training and all(not m.training for m in model.modules())   # the mode is restored
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(fast.params["0.weight"], model[0].weight)
    assert fast.buffers["1.num_batches_tracked"].item() == 3 and model[1].num_batches_tracked.item() == 0


def test_eval_mode_inner_steps_use_and_keep_the_running_statistics():
    model = bn_mlp()
    reference = copy.deepcopy(model).eval()
    fast = meta.unroll(model, ce_loss, batch=make_batch(0), steps=2, lr=0.3, train=False)
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.3)
    for _ in range(2):
        optimiser.zero_grad()
        F.cross_entropy(reference(make_batch(0)["input"]), make_batch(0)["target"]).backward()
        optimiser.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(fast.params[name], p, rtol=0, atol=1e-12)
    assert fast.buffers["1.num_batches_tracked"].item() == 0 and model.training


def test_a_train_mode_outer_call_does_not_change_the_fast_buffers():
    fast = meta.unroll(bn_mlp(), ce_loss, batch=make_batch(0), lr=0.1)
    before = {name: b.clone() for name, b in fast.buffers.items()}
    fast(make_batch(1)["input"], train=True)
    assert all(torch.equal(fast.buffers[name], before[name]) for name in before)


# ------------------------------------------------------------------------------- hypergradients vs. finite differences


def finite_difference(f, x, eps=1e-6):
    """Central differences of the scalar f at every element of x (f gets a leaf that requires grad, as unroll needs;
    nothing is differentiated)."""
    grad = torch.zeros_like(x)
    flat = grad.view(-1)
    for i in range(x.numel()):
        step = torch.zeros_like(x).view(-1)
        step[i] = eps
        step = step.view_as(x)
        up, down = (x + step).requires_grad_(True), (x - step).requires_grad_(True)
        flat[i] = (f(up).detach() - f(down).detach()) / (2 * eps)
    return grad


def directional_differences(f, x, directions, eps=1e-6):
    """Central differences of f along each direction: for inputs too large to difference element by element."""
    return torch.stack([(f((x + eps * v).requires_grad_(True)).detach()
                         - f((x - eps * v).requires_grad_(True)).detach()) / (2 * eps) for v in directions])


def outer_after_unroll(model, hyper_name, value, *, momentum, first_order=False, steps=3):
    """The held-out CE after `steps` inner steps with hyper[hyper_name] = value (outer forward in train mode: the
    batch statistics, which carry the gradient; the running statistics carry none)."""
    hyper = {hyper_name: value}
    batches = [make_batch(seed) for seed in range(steps)]
    if hyper_name == "synthetic":      # dataset distillation: the inner steps train on learnable inputs
        batches = [dict(batch, input=value[i]) for i, batch in enumerate(batches)]
    fast = meta.unroll(model, kd_inner, batches=batches, lr=0.4, momentum=momentum, hyper=hyper,
                       first_order=first_order)
    held_out = make_batch(100, n=10)
    return F.cross_entropy(fast(held_out["input"], train=True), held_out["target"])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("factory", [linear_model, bn_mlp])
@pytest.mark.parametrize("hyper_name", ["log_t", "weight", "synthetic"])
def test_hypergradient_equals_central_finite_differences(hyper_name, factory, momentum):
    model = factory()
    start = {"log_t": torch.tensor(0.4, dtype=DTYPE), "weight": torch.tensor(0.7, dtype=DTYPE),
             "synthetic": torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)}[hyper_name]
    leaf = start.clone().requires_grad_(True)
    outer = outer_after_unroll(model, hyper_name, leaf, momentum=momentum)
    (grad,) = meta.meta_gradient(outer, {hyper_name: leaf}).values()
    def f(x):
        return outer_after_unroll(model, hyper_name, x, momentum=momentum)

    assert grad.abs().max() > 1e-4      # a gradient worth comparing
    if start.numel() == 1:
        torch.testing.assert_close(grad, finite_difference(f, start), rtol=1e-6, atol=1e-8)
    else:                               # the synthetic inputs: along random directions and one element's
        directions = torch.randn(3, *start.shape, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
        directions = torch.cat([directions, torch.zeros_like(start).flatten().index_fill(0, torch.tensor([5]), 1.0)
                                .view(1, *start.shape)])
        expected = directional_differences(f, start, directions)
        torch.testing.assert_close((directions * grad).flatten(1).sum(1), expected, rtol=1e-6, atol=1e-8)


def test_meta_gradient_of_the_initial_parameters_equals_finite_differences():
    """Second-order MAML: params given as leaves that require grad; d outer / d θ_0 through three momentum steps."""
    model = linear_model()
    batches = [make_batch(seed) for seed in range(3)]
    held_out = make_batch(100)

    def outer(weight):
        fast = meta.unroll(model, kd_inner, batches=batches, lr=0.4, momentum=0.9,
                           params={"weight": weight, "bias": model.bias.detach()})
        return F.cross_entropy(fast(held_out["input"]), held_out["target"])

    start = model.weight.detach().clone()
    leaf = start.clone().requires_grad_(True)
    grad = meta.meta_gradient(outer(leaf), {"weight": leaf})["weight"]
    expected = finite_difference(outer, start)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------- first order


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_first_order_equals_the_formula_with_detached_inner_gradients(momentum):
    model = bn_mlp()
    batches = [make_batch(seed) for seed in range(3)]
    held_out = make_batch(100)
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    fast = meta.unroll(model, kd_inner, batches=batches, lr=0.4, momentum=momentum, params=leaves, first_order=True)
    exact = meta.unroll(model, kd_inner, batches=batches, lr=0.4, momentum=momentum)
    for name in leaves:                      # the same steps, only the graph differs
        torch.testing.assert_close(fast.params[name], exact.params[name], rtol=0, atol=1e-12)
    outer = F.cross_entropy(fast(held_out["input"], train=True), held_out["target"])
    grads = meta.meta_gradient(outer, leaves)
    # the formula: θ_k = θ_0 − lr·Σ(detached updates), so d outer / d θ_0 = ∇_θ outer at θ_k
    at_k = {name: p.detach().requires_grad_(True) for name, p in exact.params.items()}
    outer_k = F.cross_entropy(meta.Unrolled(model, at_k, exact.buffers, [], {})(held_out["input"], train=True),
                              held_out["target"])
    expected = dict(zip(at_k, torch.autograd.grad(outer_k, list(at_k.values()))))
    for name in leaves:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-12, atol=1e-14)


def test_first_order_gives_an_inner_only_hyperparameter_no_gradient():
    log_t = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    fast = meta.unroll(linear_model(), kd_inner, batch=make_batch(0), steps=2, lr=0.4, hyper={"log_t": log_t},
                       first_order=True)
    outer = F.cross_entropy(fast(make_batch(1)["input"]), make_batch(1)["target"])
    with pytest.raises(ValueError, match=r"meta_gradient: the outer loss does not depend on hyper \['log_t'\]"):
        meta.meta_gradient(outer, {"log_t": log_t})


# ---------------------------------------------------------------------------------------------------------- errors


def test_errors_name_the_argument():
    model, batch = linear_model(), make_batch(0)
    log_t = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    cases = [
        (dict(steps=0), ValueError, r"unroll: steps must be an int >= 1, got 0"),
        (dict(steps=1.5), TypeError, r"unroll: steps must be an int"),
        (dict(lr=0.0), ValueError, r"unroll: lr must be positive and finite, got 0.0"),
        (dict(lr=-1.0), ValueError, r"unroll: lr must be positive"),
        (dict(lr="0.1"), TypeError, r"unroll: lr must be a real number"),
        (dict(momentum=-0.5), ValueError, r"unroll: momentum must be >= 0"),
        (dict(nesterov=True), ValueError, r"unroll: nesterov needs momentum > 0 and dampening 0"),
        (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, r"nesterov needs momentum > 0 and dampening"),
        (dict(lr=torch.tensor([0.1, 0.2])), ValueError, r"unroll: lr must have one element, got shape \(2,\)"),
        (dict(lr=torch.tensor(-0.1)), ValueError, r"unroll: lr must be positive and finite"),
        (dict(lr=torch.tensor(1)), TypeError, r"unroll: lr must be a real number or a floating tensor"),
        (dict(input_key=0), TypeError, r"unroll: input_key must be a str or None"),
        (dict(first_order=1), TypeError, r"unroll: first_order must be a bool"),
        (dict(params={"weights": model.weight}), ValueError, r"unroll: params must name parameters of the model, "
                                                             r"got unknown names \['weights'\]"),
        (dict(params={"weight": torch.zeros(2, 4, dtype=DTYPE)}), ValueError,
         r"params\['weight'\] must have the model's shape \(3, 4\), got shape \(2, 4\)"),
        (dict(params={"weight": model.weight.float()}), TypeError, r"params\['weight'\] must be of the model's dtype"),
        (dict(params=[model.weight]), TypeError, r"unroll: params must be a mapping"),
        (dict(params={"weight": model.weight.detach(), "bias": model.bias.detach()}), ValueError,
         r"params must hold at least one tensor that requires grad"),
        (dict(hyper={"log_t": torch.tensor(0.3)}), ValueError, r"hyper\['log_t'\] must require grad"),
        (dict(hyper={"log_t": 0.3}), TypeError, r"hyper\['log_t'\] must be a torch.Tensor"),
        (dict(batches=[batch, batch]), ValueError, r"batch/batches must be given exactly one of the two"),
        (dict(batch=None), ValueError, r"batch/batches must be given exactly one of the two .*, got neither"),
        (dict(batch=None, batches=[batch, batch], steps=3), ValueError, r"steps must equal len\(batches\) = 2"),
        (dict(batch=None, batches=batch), TypeError, r"batches must be a list or tuple"),
        (dict(batch={"x": batch["input"]}), ValueError, r"batch must have the input key 'input'"),
        (dict(batch=3), TypeError, r"unroll: batch must be a tensor, a tuple/list"),
    ]
    for overrides, error, message in cases:
        kwargs = dict(batch=batch, lr=0.1)
        kwargs.update(overrides)
        with pytest.raises(error, match=message):
            meta.unroll(model, ce_loss, **kwargs)
    with pytest.raises(TypeError, match=r"unroll: model must be an nn.Module"):
        meta.unroll(lambda x: x, ce_loss, batch=batch, lr=0.1)
    with pytest.raises(TypeError, match=r"unroll: inner_loss must be a callable"):
        meta.unroll(model, "ce", batch=batch, lr=0.1)
    # a non-differentiable inner loss, a loss that is not a scalar, a hyperparameter the inner loss never reads
    with pytest.raises(ValueError, match=r"the inner loss at step 0 is not differentiable"):
        meta.unroll(model, lambda out, b, h: ce_loss(out, b, h).detach(), batch=batch, lr=0.1)
    with pytest.raises(ValueError, match=r"the inner loss at step 0 does not depend on any parameter being updated"):
        meta.unroll(model, lambda out, b, h: h["log_t"] * 2, batch=batch, lr=0.1, hyper={"log_t": log_t})
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar, got shape \(8,\)"):
        meta.unroll(model, lambda out, b, h: F.cross_entropy(out, b["target"], reduction="none"), batch=batch,
                    lr=0.1)
    with pytest.raises(TypeError, match=r"inner_loss must return a tensor, got float"):
        meta.unroll(model, lambda out, b, h: 1.0, batch=batch, lr=0.1)
    weight = torch.tensor(0.5, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match=r"neither the inner losses nor the fast parameters depend on hyper "
                                         r"\['weight'\]"):
        meta.unroll(model, lambda out, b, h: kd(out, b["teacher"], h["log_t"].exp()), batch=batch, lr=0.1,
                    hyper={"log_t": log_t, "weight": weight})


def test_fused_kdkernels_losses_are_refused_as_inner_losses_unless_first_order():
    """kdkernels.kd_loss's backward is a kernel without an autograd formula: second derivatives through it would
    be silently zero, so the second-order unroll refuses it; the first-order one takes it."""
    import kdkernels

    model, batch = linear_model(), make_batch(0)

    def fused(outputs, batch, hyper):
        return kdkernels.kd_loss(outputs, batch["teacher"], temperature=2.0)

    with pytest.raises(ValueError, match=r"the inner loss is not twice differentiable: the backward of \[.*kdkernels"):
        meta.unroll(model, fused, batch=batch, lr=0.1)
    fast = meta.unroll(model, fused, batch=batch, lr=0.1, first_order=True)
    assert fast.steps == 1


def test_meta_gradient_errors():
    log_t = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match=r"meta_gradient: outer_loss must be differentiable"):
        meta.meta_gradient(torch.tensor(1.0), {"log_t": log_t})
    with pytest.raises(ValueError, match=r"meta_gradient: outer_loss must be a scalar, got shape \(2,\)"):
        meta.meta_gradient(log_t * torch.ones(2, dtype=DTYPE), {"log_t": log_t})
    with pytest.raises(TypeError, match=r"meta_gradient: outer_loss must be a torch.Tensor"):
        meta.meta_gradient(1.0, {"log_t": log_t})
    with pytest.raises(ValueError, match=r"meta_gradient: hyper must name at least one tensor"):
        meta.meta_gradient(log_t * 2, {})
    other = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"does not depend on hyper \['other'\]"):
        meta.meta_gradient(log_t * 2, {"log_t": log_t, "other": other})


def test_reaches_walks_the_graph():
    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(2.0, requires_grad=True)
    c = a.exp()
    assert meta.reaches(c * 3, a) and meta.reaches(c * 3, c) and not meta.reaches(c * 3, b)
    assert meta.reaches([c, b * 2], b) and not meta.reaches(c, torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------------------- README


def readme_example(paragraph: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(paragraph):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_meta_step_example_runs():
    """The README's learnable temperature, run as written: log_t moves, the student does not."""
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 3), nn.Linear(8, 3)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(3):
            x = torch.randn(16, 8, generator=g)
            out.append({"input": x, "target": torch.randint(0, 3, (16,), generator=g), "teacher": teacher(x).detach()})
        return out

    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    namespace = {"student": student, "train_batches": batches(0), "held_out_batches": batches(1)}
    exec(readme_example("**Meta-steps.**"), namespace)
    assert namespace["log_t"].item() != 0.0 and namespace["log_t"].grad is not None
    assert all(torch.equal(p, before[name]) and p.grad is None for name, p in student.named_parameters())


def test_a_learned_inner_learning_rate_gets_the_finite_difference_gradient():
    """lr as a tensor that requires grad (Meta-SGD style), second- and first-order: the fast parameters depend on it
    in both modes."""
    model = bn_mlp()
    held_out = make_batch(100)

    def outer(lr, first_order):
        fast = meta.unroll(model, kd_inner, batches=[make_batch(s) for s in range(3)], lr=lr, momentum=0.9,
                           hyper={"lr": lr}, first_order=first_order)
        return F.cross_entropy(fast(held_out["input"], train=True), held_out["target"])

    for first_order in (False, True):
        lr = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
        grad = meta.meta_gradient(outer(lr, first_order), {"lr": lr})["lr"]
        if first_order:     # θ_k = θ_0 − lr·Σ v_i with the v_i detached: d outer / d lr = ∇outer(θ_k)·(θ_k − θ_0)/lr
            fast = meta.unroll(model, kd_inner, batches=[make_batch(s) for s in range(3)], lr=0.3, momentum=0.9)
            at_k = {name: p.detach().requires_grad_(True) for name, p in fast.params.items()}
            outer_k = F.cross_entropy(meta.Unrolled(model, at_k, fast.buffers, [], {})(held_out["input"], train=True),
                                      held_out["target"])
            grads_k = torch.autograd.grad(outer_k, list(at_k.values()))
            expected = sum((g * (at_k[name].detach() - p0.detach())).sum() / 0.3
                           for g, (name, p0) in zip(grads_k, model.named_parameters()))
        else:
            expected = finite_difference(lambda x: outer(x, False), torch.tensor(0.3, dtype=DTYPE))
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)
        assert grad.abs() > 1e-4


def test_the_whole_batch_as_input_and_unrolling_under_no_grad():
    class Reads(nn.Module):             # a model that reads the whole batch (input_key=None)
        def __init__(self):
            super().__init__()
            self.fc = linear_model()

        def forward(self, batch):
            return self.fc(batch["input"])

    model, batch = Reads(), make_batch(0)
    with torch.no_grad():               # unroll turns gradients on for its own steps
        whole = meta.unroll(model, ce_loss, batch=batch, steps=2, lr=0.3, input_key=None)
    keyed = meta.unroll(model.fc, ce_loss, batch=batch, steps=2, lr=0.3)
    torch.testing.assert_close(whole.params["fc.weight"], keyed.params["weight"], rtol=0, atol=0)

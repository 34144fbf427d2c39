"""Per-term gradients (kdkernels.distill.term_gradients): the leaves behind a value, each term's gradient and their
cosine against a hand computation on a linear student, the gradient-similarity gate in a Distiller step (one
forward, the gate's factor detached), and the errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdkernels
from kdkernels import distill
from kdkernels.distill import term_gradients as tg

DTYPE = torch.float64
T = 2.0


def setup():
    torch.manual_seed(0)
    student, teacher = nn.Linear(5, 4).to(DTYPE), nn.Linear(5, 4).to(DTYPE)
    g = torch.Generator().manual_seed(1)
    batch = {"input": torch.randn(6, 5, generator=g, dtype=DTYPE), "target": torch.randint(0, 4, (6,), generator=g)}
    return student, teacher, batch


def hand_gradients(student, teacher, batch):
    """∂CE/∂z = (softmax(z) − onehot)/B and ∂(T²·KL(p_t ‖ softmax(z/T)))/∂z = T·(softmax(z/T) − p_t)/B (batchmean),
    then ∂/∂W = (∂/∂z)ᵀ x and ∂/∂b = Σ_rows ∂/∂z."""
    x, y = batch["input"], batch["target"]
    with torch.no_grad():
        z, zt = student(x), teacher(x)
    n = x.shape[0]
    d_ce = (z.softmax(-1) - F.one_hot(y, 4).to(DTYPE)) / n
    d_kd = T * ((z / T).softmax(-1) - (zt / T).softmax(-1)) / n
    grads = {name: [d.T @ x, d.sum(0)] for name, d in (("ce", d_ce), ("kd", d_kd))}
    flat = {name: torch.cat([g.flatten() for g in gs]) for name, gs in grads.items()}
    cosine = flat["ce"] @ flat["kd"] / (flat["ce"].norm() * flat["kd"].norm())
    kd_value = T * T * F.kl_div(F.log_softmax(z / T, -1), F.log_softmax(zt / T, -1), log_target=True,
                                reduction="batchmean")
    return grads, cosine, kd_value


def test_graph_leaves_are_the_parameters_behind_a_value():
    student, teacher, batch = setup()
    z = student(batch["input"])
    leaves = tg.graph_leaves(z)
    assert len(leaves) == 2 and {id(p) for p in leaves} == {id(p) for p in student.parameters()}
    with torch.no_grad():
        assert tg.graph_leaves(teacher(batch["input"])) == []
    w = torch.ones(3, requires_grad=True)
    assert tg.graph_leaves(w) == [w]


def test_term_gradients_and_cosine_equal_the_hand_computation():
    student, teacher, batch = setup()
    z = student(batch["input"])
    with torch.no_grad():
        zt = teacher(batch["input"])
    ce = F.cross_entropy(z, batch["target"])
    kd = kdkernels.kd_loss(z, zt, temperature=T)           # the fused loss: first derivatives are all this needs
    params = list(student.parameters())
    grads = tg.term_gradients({"ce": ce, "kd": kd}, params)
    expected, cosine, _ = hand_gradients(student, teacher, batch)
    for name in ("ce", "kd"):
        for got, want in zip(grads[name], expected[name]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tg.gradient_cosine(kd, ce, params), cosine, rtol=1e-10, atol=1e-12)
    (ce + kd).backward()                                     # the graph is still there for the step's backward
    torch.testing.assert_close(student.weight.grad, expected["ce"][0] + expected["kd"][0], rtol=1e-10, atol=1e-12)


def test_a_parameter_a_loss_does_not_reach_gets_zeros():
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    grads = tg.term_gradients({"sq": (a ** 2).sum()}, [a, b])
    assert torch.equal(grads["sq"][0], 2 * torch.ones(2)) and torch.equal(grads["sq"][1], torch.zeros(3))
    assert tg.gradient_cosine((a ** 2).sum(), b.sum(), [a, b]).item() == 0.0


@pytest.mark.parametrize("gate", [None, lambda c: c.clamp(min=0)])
def test_the_gate_in_a_distiller_step_weights_kd_by_the_gradient_cosine(gate):
    student, teacher, batch = setup()
    calls = []
    student.register_forward_hook(lambda *_: calls.append(1))
    gated = tg.GradientSimilarityGate(
        distill.FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), weight=0.9, temperature=T),
        reference=distill.CrossEntropyTerm("student"), gate=gate)
    distiller = distill.Distiller({"student": student, "teacher": teacher},
                                  [distill.CrossEntropyTerm("student"), gated])
    distiller.build(batch)
    distiller.train()
    calls.clear()
    out = distiller(batch)
    assert len(calls) == 1                                   # one forward of the student
    grads, cosine, kd_value = hand_gradients(student, teacher, batch)
    assert cosine < 0                                        # conflicting gradients here: the two gates differ
    factor = cosine if gate is None else cosine.clamp(min=0)
    torch.testing.assert_close(gated.last_cosine, cosine, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.terms["kd"], factor * 0.9 * kd_value, rtol=1e-10, atol=1e-12)
    out.loss.backward()                                      # the factor is a detached weight
    torch.testing.assert_close(student.weight.grad, grads["ce"][0] + factor * 0.9 * grads["kd"][0], rtol=1e-10,
                               atol=1e-12)
    assert all(p.grad is None for p in teacher.parameters())


def test_the_gate_is_one_without_gradients():
    student, teacher, batch = setup()
    gated = tg.GradientSimilarityGate(
        distill.FunctionTerm("kd", kdkernels.kd_loss, ("student", "teacher"), temperature=T),
        reference=distill.CrossEntropyTerm("student"))
    distiller = distill.Distiller({"student": student, "teacher": teacher}, [gated]).build(batch)
    with torch.no_grad():
        out = distiller(batch)
    _, _, kd_value = hand_gradients(student, teacher, batch)
    torch.testing.assert_close(out.terms["kd"], kd_value, rtol=1e-10, atol=1e-12)
    assert gated.last_cosine is None and gated.reads == ("student", "teacher", "target")


def test_errors_name_the_argument():
    a = torch.ones(2, requires_grad=True)
    ce = distill.CrossEntropyTerm("student")
    with pytest.raises(ValueError, match=r"term_gradients: losses\['x'\] must be differentiable"):
        tg.term_gradients({"x": torch.tensor(1.0)}, [a])
    with pytest.raises(ValueError, match=r"term_gradients: losses\['x'\] must be a scalar, got shape \(2,\)"):
        tg.term_gradients({"x": a * 2}, [a])
    with pytest.raises(TypeError, match=r"term_gradients: losses must be a mapping"):
        tg.term_gradients([a.sum()], [a])
    with pytest.raises(ValueError, match=r"term_gradients: params\[0\] must require grad"):
        tg.term_gradients({"x": a.sum()}, [torch.ones(2)])
    with pytest.raises(ValueError, match=r"term_gradients: params must hold at least one tensor"):
        tg.term_gradients({"x": a.sum()}, [])
    with pytest.raises(TypeError, match=r"term_gradients: params\[0\] must be a torch.Tensor"):
        tg.term_gradients({"x": a.sum()}, [1.0])
    with pytest.raises(ValueError, match=r"gradient_cosine: eps must be positive"):
        tg.gradient_cosine(a.sum(), a.sum(), [a], eps=0.0)
    with pytest.raises(TypeError, match=r"GradientSimilarityGate: term must be a Term"):
        tg.GradientSimilarityGate(F.mse_loss, ce)
    with pytest.raises(TypeError, match=r"GradientSimilarityGate: reference must be a Term"):
        tg.GradientSimilarityGate(ce, "ce")
    with pytest.raises(TypeError, match=r"GradientSimilarityGate: gate must be a callable"):
        tg.GradientSimilarityGate(ce, ce, gate=0.5)
    with pytest.raises(TypeError, match=r"graph_leaves: tensor must be a torch.Tensor"):
        tg.graph_leaves([a])


def test_readme_gate_example_builds_and_steps():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("**Per-term gradients.**"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    student, teacher, batch = setup()
    namespace = {"student": student, "teacher": teacher, "distill": distill, "kdkernels": kdkernels}
    exec(example, namespace)
    distiller = namespace["distiller"].build(batch)
    out = distiller(batch)
    assert set(out.terms) == {"ce_student", "kd"} and namespace["gated_kd"].last_cosine is not None

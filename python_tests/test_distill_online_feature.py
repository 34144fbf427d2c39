"""Online feature-map distillation (kdkernels/distill/methods/online_feature.py): AFD's terms equal the paper's
formulas written out here on one step's tensors, the optimisers own the right parameters, exact resume, errors."""
import pytest
import torch
import torch.nn.functional as F

from distill_testing import digits_setup, first_step
from kdkernels.distill import build_recipe, get_method
from kdkernels.distill.optimisers import optimiser_parameters
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, parameters_of, small_split


def close(actual, expected):
    torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)


# ---- AFD (approximation) ---------------------------------------------------------------------------------------

def test_afd_is_registered_as_an_online_approximation():
    method = get_method("afd-online")
    assert method.category == "online" and "ICML 2020" in method.paper and not method.needs_teacher
    assert "no official code" in method.approximation


def afd_official(names, logits, maps, discriminators, transfers, y, temperature=3.0):
    """Chung et al. (ICML 2020): ``L_logit^k = CE(y, σ(z_k)) + T²·KL(σ(z_j/T) ‖ σ(z_k/T))``, ``L_G_k = [1 −
    D_k(T_k(G_k))]²``, ``L_D_k = [1 − D_k(T_j(G_j))]² + [D_k(T_k(G_k))]²``, j = k − 1 cyclically; batch means."""
    terms = {}
    mapped = [transfers[name](maps[name]) for name in names]
    adv, disc = 0.0, 0.0
    for k, name in enumerate(names):
        j = names[k - 1]
        terms[f"ce_{name}"] = F.cross_entropy(logits[name], y)
        terms[f"kl_{name}"] = temperature ** 2 * F.kl_div(F.log_softmax(logits[name] / temperature, 1),
                                                          F.softmax(logits[j].detach() / temperature, 1),
                                                          reduction="batchmean")
        d = discriminators[name]
        adv = adv + ((1 - d(mapped[k])) ** 2).mean()
        disc = disc + ((1 - d(mapped[k - 1].detach())) ** 2).mean() + (d(mapped[k].detach()) ** 2).mean()
    terms["afd_adv"], terms["afd_d"] = adv, disc
    return terms


@pytest.mark.parametrize("overrides", [{}, {"networks": 3, "peer_model": "assistant"}])
def test_afd_step_is_the_papers_formula(overrides):
    """Two identical networks (mutual), and three networks of unequal widths (cyclic, transfer layers)."""
    distiller, batch, values, output = first_step(build_recipe("afd-online", digits_setup(), **overrides))
    names = list(distiller.models)
    assert names == ["student", "peer1", "peer2"][:overrides.get("networks", 2)]
    adversarial, discriminator_term = distiller.terms[-2], distiller.terms[-1]
    maps = {name: values[f"{name}:stage3"] for name in names}
    expected = afd_official(names, {name: values[name] for name in names}, maps,
                            discriminator_term.discriminators, adversarial.transfers, batch["target"])
    assert set(output.terms) == set(expected)
    for name, value in expected.items():
        close(output.terms[name], value)
    widths = {name: maps[name].shape[1] for name in names}
    for name in names:   # transfer layers exactly where a map is narrower than the widest
        assert isinstance(adversarial.transfers[name], torch.nn.Identity) == (widths[name] == max(widths.values()))
    if "peer_model" in overrides:
        assert widths["student"] < widths["peer1"]


def test_afd_optimisers_own_networks_and_discriminators():
    recipe = build_recipe("afd-online", digits_setup(), networks=3, peer_model="assistant")
    distiller, *_ = first_step(recipe)
    stage = recipe.stages[0]
    groups = {name: {id(p) for p in params}
              for name, params in optimiser_parameters(stage.name, distiller, stage.optimisers).items()}
    networks = {id(p) for name in ("student", "peer1", "peer2") for p in distiller.models[name].parameters()}
    transfers = {id(p) for p in distiller.terms[-2].transfers.parameters()}
    assert transfers and groups["networks"] == networks | transfers
    assert groups["discriminators"] == {id(p) for p in distiller.terms[-1].discriminators.parameters()}
    assert stage.optimisers["discriminators"].terms == ("afd_d",) and stage.step_plan == "simultaneous"
    assert "afd_adv" in stage.optimisers["networks"].terms and "afd_d" not in stage.optimisers["networks"].terms


def test_afd_discriminators_step_on_their_own_loss_only():
    """After one step, the discriminators do not depend on adv_weight (no network loss reaches them); the networks
    do."""
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, **QUIET)
    distillers = {}
    for adv_weight in (1.0, 0.0):
        recipe = build_recipe("afd-online", digits_setup(), adv_weight=adv_weight)
        initial = parameters_of(recipe.stages[0].distiller.models["peer1"])
        Trainer(config).fit(recipe, small_split().train)
        distillers[adv_weight] = recipe.stages[0].distiller
        assert not torch.equal(parameters_of(distillers[adv_weight].models["peer1"])["fc.weight"],
                               initial["fc.weight"])
    with_adv, without_adv = (parameters_of(distillers[w].terms[-1]) for w in (1.0, 0.0))
    assert with_adv and all(torch.equal(with_adv[name], value) for name, value in without_adv.items())
    students = [parameters_of(distillers[w].models["student"]) for w in (1.0, 0.0)]
    assert any(not torch.equal(students[0][name], students[1][name]) for name in students[0])


def test_afd_resume_is_bit_exact(tmp_path):
    def make(seed=0):
        return build_recipe("afd-online", digits_setup(seed=seed), step_plan="alternate")
    assert_resume_is_exact(make, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"networks": 1}, ValueError, "afd-online: networks"),
    ({"networks": 2.0}, TypeError, "afd-online: networks"),
    ({"peer_model": "teacher"}, ValueError, "afd-online: peer_model"),
    ({"temperature": 0.0}, ValueError, "afd-online: temperature"),
    ({"adv_weight": -1.0}, ValueError, "afd-online: adv_weight"),
    ({"discriminator_width": 0}, ValueError, "afd-online: discriminator_width"),
    ({"discriminator_lr_scale": 0.0}, ValueError, "afd-online: discriminator_lr_scale"),
    ({"step_plan": "sometimes"}, ValueError, "afd-online: step_plan"),
    ({"step_plan": {"networks": 1}}, TypeError, "afd-online: step_plan"),
    ({"layer": 3}, TypeError, "afd-online: layer"),
])
def test_afd_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("afd-online", digits_setup(), **overrides)


class EightByEight(torch.nn.Module):
    """A peer whose ``stage3`` map is [B, 4, 8, 8] (the student's is [B, 16, 2, 2])."""

    def __init__(self):
        super().__init__()
        self.stage3, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.stage3(x).mean(dim=(2, 3)))


def test_afd_maps_of_different_sizes_are_refused():
    setup = digits_setup()
    setup.new_assistant = EightByEight
    with pytest.raises(ValueError, match="same number of dimensions and spatial size"):
        first_step(build_recipe("afd-online", setup, peer_model="assistant"))


# ---- OEC-KD (okd-feature, approximation: the networks) ----------------------------------------------------------

def test_okd_feature_is_registered_as_an_online_approximation():
    method = get_method("okd-feature")
    assert method.category == "online" and "ECCV 2020" in method.paper and not method.needs_teacher
    assert "Devwalkar/BOC-KD" in method.approximation and "cifar10" in method.presets


def boc_kd_step(logits, y, maps, adaptation, T, ratios):
    """Devwalkar/BOC-KD ``BIO_ResNet._forward_student`` + ``Combined_Loss.student_forward`` written out: pseudo
    teacher = the mean logits (weights 1/K); Σ CE of the students; Σ_b Σ_{j≥1} MSE(f_0^b.detach(), A_j^b(f_j^b));
    Σ_i T²·KL(softmax(z_e/T).detach() ‖ softmax(z_i/T)) (sum over classes, / batch)."""
    K = len(logits)
    teacher = sum(z / K for z in logits)
    normal = sum(F.cross_entropy(z, y) for z in logits)
    inter = sum(F.mse_loss(maps[b][0].detach(), adaptation[b][j - 1](maps[b][j]))
                for b in range(len(maps)) for j in range(1, K))
    target = F.softmax(teacher / T, dim=1).detach()
    kl = sum(T ** 2 * (target * (target.log() - F.log_softmax(z / T, dim=1))).sum() / z.shape[0] for z in logits)
    return ratios[0] * normal + ratios[1] * inter + ratios[2] * kl


@pytest.mark.parametrize("preset, T, ratios", [("default", 2.0, (0.7, 0.15, 0.15)), ("cifar10", 3.0, (1, 1, 1))])
def test_okd_feature_step_is_the_official_combined_loss(preset, T, ratios):
    distiller, batch, values, output = first_step(build_recipe("okd-feature", digits_setup(), preset=preset,
                                                               networks=3))
    names = ["full", "student", "peer2"]
    assert list(distiller.models) == names and distiller.evaluate == ("student", "full", "peer2")
    assert distiller.models["full"].stage3[0].out_channels > distiller.models["student"].stage3[0].out_channels
    term = distiller.terms[0]
    layers = ["stage1", "stage2", "stage3"]
    maps = [[values[f"{name}:{layer}"] for name in names] for layer in layers]
    adaptation = [[term.adaptation[f"{name}_{b}"] for name in names[1:]] for b in range(len(layers))]
    for b, layer in enumerate(layers):   # 1×1 convolutions with bias, student channels → student 0's
        for conv, name in zip(adaptation[b], names[1:]):
            assert conv.kernel_size == (1, 1) and conv.bias is not None
            assert (conv.in_channels, conv.out_channels) == (maps[b][names.index(name)].shape[1], maps[b][0].shape[1])
    expected = boc_kd_step([values[name] for name in names], batch["target"], maps, adaptation, T, ratios)
    close(output.terms["oec"], expected)


def test_okd_feature_optimisers_and_the_detached_targets():
    recipe = build_recipe("okd-feature", digits_setup(), networks=2, full_model="student")
    distiller, batch, values, output = first_step(recipe)
    stage = recipe.stages[0]
    groups = {name: {id(p) for p in params}
              for name, params in optimiser_parameters(stage.name, distiller, stage.optimisers).items()}
    networks = {id(p) for name in ("full", "student") for p in distiller.models[name].parameters()}
    assert groups["networks"] == networks
    assert groups["adaptation"] == {id(p) for p in distiller.terms[0].adaptation.parameters()}
    assert stage.optimisers["adaptation"].lr_scale == 0.5 and stage.step_plan == "simultaneous"
    full_map = values["full:stage3"]
    (grad,) = torch.autograd.grad(output.loss, [full_map], allow_unused=True)
    assert grad is not None   # through full's own CE and KL ...
    ce_kl_only = build_recipe("okd-feature", digits_setup(), networks=2, full_model="student", feature_weight=0.0)
    _, _, values_0, output_0 = first_step(ce_kl_only)
    (grad_0,) = torch.autograd.grad(output_0.loss, [values_0["full:stage3"]])
    torch.testing.assert_close(grad, grad_0)   # ... but not through the feature term (the target is detached)


def test_okd_feature_resume_is_bit_exact(tmp_path):
    def make(seed=0):
        return build_recipe("okd-feature", digits_setup(seed=seed), networks=2, layers=["stage2"])
    assert_resume_is_exact(make, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"networks": 1}, ValueError, "okd-feature: networks"),
    ({"full_model": "teacher"}, ValueError, "okd-feature: full_model"),
    ({"temperature": -1.0}, ValueError, "okd-feature: temperature"),
    ({"feature_weight": -0.1}, ValueError, "okd-feature: feature_weight"),
    ({"adaptation_lr_scale": 0.0}, ValueError, "okd-feature: adaptation_lr_scale"),
    ({"layers": "stage3"}, TypeError, "okd-feature: layers"),
    ({"layers": []}, ValueError, "okd-feature: layers"),
])
def test_okd_feature_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("okd-feature", digits_setup(), **overrides)


def test_okd_feature_maps_of_different_sizes_are_refused():
    setup = digits_setup()
    setup.new_assistant = EightByEight
    with pytest.raises(ValueError, match="must be a map of the spatial size"):
        first_step(build_recipe("okd-feature", setup, networks=2, layers=["stage3"]))


# ---- SOKD's feature-based extension (methods/online.py) -----------------------------------------------------------

def repdistiller_at(f_s, f_t):
    """RepDistiller ``distiller_zoo/AT.py`` (p = 2, maps of equal size): ``(at(f_s) − at(f_t)).pow(2).mean()``,
    ``at(f) = normalize(f.pow(2).mean(1).view(B, −1))``."""
    at = lambda f: F.normalize(f.pow(2).mean(1).view(f.size(0), -1))  # noqa: E731
    return (at(f_s) - at(f_t)).pow(2).mean()


def soft_target(s, t, T=4.0):
    """swlzq/Semi-Online-KD ``kd_losses/st.py`` SoftTarget: ``KL(softmax(t/T) ‖ softmax(s/T)) · T²``, batchmean."""
    return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T


def test_sokd_feature_term_is_attention_transfer_from_the_branch():
    distiller, batch, values, output = first_step(build_recipe("sokd", digits_setup(), preset="feature"))
    term = distiller.terms[1]
    assert term.reads[-1] == "student:stage3" and term.weights["feature"] == 1000.0
    branch_map = term.branch[0](values["teacher:stage2"].detach())
    auxiliary = term.branch(values["teacher:stage2"].detach())
    s, t, y = values["student"], values["teacher"], batch["target"]
    official = (F.cross_entropy(auxiliary, y) + soft_target(auxiliary, t.detach()) + soft_target(auxiliary, s.detach())
                + soft_target(s, auxiliary.detach()))
    feature = repdistiller_at(values["student:stage3"], branch_map.detach())
    assert feature.item() > 0
    close(output.terms["sokd"], official + 1000.0 * feature)


def test_sokd_feature_term_trains_the_student_only_and_is_off_by_default():
    default = build_recipe("sokd", digits_setup())
    assert default.stages[0].distiller.terms[1].reads == ("student", "teacher", "teacher:stage2", "target")
    grads = {}
    for weight in (0.0, 1000.0):
        distiller, batch, values, output = first_step(build_recipe("sokd", digits_setup(), feature_weight=weight))
        term = distiller.terms[1]
        student = distiller.models["student"]
        parameters = [*term.branch.parameters(), *student.stage3.parameters()]
        grads[weight] = torch.autograd.grad(output.loss, parameters)
    branch_count = len(list(term.branch.parameters()))
    for without, with_feature in zip(grads[0.0][:branch_count], grads[1000.0][:branch_count]):
        torch.testing.assert_close(with_feature, without)       # the branch map enters detached
    assert any(not torch.allclose(a, b) for a, b in zip(grads[0.0][branch_count:], grads[1000.0][branch_count:]))


def test_sokd_feature_resume_is_bit_exact(tmp_path):
    def make(seed=0):
        return build_recipe("sokd", digits_setup(student="student-cnn", teacher="assistant-cnn", seed=seed),
                            feature_weight=100.0, feature_layer="stage2")
    assert_resume_is_exact(make, dict(epochs=2, batch_size=32, lr=0.05, **QUIET), tmp_path)


@pytest.mark.parametrize("overrides, error, match", [
    ({"feature_weight": -1.0}, ValueError, "sokd: feature_weight"),
    ({"feature_weight": "1"}, TypeError, "sokd: feature_weight"),
    ({"feature_weight": 1.0, "feature_layer": 3}, TypeError, "sokd: feature_layer"),
])
def test_sokd_feature_bad_configuration(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("sokd", digits_setup(), **overrides)

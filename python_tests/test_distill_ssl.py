"""Self-supervised target networks as self-distillation (SimSiam, MoCo v2, DINO, SDSSL): one step equal to the
official formulas transcribed here on the method's own values, the stop-gradients, the momentum networks and their
state (MoCo's queue, DINO's center) resumed exactly, the linear-probe evaluation and configuration errors (the
losses against the official code: test_losses_self_supervised.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill_testing import batches_for, digits_setup
from kdkernels.distill import build_recipe
from kdkernels.distill.terms import StepContext
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, assert_resume_is_exact, small_split


def cnn_embedding(model, images):
    """DigitsCNN's pooled feature (the input of its ``fc``), computed layer by layer."""
    return model.flatten(model.pool(model.stage3(model.stage2(model.stage1(images)))))


def ssl_step(method, epoch=1, step=2, epochs=10, preset="digits", before=None, **overrides):
    """(distiller, viewed batch, output) of one training forward of ``method`` on the first digits batch
    (``before(distiller, values)`` runs after the models, before the terms)."""
    recipe = build_recipe(method, digits_setup(teacher=None), preset=preset, **overrides)
    distiller = recipe.stages[0].distiller
    batch = next(iter(batches_for(recipe.stages[0], batch_size=16)))
    distiller.build(batch).activate().train()
    viewed = distiller.apply_views(batch, seed=0, epoch=epoch, step=step)
    values = distiller.run_models(viewed)
    if before is not None:
        before(distiller, values)
    output = distiller.compute_terms(values, StepContext(epoch=epoch, epochs=epochs, step=step, batch=viewed))
    return distiller, viewed, output


def official_classifier_loss(student, embedding, labels):
    """The online classifier's CE on the stop-gradient embedding of view 1 (as byol_experiment.py ``classif_loss``)."""
    return F.cross_entropy(student.fc(embedding.detach()), labels)


def assert_a_short_run_reports_the_probe(method, trained_terms):
    recipe = build_recipe(method, digits_setup(student="student-mlp", teacher=None), preset="digits")
    assert recipe.metrics == ("linear_probe",)
    result = Trainer(TrainConfig(epochs=1, batch_size=16, lr=0.05, **QUIET)).fit(recipe, small_split().train,
                                                                                 small_split().test)
    assert set(result.accuracies) == {"student"} and result.student is recipe.stages[0].distiller.models["student"]
    assert 0.0 <= result.evaluation["test_probe_acc_student"] <= 100.0
    for term in trained_terms:
        assert term in result.history[-1] and torch.isfinite(torch.tensor(result.history[-1][term]))
    return recipe, result


def assert_method_resumes_exactly(method, tmp_path, **overrides):
    def make(seed):
        recipe = build_recipe(method, digits_setup(student="student-mlp", teacher=None, seed=seed), preset="digits",
                              **overrides)
        recipe.metrics = ()   # the training state is what resumes; the probe is tested on a short run
        return recipe

    assert_resume_is_exact(make, dict(epochs=3, batch_size=16, lr=0.05, **QUIET), tmp_path)


# ---------------------------------------------------------------------------------------- SimSiam (facebookresearch)

def official_simsiam_forward(network, views):
    """``simsiam/builder.py`` ``SimSiam.forward`` on a BYOLNetwork's modules: ``z = encoder(x)`` (the student's
    embedding then the projector), ``p = predictor(z)``, returning ``p1, p2, z1.detach(), z2.detach()``; plus the
    embeddings."""
    e1, e2 = (cnn_embedding(network.encoder, v) for v in views)
    z1, z2 = network.projector(e1), network.projector(e2)
    return network.predictor(z1), network.predictor(z2), z1.detach(), z2.detach(), e1


@pytest.mark.parametrize("epoch", [1, 3])
def test_a_simsiam_step_is_the_official_loss(epoch):
    distiller, viewed, output = ssl_step("simsiam", epoch=epoch)
    online = distiller.models["online"]
    assert set(distiller.models) == {"student", "online"}, "no momentum network"
    assert not torch.equal(viewed["input"], viewed["input_view2"]), "two independent augmentations"
    with torch.no_grad():
        p1, p2, z1, z2, e1 = official_simsiam_forward(online, (viewed["input"], viewed["input_view2"]))
        criterion = torch.nn.CosineSimilarity(dim=1)
        loss = -(criterion(p1, z2).mean() + criterion(p2, z1).mean()) * 0.5     # main_simsiam.py train
        classifier = official_classifier_loss(online.encoder, e1, viewed["target"])
    torch.testing.assert_close(output.terms["simsiam"], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["ce_classifier"], classifier, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.loss.detach(), loss + classifier, rtol=1e-5, atol=1e-6)
    assert -1 < output.terms["simsiam"] < 1


def test_simsiam_stops_the_gradient_at_the_projections():
    distiller, _, output = ssl_step("simsiam")
    online = distiller.models["online"]
    student = online.encoder
    assert student is distiller.models["student"]
    output.term_losses["simsiam"].backward()
    assert all(p.grad is None for p in student.fc.parameters()), "the SimSiam loss does not read the classifier"
    encoder = [p for name, p in student.named_parameters() if not name.startswith("fc.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder + list(online.predictor.parameters()))
    grads = [p.grad.clone() for p in encoder]
    # the same loss with the projections' gradient left on: a different gradient (so the stop-gradient acts)
    student.zero_grad(set_to_none=True)
    online.predictor.zero_grad(set_to_none=True)
    online.projector.zero_grad(set_to_none=True)
    values = distiller.run_models(distiller.apply_views(next(iter(batches_for(
        build_recipe("simsiam", digits_setup(teacher=None), preset="digits").stages[0], batch_size=16))),
        seed=0, epoch=1, step=2))
    p, z = values["online:predictions"], values["online:projections"]
    (-(F.cosine_similarity(p[0], z[1]).mean() + F.cosine_similarity(p[1], z[0]).mean()) * 0.5).backward()
    assert any(not torch.allclose(p.grad, g) for p, g in zip(encoder, grads))


def test_simsiam_run_reports_the_linear_probe():
    assert_a_short_run_reports_the_probe("simsiam", ("simsiam", "ce_classifier"))


def test_simsiam_resume_is_exact(tmp_path):
    assert_method_resumes_exactly("simsiam", tmp_path)


def test_simsiam_defaults_are_the_official_configuration():
    recipe = build_recipe("simsiam", digits_setup(teacher=None))
    assert recipe.hyperparameters == {"dim": 2048, "pred_dim": 512, "projector_hidden": None, "translate": 4,
                                      "flip": True, "noise": 0.0}
    online = recipe.stages[0].distiller.models["online"]
    layers = [(type(m).__name__, getattr(m, "in_features", getattr(m, "num_features", None)),
               getattr(m, "out_features", None), getattr(m, "bias", False) is not None) for m in online.projector]
    assert layers == [("Linear", 16, 16, False), ("BatchNorm1d", 16, None, True), ("ReLU", None, None, True),
                      ("Linear", 16, 16, False), ("BatchNorm1d", 16, None, True), ("ReLU", None, None, True),
                      ("Linear", 16, 2048, False), ("BatchNorm1d", 2048, None, False)]
    assert not online.projector[7].affine
    predictor = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None))
                 for m in online.predictor]
    assert predictor == [("Linear", 2048, 512), ("BatchNorm1d", None, None), ("ReLU", None, None),
                         ("Linear", 512, 2048)]
    assert online.predictor[0].bias is None and online.predictor[3].bias is not None
    assert not recipe.stages[0].distiller.updates


@pytest.mark.parametrize("overrides, error, match", [
    ({"dim": 0}, ValueError, r"simsiam: dim must be an int >= 1, got 0"),
    ({"pred_dim": 2.5}, TypeError, r"simsiam: pred_dim must be an int"),
    ({"projector_hidden": 0}, ValueError, r"simsiam: projector_hidden must be an int >= 1, got 0"),
    ({"translate": -1}, ValueError, r"simsiam: translate must be an int >= 0, got -1"),
    ({"flip": "no"}, TypeError, r"simsiam: flip must be a bool"),
    ({"noise": -0.1}, ValueError, r"simsiam: noise must be >= 0"),
])
def test_simsiam_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("simsiam", digits_setup(teacher=None), **overrides)


# ------------------------------------------------------------------------------------------- MoCo v2 (facebookresearch)

def official_moco_logits(network_q, network_k, im_q, im_k, queue_dk, T):
    """``moco/builder.py`` ``MoCo.forward`` on HeadNetworks' modules (one device: no shuffle): normalised q of the
    query encoder on im_q, k of the key encoder on im_k, ``[l_pos, l_neg] / T`` against the [dim, K] queue."""
    q = F.normalize(network_q.head(cnn_embedding(network_q.encoder, im_q)), dim=1)
    k = F.normalize(network_k.head(cnn_embedding(network_k.encoder, im_k)), dim=1)
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue_dk.clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    return logits, torch.zeros(logits.shape[0], dtype=torch.long), k


def official_dequeue_and_enqueue(queue_dk, queue_ptr, keys, K):
    """``_dequeue_and_enqueue`` (one device), with K a multiple of the batch size."""
    batch_size = keys.shape[0]
    ptr = int(queue_ptr)
    assert K % batch_size == 0
    queue_dk[:, ptr:ptr + batch_size] = keys.T
    queue_ptr[0] = (ptr + batch_size) % K


@pytest.mark.parametrize("start", [0, 16, 240])
def test_a_moco_step_is_the_official_infonce_and_enqueue(start):
    saved = {}

    def before(distiller, _values):
        term = distiller.terms[0]
        term.queue_ptr.fill_(start)
        saved["queue"], saved["ptr"] = term.queue.clone(), term.queue_ptr.clone()

    distiller, viewed, output = ssl_step("moco", before=before)
    online, key = distiller.models["online"], distiller.models["target_network"]
    term = distiller.terms[0]
    assert key.training and distiller.inputs["target_network"] == "input_view2"
    assert not torch.equal(viewed["input"], viewed["input_view2"])
    queue_dk, ptr = saved["queue"].T.clone(), saved["ptr"].clone()
    with torch.no_grad():
        logits, labels, k = official_moco_logits(online, key, viewed["input"], viewed["input_view2"], queue_dk, 0.2)
        loss = torch.nn.CrossEntropyLoss()(logits, labels)          # main_moco.py criterion
        classifier = official_classifier_loss(online.encoder, cnn_embedding(online.encoder, viewed["input"]),
                                              viewed["target"])
    official_dequeue_and_enqueue(queue_dk, ptr, k, 256)
    torch.testing.assert_close(output.terms["moco"], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["ce_classifier"], classifier, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.queue, queue_dk.T, rtol=1e-6, atol=1e-7)
    assert torch.equal(term.queue_ptr, ptr) and int(term.queue_ptr) == (start + 16) % 256
    assert not torch.equal(term.queue, saved["queue"])


def test_the_moco_queue_wraps_around_and_rejects_a_batch_larger_than_itself():
    def before(distiller, values):
        distiller.terms[0].queue_ptr.fill_(250)
        before.queue = distiller.terms[0].queue.clone()
        before.keys = F.normalize(values["target_network:projections"], dim=1)

    distiller, _, _ = ssl_step("moco", before=before)
    term = distiller.terms[0]
    changed = (term.queue != before.queue).any(dim=1)
    assert changed[250:].all() and changed[:10].all() and not changed[10:250].any()
    assert int(term.queue_ptr) == 10
    torch.testing.assert_close(term.queue[250:], before.keys[:6], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(term.queue[:10], before.keys[6:], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"moco: a batch of 16 keys does not fit the queue of queue_size=8"):
        ssl_step("moco", queue_size=8)


def test_the_key_encoder_is_the_momentum_average_of_the_query_encoder():
    distiller, _, output = ssl_step("moco", momentum=0.9)
    update = distiller.updates["target_network"]
    assert (update.source, update.momentum, update.schedule, update.warmup, update.buffers) == (
        "online", 0.9, "constant", False, "own")
    online, key = distiller.models["online"], distiller.models["target_network"]
    output.loss.backward()
    assert all(p.grad is None for p in key.parameters()), "no gradient to keys"
    assert all(p.grad is not None for p in online.head.parameters())
    with torch.no_grad():
        for parameter in online.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: p.clone() for name, p in key.named_parameters()}
    buffers = {name: b.clone() for name, b in key.named_buffers()}
    from kdkernels.distill.updates import StepClock
    distiller.updates.after_step(distiller.models, StepClock(step=3, steps_per_epoch=5, total_steps=50))
    for name, param_q in online.named_parameters():   # _momentum_update_key_encoder
        expected = before[name] * 0.9 + param_q.detach() * (1.0 - 0.9)
        torch.testing.assert_close(dict(key.named_parameters())[name], expected, rtol=1e-6, atol=1e-6)
    for name, value in key.named_buffers():
        assert torch.equal(value, buffers[name]), f"the key encoder's batch-norm statistics are its own ({name})"


def test_moco_run_reports_the_linear_probe_and_fills_the_queue():
    recipe, result = assert_a_short_run_reports_the_probe("moco", ("moco", "ce_classifier"))
    term = recipe.stages[0].distiller.terms[0]
    seen = len(small_split().train)   # one epoch: every training sample's key enqueued once, none at evaluation
    assert int(term.queue_ptr) == seen % 256, (int(term.queue_ptr), seen)
    torch.testing.assert_close(term.queue.norm(dim=1), torch.ones(256))


def test_moco_resume_is_exact_queue_included(tmp_path):
    recipe = build_recipe("moco", digits_setup(teacher=None), preset="digits")
    state = recipe.stages[0].distiller.state_dict()
    assert state["terms.0.queue"].shape == (256, 32) and state["terms.0.queue_ptr"].dtype == torch.long
    assert_method_resumes_exactly("moco", tmp_path)


def test_moco_defaults_are_the_official_v2_configuration():
    recipe = build_recipe("moco", digits_setup(teacher=None))
    assert recipe.hyperparameters == {"dim": 128, "queue_size": 65536, "momentum": 0.999, "temperature": 0.2,
                                      "mlp": True, "mlp_hidden": None, "translate": 4, "flip": True, "noise": 0.0}
    distiller = recipe.stages[0].distiller
    head = distiller.models["online"].head
    assert [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None)) for m in head] == [
        ("Linear", 16, 16), ("ReLU", None, None), ("Linear", 16, 128)]
    term = distiller.terms[0]
    assert term.queue.shape == (65536, 128) and term.temperature == 0.2
    torch.testing.assert_close(term.queue.norm(dim=1), torch.ones(65536))
    v1 = build_recipe("moco", digits_setup(teacher=None), preset="v1")
    assert isinstance(v1.stages[0].distiller.models["online"].head, torch.nn.Linear)
    assert v1.stages[0].distiller.terms[0].temperature == 0.07


@pytest.mark.parametrize("overrides, error, match", [
    ({"dim": 0}, ValueError, r"moco: dim must be an int >= 1, got 0"),
    ({"queue_size": 2.0}, TypeError, r"moco: queue_size must be an int"),
    ({"momentum": 1.5}, ValueError, r"moco: momentum must be in \[0, 1\], got 1.5"),
    ({"temperature": 0}, ValueError, r"moco: temperature must be positive"),
    ({"mlp": 1}, TypeError, r"moco: mlp must be a bool"),
    ({"mlp": False, "mlp_hidden": 8}, ValueError, r"moco: mlp_hidden must be None without the MLP head"),
    ({"noise": -0.1}, ValueError, r"moco: noise must be >= 0"),
])
def test_moco_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("moco", digits_setup(teacher=None), **overrides)


# ---------------------------------------------------------------------------------------- DINO (facebookresearch)

class OfficialDINOLoss(torch.nn.Module):
    """facebookresearch/dino ``main_dino.py`` ``DINOLoss`` (one process: ``dist.all_reduce`` is the identity and the
    world size 1)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def official_multicrop(network, crops):
    """``utils.py`` ``MultiCropWrapper.forward`` on a DINONetwork's modules: crops of one resolution concatenated
    (here: the globals, then the locals), the backbone (the student's embedding) per group, the head on all."""
    output = torch.cat([cnn_embedding(network.encoder, torch.cat(group)) for group in crops if group])
    return network.head(output)


@pytest.mark.parametrize("epoch", [1, 4, 12])
def test_a_dino_step_is_the_official_loss_and_center_update(epoch):
    saved = {}

    def before(distiller, _values):
        term = distiller.terms[0]
        term.center.copy_(torch.randn_like(term.center) * 0.1)
        saved["center"] = term.center.clone()

    distiller, viewed, output = ssl_step("dino", epoch=epoch, epochs=20, before=before)
    student, teacher = distiller.models["online"], distiller.models["target_network"]
    assert teacher.training and teacher.local_views == () and len(student.local_views) == 4
    globals_ = [viewed["input"], viewed["input_view2"]]
    locals_ = [viewed[f"input_local{i}"] for i in range(4)]
    assert not torch.equal(locals_[0], locals_[1]) and not torch.equal(locals_[0], viewed["input"])
    official = OfficialDINOLoss(128, 6, 0.04, 0.07, 10, 20)
    official.center = saved["center"].clone()
    with torch.no_grad():
        teacher_output = official_multicrop(teacher, [globals_])      # only the 2 global views pass the teacher
        student_output = official_multicrop(student, [globals_, locals_])
        loss = official(student_output, teacher_output, epoch - 1)
        classifier = official_classifier_loss(student.encoder, cnn_embedding(student.encoder, torch.cat(globals_)
                                                                             )[:16], viewed["target"])
    torch.testing.assert_close(output.terms["dino"], loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.terms["ce_classifier"], classifier, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(distiller.terms[0].center, official.center, rtol=1e-5, atol=1e-7)
    assert not torch.equal(distiller.terms[0].center, saved["center"])


def test_the_teacher_temperature_is_the_official_schedule():
    from kdkernels.distill.methods.self_supervised import dino_teacher_temperature
    for warmup_epochs, nepochs in ((30, 100), (10, 30), (1, 5), (0, 5)):
        schedule = np.concatenate((np.linspace(0.04, 0.07, warmup_epochs), np.ones(nepochs - warmup_epochs) * 0.07))
        for epoch in range(nepochs):
            assert dino_teacher_temperature(epoch, 0.04, 0.07, warmup_epochs) == pytest.approx(schedule[epoch],
                                                                                             rel=1e-12)


def test_dino_teacher_is_the_cosine_ema_of_the_whole_student_network():
    distiller, _, output = ssl_step("dino", momentum_teacher=0.9)
    update = distiller.updates["target_network"]
    assert (update.source, update.momentum, update.schedule, update.buffers) == ("online", 0.9, "cosine", "own")
    assert "target_network" in distiller.frozen_train_mode
    student, teacher = distiller.models["online"], distiller.models["target_network"]
    output.term_losses["dino"].backward(retain_graph=True)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in student.encoder.fc.parameters()), "the DINO loss does not read the classifier"
    encoder = [p for name, p in student.encoder.named_parameters() if not name.startswith("fc.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder + list(student.head.parameters()))
    student.zero_grad(set_to_none=True)
    output.term_losses["ce_classifier"].backward()
    assert all(p.grad is not None for p in student.encoder.fc.parameters())
    assert all(p.grad is None for p in encoder), "the labels never reach the encoder"
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter))
    before = {name: p.clone() for name, p in teacher.named_parameters()}
    from kdkernels.distill.updates import StepClock
    distiller.updates.after_step(distiller.models, StepClock(step=10, steps_per_epoch=5, total_steps=40))
    m = 1 + 0.5 * (0.9 - 1) * (1 + np.cos(np.pi * 10 / 40))     # utils.cosine_scheduler(0.9, 1, ...)[10]
    for name, param_q in student.named_parameters():     # param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        torch.testing.assert_close(dict(teacher.named_parameters())[name],
                                   before[name] * m + (1 - m) * param_q.detach(), rtol=1e-6, atol=1e-6)


def test_dino_head_is_the_official_dinohead():
    recipe = build_recipe("dino", digits_setup(teacher=None))
    head = recipe.stages[0].distiller.models["online"].head
    kinds = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None)) for m in head.mlp]
    assert kinds == [("Linear", 16, 2048), ("GELU", None, None), ("Linear", 2048, 2048), ("GELU", None, None),
                     ("Linear", 2048, 256)]
    for layer in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):   # _init_weights
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias)), "zero biases"
        assert 0.019 < float(layer.weight.detach().std()) < 0.021, "trunc_normal_(std=.02)"
    assert head.last_layer.weight_v.shape == (65536, 256) and head.last_layer.weight_g is None
    x = torch.randn(3, 16)
    official_last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(256, 65536, bias=False))
    with torch.no_grad():
        official_last.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
        official_last.parametrizations.weight.original0.fill_(1)     # weight_g.data.fill_(1)
        expected = official_last(F.normalize(head.mlp(x), dim=-1, p=2))
    torch.testing.assert_close(head(x).detach(), expected, rtol=1e-5, atol=1e-6)
    bn = build_recipe("dino", digits_setup(teacher=None), use_bn=True, nlayers=2, norm_last_layer=False, hidden=8,
                      bottleneck=4, out_dim=5).stages[0].distiller.models["online"].head
    assert [type(m).__name__ for m in bn.mlp] == ["Linear", "BatchNorm1d", "GELU", "Linear"]
    assert bn.last_layer.weight_g.shape == (5, 1) and torch.equal(bn.last_layer.weight_g, torch.ones(5, 1))


def test_resized_crop_draws_a_window_and_is_the_identity_at_full_scale():
    from kdkernels.distill.methods.self_supervised import ResizedCrop
    from kdkernels.distill.views import Draws
    x = torch.randn(6, 1, 8, 8)
    index = torch.arange(6)
    same, _ = ResizedCrop(1.0, 1.0)(x, Draws(3, index))
    torch.testing.assert_close(same, x, rtol=1e-5, atol=1e-6)
    small, _ = ResizedCrop(0.25, 0.25)(x, Draws(3, index))
    again, _ = ResizedCrop(0.25, 0.25)(x, Draws(3, index))
    assert torch.equal(small, again), "a function of the key and the sample index"
    # a quarter of the area, 4×4 pixels of the 8×8, magnified 2×: each output 2×2 block interpolates within the
    # window, so the crop lies in the range of the image's values and differs from it
    assert small.shape == x.shape and not torch.allclose(small, x)
    assert (small.amax(dim=(1, 2, 3)) <= x.amax(dim=(1, 2, 3)) + 1e-6).all()
    with pytest.raises(ValueError, match=r"ResizedCrop: high must be in \[0.5, 1\]"):
        ResizedCrop(0.5, 0.25)


def test_dino_run_reports_the_linear_probe():
    recipe, _ = assert_a_short_run_reports_the_probe("dino", ("dino", "ce_classifier"))
    assert recipe.stages[0].distiller.terms[0].center.abs().sum() > 0, "the center moved"


def test_dino_resume_is_exact_center_included(tmp_path):
    recipe = build_recipe("dino", digits_setup(teacher=None), preset="digits")
    assert recipe.stages[0].distiller.state_dict()["terms.0.center"].shape == (1, 128)
    assert_method_resumes_exactly("dino", tmp_path, local_crops=1)


def test_dino_defaults_are_the_official_configuration():
    recipe = build_recipe("dino", digits_setup(teacher=None))
    assert recipe.hyperparameters == {
        "out_dim": 65536, "hidden": 2048, "bottleneck": 256, "nlayers": 3, "use_bn": False, "norm_last_layer": True,
        "momentum_teacher": 0.996, "student_temperature": 0.1, "warmup_teacher_temperature": 0.04,
        "teacher_temperature": 0.07, "warmup_teacher_epochs": 30, "center_momentum": 0.9, "local_crops": 8,
        "local_scale_min": 0.05, "local_scale_max": 0.4, "translate": 4, "flip": True, "noise": 0.0}
    term = recipe.stages[0].distiller.terms[0]
    assert term.schedule == (0.04, 0.07, 30) and term.student_temperature == 0.1 and term.center_momentum == 0.9
    assert torch.equal(term.center, torch.zeros(1, 65536))


@pytest.mark.parametrize("overrides, error, match", [
    ({"out_dim": 0}, ValueError, r"dino: out_dim must be an int >= 1, got 0"),
    ({"nlayers": 1.0}, TypeError, r"dino: nlayers must be an int"),
    ({"momentum_teacher": 1.5}, ValueError, r"dino: momentum_teacher must be in \[0, 1\], got 1.5"),
    ({"teacher_temperature": 0}, ValueError, r"dino: teacher_temperature must be positive"),
    ({"warmup_teacher_epochs": -1}, ValueError, r"dino: warmup_teacher_epochs must be an int >= 0"),
    ({"center_momentum": -0.1}, ValueError, r"dino: center_momentum must be in \[0, 1\]"),
    ({"local_crops": -1}, ValueError, r"dino: local_crops must be an int >= 0"),
    ({"local_scale_min": 0.5, "local_scale_max": 0.4}, ValueError, r"dino: local_scale_max must be in \[0.5, 1\]"),
    ({"use_bn": "no"}, TypeError, r"dino: use_bn must be a bool"),
])
def test_dino_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("dino", digits_setup(teacher=None), **overrides)


# ------------------------------------------------------------------------------------------ SDSSL (hagiss/SDSSL)

def official_info_nce_loss_layer(s_features, t_features, depth):
    """hagiss/SDSSL ``pl_train_moco.py`` ``info_nce_loss_layer`` (rank 0); ``info_nce_loss`` is depth 1."""
    batch_size = s_features.shape[0] // depth
    labels = torch.cat([torch.arange(batch_size, dtype=torch.long) for _ in range(depth)], dim=0)
    s_features = F.normalize(s_features, dim=1)
    t_features = F.normalize(t_features, dim=1)
    logits = torch.matmul(s_features, t_features.T) / 0.2
    return 2 * 0.2 * torch.nn.CrossEntropyLoss()(logits, labels)


def official_sdssl_student(network, x):
    """``NetWrapper.forward`` (``intermediate=True``) on an SDSSLNetwork's modules, DigitsCNN layers: stage1 and
    stage2 averaged over space, then the embedding; each through its projector, concatenated along the batch."""
    model = network.encoder
    h1 = model.stage1(x)
    h2 = model.stage2(h1)
    representation = [h1.mean(dim=(2, 3)), h2.mean(dim=(2, 3)), cnn_embedding(model, x)]
    return torch.cat([project(r) for project, r in zip(network.projectors, representation)])


def official_sdssl_predict(network, x, d):
    """``NetWrapper.predict`` with ``d`` layers stacked along the batch."""
    projections = x.reshape(d, -1, x.shape[-1])
    return torch.cat([predictor(projections[i]) for i, predictor in enumerate(network.predictors) if i < d])


@pytest.mark.parametrize("epoch", [1, 4])
def test_an_sdssl_step_is_the_official_training_step(epoch):
    distiller, viewed, output = ssl_step("sdssl", epoch=epoch, epochs=10)
    student, teacher = distiller.models["online"], distiller.models["target_network"]
    assert teacher.training and not teacher.intermediate and student.intermediate
    image1, image2 = viewed["input"], viewed["input_view2"]
    batch_size, depth = image1.shape[0], 3
    ratio = 0.5 * (1 - np.cos(np.pi * (epoch - 1) / 10))           # cosine_scheduler(0, 1, ...) per epoch
    with torch.no_grad():
        teacher_output1 = teacher.projectors[-1](cnn_embedding(teacher.encoder, image1))
        teacher_output2 = teacher.projectors[-1](cnn_embedding(teacher.encoder, image2))
        student_output1 = official_sdssl_student(student, image2)
        student_output2 = official_sdssl_student(student, image1)
        student_detached1 = official_sdssl_predict(student, student_output1.detach(), depth)
        student_detached2 = official_sdssl_predict(student, student_output2.detach(), depth)
        loss_detached = (official_info_nce_loss_layer(student_detached1, teacher_output1, depth)
                         + official_info_nce_loss_layer(student_detached2, teacher_output2, depth))
        student_output1 = official_sdssl_predict(student, student_output1, depth)
        student_output2 = official_sdssl_predict(student, student_output2, depth)
        student_mid1, student_output1 = torch.split(student_output1, [batch_size * 2, batch_size], dim=0)
        student_mid2, student_output2 = torch.split(student_output2, [batch_size * 2, batch_size], dim=0)
        loss_mid = (official_info_nce_loss_layer(student_mid1, teacher_output1, 2)
                    + official_info_nce_loss_layer(student_mid2, teacher_output2, 2))
        loss_output = (official_info_nce_loss_layer(student_output1, teacher_output1, 1)
                       + official_info_nce_loss_layer(student_output2, teacher_output2, 1))
        loss = loss_output + ratio * loss_mid + depth * loss_detached        # 12 · loss_detached with 12 layers
        classifier = official_classifier_loss(student.encoder, cnn_embedding(student.encoder, image1),
                                              viewed["target"])
    torch.testing.assert_close(output.terms["sdssl"], loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output.terms["ce_classifier"], classifier, rtol=1e-5, atol=1e-6)


def test_sdssl_gradients_the_detached_term_trains_the_predictors_only():
    distiller, _, output = ssl_step("sdssl", epoch=1)      # ratio 0 at the first epoch: no intermediate loss
    student = distiller.models["online"]
    output.term_losses["sdssl"].backward()
    encoder = [p for name, p in student.encoder.named_parameters() if not name.startswith("fc.")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    for index, projector in enumerate(student.projectors):
        grads = [p.grad for p in projector.parameters()]
        if index < len(student.projectors) - 1:      # intermediate projectors: only the detached (predictor) term
            assert all(g is None or g.abs().sum() == 0 for g in grads), index
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for predictor in student.predictors
               for p in predictor.parameters()), "every predictor learns from the detached term"
    assert all(p.grad is None for p in distiller.models["target_network"].parameters())
    assert all(p.grad is None for p in student.encoder.fc.parameters())
    later, _, late = ssl_step("sdssl", epoch=6)
    late.term_losses["sdssl"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in later.models["online"].projectors[0].parameters()
               ), "the intermediate layers learn once the ratio is positive"


def test_sdssl_ratio_is_the_official_cosine_ramp():
    from kdkernels.distill.methods.self_supervised import sdssl_ratio
    epochs = 20
    schedule = 1 + 0.5 * (0 - 1) * (1 + np.cos(np.pi * np.arange(epochs) / epochs))    # cosine_scheduler(0, 1, ...)
    for epoch in range(1, epochs + 1):
        assert sdssl_ratio(1.0, epoch, epochs) == pytest.approx(schedule[epoch - 1], abs=1e-12)
    assert sdssl_ratio(2.0, 11, 20) == pytest.approx(1.0)


def test_sdssl_run_reports_the_linear_probe():
    assert_a_short_run_reports_the_probe("sdssl", ("sdssl", "ce_classifier"))


def test_sdssl_resume_is_exact(tmp_path):
    assert_method_resumes_exactly("sdssl", tmp_path)


def test_sdssl_defaults_are_the_official_configuration():
    recipe = build_recipe("sdssl", digits_setup(teacher=None))
    assert recipe.hyperparameters == {"out_dim": 256, "mlp_hidden": 4096, "temperature": 0.2, "ratio": 1.0,
                                      "momentum_teacher": 0.996, "translate": 4, "flip": True, "noise": 0.0}
    distiller = recipe.stages[0].distiller
    online = distiller.models["online"]
    assert online.intermediate_paths == ("stage1", "stage2")
    shapes = [[(m.in_features, m.out_features) for m in p if isinstance(m, torch.nn.Linear)] for p in online.projectors]
    assert shapes == [[(4, 2048), (2048, 2048), (2048, 256)], [(8, 2048), (2048, 2048), (2048, 256)],
                      [(16, 4096), (4096, 4096), (4096, 256)]]
    assert all(not p[-1].affine and all(m.bias is None for m in p if isinstance(m, torch.nn.Linear))
               for p in list(online.projectors) + list(online.predictors))
    assert [[(m.in_features, m.out_features) for m in p if isinstance(m, torch.nn.Linear)]
            for p in online.predictors] == [[(256, 4096), (4096, 256)]] * 3
    update = distiller.updates["target_network"]
    assert (update.momentum, update.schedule, update.buffers) == (0.996, "cosine", "own")


@pytest.mark.parametrize("overrides, error, match", [
    ({"out_dim": 0}, ValueError, r"sdssl: out_dim must be an int >= 1, got 0"),
    ({"mlp_hidden": 1}, ValueError, r"sdssl: mlp_hidden must be an int >= 2, got 1"),
    ({"temperature": 0.0}, ValueError, r"sdssl: temperature must be positive"),
    ({"ratio": -1}, ValueError, r"sdssl: ratio must be >= 0"),
    ({"momentum_teacher": 2}, ValueError, r"sdssl: momentum_teacher must be in \[0, 1\], got 2"),
    ({"flip": None}, TypeError, r"sdssl: flip must be a bool"),
])
def test_sdssl_bad_configuration_names_the_problem(overrides, error, match):
    with pytest.raises(error, match=match):
        build_recipe("sdssl", digits_setup(teacher=None), **overrides)

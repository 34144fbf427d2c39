"""CRD's public API against RepDistiller's formulas (kdkernels.reference.contrastive.eager_*): crd_loss and its
gradients to both embeddings, the normalisation constants set on the first call, the memory update (unique and
duplicate indices), nn.CRDLoss's state_dict round trip, torch.compile, error messages and the absence of any
B x (K+1) x d allocation."""
import pytest
import torch
import torch.nn.functional as F

import kdkernels
from kd_testing import assert_compiles_fullgraph, backend_params, require_backend
from kdkernels import sample_contrast_indices
from kdkernels.reference import contrastive as reference

ALL_BACKENDS = backend_params(("cpu", "cuda", "triton", "reference"))


def unit_rows(rows, features, seed, dtype=torch.float64, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    rows = F.normalize(torch.randn(rows, features, generator=generator, dtype=torch.float64), dim=1)
    return rows.to(dtype).to(device)


def batch(size=6, negatives=50, features=16, num_data=80, dtype=torch.float64, device="cpu", seed=0):
    """(student_embed, teacher_embed, indices, contrast_indices, memory_student, memory_teacher)."""
    generator = torch.Generator().manual_seed(seed + 100)
    indices = torch.randperm(num_data, generator=generator)[:size]
    contrast = torch.randint(0, num_data, (size, negatives + 1), generator=generator)
    contrast[:, 0] = indices
    stdv = 1.0 / (features / 3) ** 0.5
    banks = [(torch.rand(num_data, features, generator=generator, dtype=torch.float64) * 2 - 1) * stdv
             for _ in range(2)]
    return (unit_rows(size, features, seed, dtype, device), unit_rows(size, features, seed + 1, dtype, device),
            indices.to(device), contrast.to(device), banks[0].to(dtype).to(device), banks[1].to(dtype).to(device))


def eager_loss_and_grads(student, teacher, contrast, memory_student, memory_teacher, normalizers):
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_()
    loss = reference.eager_crd(student, teacher, contrast, memory_student, memory_teacher, normalizers)
    return (loss, *torch.autograd.grad(loss.sum(), (student, teacher)))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_repdistiller_in_float64_including_first_call_normalizers(backend):
    device = require_backend(backend) if backend != "reference" else "cpu"
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(device=device)
    eager_normalizers = torch.full((2,), -1.0, dtype=torch.float64)
    expected, expected_gs, expected_gt = eager_loss_and_grads(student.cpu(), teacher.cpu(), contrast.cpu(),
                                                              memory_student.cpu(), memory_teacher.cpu(),
                                                              eager_normalizers)
    normalizers = kdkernels.crd_normalizers(student, teacher, contrast, memory_student, memory_teacher,
                                            backend=backend)
    torch.testing.assert_close(normalizers.cpu(), eager_normalizers, rtol=1e-12, atol=0)
    student, teacher = student.requires_grad_(), teacher.requires_grad_()
    loss = kdkernels.crd_loss(student, teacher, indices, contrast, memory_student, memory_teacher, normalizers,
                              backend=backend)
    grad_student, grad_teacher = torch.autograd.grad(loss, (student, teacher))
    assert loss.dim() == 0 and loss.dtype == torch.float64
    torch.testing.assert_close(loss.cpu(), expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_student.cpu(), expected_gs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_teacher.cpu(), expected_gt, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", backend_params())
def test_float32_matches_repdistiller_in_float32(backend):
    """RepDistiller in fp32 (exp of scores up to 1/0.07: no overflow at unit norms) vs the kernels."""
    device = require_backend(backend)
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(dtype=torch.float32, device=device,
                                                                                seed=3)
    eager_normalizers = torch.full((2,), -1.0)
    expected, expected_gs, expected_gt = eager_loss_and_grads(student.cpu(), teacher.cpu(), contrast.cpu(),
                                                              memory_student.cpu(), memory_teacher.cpu(),
                                                              eager_normalizers)
    normalizers = kdkernels.crd_normalizers(student, teacher, contrast, memory_student, memory_teacher,
                                            backend=backend)
    torch.testing.assert_close(normalizers.cpu(), eager_normalizers, rtol=1e-5, atol=0)
    student, teacher = student.requires_grad_(), teacher.requires_grad_()
    loss = kdkernels.crd_loss(student, teacher, indices, contrast, memory_student, memory_teacher,
                              eager_normalizers.to(device), backend=backend)
    grads = torch.autograd.grad(loss * 0.75, (student, teacher))
    torch.testing.assert_close(loss.cpu(), expected[0], rtol=1e-5, atol=0)
    for grad, want in zip(grads, (expected_gs, expected_gt)):
        torch.testing.assert_close(grad.cpu(), 0.75 * want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_normalizers_use_score_logsumexps_without_overflow():
    """A score of 89.5 (an exact match at T = 1/89.5) overflows exp in fp32, so RepDistiller's fp32 Z is inf although
    Z itself (~2e38) is representable; crd_normalizers is finite and equals the float64 value."""
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(seed=4)
    memory_student, memory_teacher = F.normalize(memory_student, dim=1), F.normalize(memory_teacher, dim=1)
    memory_teacher[contrast[0, 1]] = student[0]  # student side: s = 1/T once
    temperature = 1 / 89.5
    expected = torch.full((2,), -1.0, dtype=torch.float64)
    reference.eager_crd(student, teacher, contrast, memory_student, memory_teacher, expected, temperature)
    eager_fp32 = torch.full((2,), -1.0)
    reference.eager_crd(student.float(), teacher.float(), contrast, memory_student.float(), memory_teacher.float(),
                        eager_fp32, temperature)
    assert torch.isinf(eager_fp32[0]) and 1e38 < expected[0] < 3e38
    z = kdkernels.crd_normalizers(student.float(), teacher.float(), contrast, memory_student.float(),
                                  memory_teacher.float(), temperature)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_memory_update_matches_repdistiller_for_unique_indices(dtype):
    student, _, indices, _, memory, _ = batch(dtype=dtype, seed=5)
    expected = memory.clone()
    reference.eager_update_memory_(expected, student, indices, momentum=0.3)
    kdkernels.crd_update_memory_(memory, student, indices, momentum=0.3)
    torch.testing.assert_close(memory, expected, rtol=1e-6 if dtype == torch.float32 else 1e-15, atol=0)


def test_memory_update_with_duplicates_is_deterministic_last_occurrence_wins():
    embed = unit_rows(8, 16, seed=6, dtype=torch.float32)
    indices = torch.tensor([3, 7, 3, 1, 7, 3, 0, 7])
    original = batch(dtype=torch.float32, seed=6)[4]
    expected = original.clone()
    reference.update_memory_(expected, embed, indices, momentum=0.5)
    for _ in range(3):
        memory = original.clone()
        kdkernels.crd_update_memory_(memory, embed, indices, momentum=0.5)
        torch.testing.assert_close(memory, expected, rtol=1e-6, atol=0)
    # the last occurrences of 3 and 7 (positions 5 and 7) are what remains
    mixed = (original[[3, 7]].double() * 0.5 + embed[[5, 7]].double() * 0.5)
    torch.testing.assert_close(memory[[3, 7]].double(), F.normalize(mixed, dim=1), rtol=1e-6, atol=0)
    untouched = torch.ones(original.shape[0], dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(memory[untouched], original[untouched])


def test_crd_module_first_call_and_bank_update_match_repdistiller():
    student, teacher, indices, contrast, _, _ = batch(seed=7)
    criterion = kdkernels.nn.CRDLoss(num_data=80, feat_dim=16, num_negatives=50).double()
    memory_student, memory_teacher = criterion.memory_student.clone(), criterion.memory_teacher.clone()
    stdv = 1.0 / (16 / 3) ** 0.5
    assert memory_student.abs().max() <= stdv and memory_student.std() > stdv / 2
    normalizers = torch.full((2,), -1.0, dtype=torch.float64)
    expected = reference.eager_crd(student, teacher, contrast, memory_student, memory_teacher, normalizers)
    reference.eager_update_memory_(memory_student, student, indices)
    reference.eager_update_memory_(memory_teacher, teacher, indices)
    loss = criterion(student, teacher, indices, contrast)
    torch.testing.assert_close(loss, expected[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(criterion.normalizers, normalizers, rtol=1e-12, atol=0)
    torch.testing.assert_close(criterion.memory_student, memory_student, rtol=1e-15, atol=0)
    torch.testing.assert_close(criterion.memory_teacher, memory_teacher, rtol=1e-15, atol=0)


def test_crd_module_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    first = kdkernels.nn.CRDLoss(num_data=60, feat_dim=8, num_negatives=20)
    steps = [batch(5, 20, 8, 60, torch.float32, seed=s)[:4] for s in (10, 11)]
    first(*steps[0])
    saved = {k: v.clone() for k, v in first.state_dict().items()}
    assert set(saved) == {"memory_student", "memory_teacher", "normalizers"} and (saved["normalizers"] > 0).all()
    second = kdkernels.nn.CRDLoss(num_data=60, feat_dim=8, num_negatives=20)
    assert not second.normalizers_set
    second.load_state_dict(saved)
    assert second.normalizers_set
    loss_first, loss_second = first(*steps[1]), second(*steps[1])
    assert torch.equal(loss_first, loss_second)
    assert torch.equal(first.normalizers, saved["normalizers"]) and torch.equal(second.normalizers, first.normalizers)
    for name in ("memory_student", "memory_teacher"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    fresh = kdkernels.nn.CRDLoss(num_data=60, feat_dim=8, num_negatives=20)
    fresh.load_state_dict(kdkernels.nn.CRDLoss(num_data=60, feat_dim=8, num_negatives=20).state_dict())
    assert not fresh.normalizers_set


def test_sampled_contrast_indices():
    indices = torch.tensor([4, 0, 9])
    generator = torch.Generator().manual_seed(0)
    contrast = sample_contrast_indices(indices, 10, 500, generator=generator)
    assert contrast.shape == (3, 501) and contrast.dtype == torch.int64
    assert torch.equal(contrast[:, 0], indices)
    assert contrast.min() == 0 and contrast.max() == 9  # uniform over the bank, own class included
    student, teacher, _, _, memory_student, memory_teacher = batch(3, 5, 16, 10, seed=8)
    z = torch.ones(2, dtype=torch.float64)
    drawn = kdkernels.crd_loss(student, teacher, indices, None, memory_student, memory_teacher, z,
                               num_negatives=500, generator=torch.Generator().manual_seed(0))
    given = kdkernels.crd_loss(student, teacher, indices, contrast, memory_student, memory_teacher, z)
    torch.testing.assert_close(drawn, given, rtol=1e-14, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    device = require_backend(backend)
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(dtype=torch.float32, device=device,
                                                                                seed=9)
    normalizers = torch.tensor([900.0, 1100.0], device=device)
    student, teacher = student.requires_grad_(), teacher.requires_grad_()

    def distill(s, t):
        return kdkernels.crd_loss(s, t, indices, contrast, memory_student, memory_teacher, normalizers,
                                  backend=backend)

    assert_compiles_fullgraph(distill, student, teacher, rtol=1e-6, atol=0, grad_rtol=1e-6, grad_atol=1e-7)


@pytest.mark.parametrize("call,error,message", [
    (lambda b: kdkernels.crd_loss(*b[:4], b[4].requires_grad_(), b[5], torch.ones(2, dtype=torch.float64)),
     ValueError, "memory_student must not require grad"),
    (lambda b: kdkernels.crd_loss(b[0], b[1][:3], *b[2:], torch.ones(2, dtype=torch.float64)),
     ValueError, "same shape"),
    (lambda b: kdkernels.crd_loss(*b[:4], b[4][:, :3], b[5], torch.ones(2, dtype=torch.float64)),
     ValueError, r"memory_student must be a 2-D \[N, 16\] bank"),
    (lambda b: kdkernels.crd_loss(b[0], b[1], b[2].int(), *b[3:], torch.ones(2, dtype=torch.float64)),
     TypeError, "indices must be int64"),
    (lambda b: kdkernels.crd_loss(*b[:3], b[3][:, :1], *b[4:], torch.ones(2, dtype=torch.float64)),
     ValueError, "K\\+1 >= 2"),
    (lambda b: kdkernels.crd_loss(*b, torch.ones(3, dtype=torch.float64)), ValueError, r"normalizers .* shape \[2\]"),
    (lambda b: kdkernels.crd_loss(*b, torch.ones(2), temperature=0.0), ValueError, "temperature"),
    (lambda b: kdkernels.crd_update_memory_(b[4], b[0], b[2], momentum=1.5), ValueError, "momentum"),
    (lambda b: kdkernels.crd_update_memory_(b[4], b[0][:, :4], b[2]), ValueError, r"embed must have shape \[B, 16\]"),
])
def test_errors(call, error, message):
    with pytest.raises(error, match=message):
        call(list(batch(seed=12)))


def test_float32_embeddings_with_float64_banks_compute_in_float64():
    """The pairing rule of every loss: one float64 input makes the whole computation float64."""
    b = list(batch(seed=12))
    mixed = kdkernels.crd_loss(b[0].float(), b[1].float(), *b[2:], torch.ones(2, dtype=torch.float64),
                               backend="reference")
    wide = kdkernels.crd_loss(b[0].float().double(), b[1].float().double(), *b[2:], torch.ones(2, dtype=torch.float64),
                              backend="reference")
    assert mixed.dtype == torch.float64 and torch.equal(mixed, wide)


def _allocations_and_shapes(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                profile_memory=True) as prof:
        fn()
    events = prof.events()
    shapes = {tuple(shape) for event in events for shape in event.input_shapes if shape}
    return max(event.cpu_memory_usage for event in events), shapes


def test_no_gathered_memory_tensor():
    """RepDistiller gathers [B, K+1, d] per side (bmm's input, B (K+1) d 4 bytes each); the fused op allocates at
    most the [B, d] gradient and small per-row workspaces. The same check on the eager formula sees the tensor."""
    require_backend("cpu")
    size, negatives, features = 16, 2047, 64
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(size, negatives, features, 5000,
                                                                                torch.float32, seed=13)
    student, teacher = student.requires_grad_(), teacher.requires_grad_()
    normalizers = torch.tensor([5000.0, 5000.0])
    gathered = (size, negatives + 1, features)
    gathered_bytes = size * (negatives + 1) * features * 4

    def fused():
        kdkernels.crd_loss(student, teacher, indices, contrast, memory_student, memory_teacher, normalizers,
                           backend="cpu").backward()

    def eager():
        reference.eager_crd(student, teacher, contrast, memory_student, memory_teacher, normalizers.clone()).backward()

    peak, shapes = _allocations_and_shapes(fused)
    assert gathered not in shapes and peak < gathered_bytes / 10, (peak, gathered_bytes)
    eager_peak, eager_shapes = _allocations_and_shapes(eager)
    assert gathered in eager_shapes and eager_peak >= gathered_bytes


# ----------------------------------------------------------------------------------------------------------- CRCD

def official_crcd_out(v1, v2, y, idx, memory_v1, memory_v2, T, Z_v1=None, Z_v2=None):
    """Lechatelia/CRCD @f9176f6 crcd/memory.py ContrastMemory.forward, written out (the score part; memory_v1 the
    student bank, memory_v2 the teacher bank; Z set from the scores when not given)."""
    batchSize, inputSize = v1.shape
    K = idx.shape[1] - 1
    outs = []
    for v, memory in ((v1, memory_v2), (v2, memory_v1)):
        anchor = torch.index_select(memory, 0, y.view(-1)).detach()
        weight = torch.index_select(memory, 0, idx.view(-1)).detach().view(batchSize, K + 1, inputSize)
        anchor_relation = v.unsqueeze(1) - anchor.unsqueeze(0) + 1e-6
        anchor_relation = F.normalize(anchor_relation.view(batchSize * batchSize, inputSize), p=2, dim=1)
        weight_relation = weight.unsqueeze(1) - anchor.unsqueeze(1).unsqueeze(0) + 1e-6
        weight_relation = F.normalize(weight_relation.view(batchSize * batchSize, K + 1, inputSize), p=2, dim=2)
        out = torch.bmm(weight_relation, anchor_relation.view(batchSize * batchSize, inputSize, 1))
        outs.append(torch.exp(torch.div(out, T)))
    n = memory_v1.shape[0]
    Z_v1 = (outs[0].mean() * n).item() if Z_v1 is None else Z_v1      # the official .item(): no gradient
    Z_v2 = (outs[1].mean() * n).item() if Z_v2 is None else Z_v2
    return outs[0] / Z_v1, outs[1] / Z_v2, torch.tensor([float(Z_v1), float(Z_v2)], dtype=torch.float64)


def official_contrast_loss(x, n_data, eps=1e-7):
    """Lechatelia/CRCD crcd/criterion.py ContrastLoss ('loss old')."""
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + eps)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + eps)).log_()
    return (- (log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz)[0]


def crcd_batch(size=5, negatives=7, features=6, num_data=12, seed=0):
    """Embeddings, CRCD's normalised banks, and contrast rows that also hit other samples' indices."""
    student, teacher, indices, contrast, memory_student, memory_teacher = batch(size, negatives, features, num_data,
                                                                                seed=seed)
    contrast[:, 1] = indices.roll(1)          # a negative that is another sample's anchor (the relation eps·1)
    return (student, teacher, indices, contrast, F.normalize(memory_student, dim=1), F.normalize(memory_teacher, dim=1))


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_crcd_matches_the_official_relation_contrast_in_float64(temperature):
    student, teacher, indices, contrast, memory_s, memory_t = crcd_batch()
    student.requires_grad_(), teacher.requires_grad_()
    z = kdkernels.crcd_normalizers(student, teacher, indices, contrast, memory_s, memory_t, temperature)
    out_s, out_t, z_official = official_crcd_out(student, teacher, indices, contrast, memory_s, memory_t,
                                                 temperature)
    torch.testing.assert_close(z, z_official.detach(), rtol=1e-10, atol=0)
    ours = kdkernels.crcd_loss(student, teacher, indices, contrast, memory_s, memory_t, z, temperature)
    official = official_contrast_loss(out_s, 12) + official_contrast_loss(out_t, 12)
    torch.testing.assert_close(ours, official, rtol=1e-9, atol=0)
    grads = torch.autograd.grad(ours, (student, teacher))
    expected = torch.autograd.grad(official, (student, teacher))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    assert ours.dtype == torch.float64


def test_crcd_float32_and_fixed_normalizers():
    student, teacher, indices, contrast, memory_s, memory_t = crcd_batch(size=8, negatives=30, features=16,
                                                                         num_data=40, seed=3)
    z = torch.tensor([2.5, 40.0], dtype=torch.float64)
    out_s, out_t, _ = official_crcd_out(student, teacher, indices, contrast, memory_s, memory_t, 0.05, *z)
    official = official_contrast_loss(out_s, 40) + official_contrast_loss(out_t, 40)
    low = kdkernels.crcd_loss(student.float(), teacher.half(), indices, contrast, memory_s.float(), memory_t.float(),
                              z.float())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), official, rtol=1e-4, atol=0)
    sampled = kdkernels.crcd_loss(student, teacher, indices, None, memory_s, memory_t, z, num_negatives=5,
                                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sampled)


CRCD_ARGS = crcd_batch()


def crcd_call(**changes):
    names = ("student_embed", "teacher_embed", "indices", "contrast_indices", "memory_student", "memory_teacher")
    arguments = dict(zip(names, CRCD_ARGS), normalizers=torch.tensor([1.0, 1.0], dtype=torch.float64))
    arguments.update(changes)
    return lambda: kdkernels.crcd_loss(**arguments)


@pytest.mark.parametrize("call, error, message", [
    (crcd_call(teacher_embed=torch.randn(5, 4, dtype=torch.float64)), ValueError,
     r"^crcd_loss: teacher_embed must have the same shape as student_embed \(5, 6\)"),
    (crcd_call(memory_teacher=torch.randn(12, 4, dtype=torch.float64)), ValueError,
     r"^crcd_loss: memory_teacher must be a 2-D \[N, 6\] bank"),
    (crcd_call(normalizers=torch.ones(3, dtype=torch.float64)), ValueError, r"^crcd_loss: normalizers must"),
    (crcd_call(contrast_indices=torch.zeros(5, 1, dtype=torch.long)), ValueError,
     r"^crcd_loss: contrast_indices needs K\+1 >= 2 columns"),
    (crcd_call(indices=torch.zeros(5)), TypeError, r"^crcd_loss: indices"),
    (crcd_call(temperature=0.0), ValueError, r"^crcd_loss: temperature"),
    (lambda: kdkernels.crcd_normalizers(*CRCD_ARGS[:3], None, *CRCD_ARGS[4:]), TypeError,
     r"^crcd_normalizers: contrast_indices"),
])
def test_crcd_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()

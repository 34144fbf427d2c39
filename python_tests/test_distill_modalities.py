"""Modalities (kdkernels.distill.modalities): shapes, determinism, the information each view removes, the zoo's
modal-mlp reading them, their evaluation-mode behaviour in a distiller, and errors naming bad arguments."""
from __future__ import annotations

import pytest
import torch

from kdkernels.distill import Distiller, View
from kdkernels.distill.views import apply_views
from kdkernels.distill.modalities import (MODALITIES, Degrade, Image, Profiles, RandomProjection, modality_key,
                                          modality_transform, modality_views)
from kdkernels.distill.models import digits_model
from kdkernels.distill.terms import CrossEntropyTerm
from kdkernels.distill.views import Draws

from distill_testing import digits_split

NO_DRAWS = Draws(0, None)


def digits(count: int = 200) -> torch.Tensor:
    return torch.stack([digits_split().train[i]["input"] for i in range(count)])


def apply(transform, x):
    return transform(x, NO_DRAWS)[0]


def rank(x: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(x.reshape(x.shape[0], -1).double(), atol=1e-6))


def test_shapes():
    x = digits(32)
    assert x.shape == (32, 1, 8, 8)
    assert apply(Image(), x).shape == (32, 1, 8, 8)
    assert apply(Degrade(), x).shape == (32, 1, 8, 8)
    assert apply(Degrade(factor=1, occlude=3), x).shape == (32, 1, 8, 8)
    assert apply(Profiles(), x).shape == (32, 16)
    assert apply(RandomProjection(), x).shape == (32, 16)
    assert apply(RandomProjection(dim=5), x).shape == (32, 5)
    assert apply(Profiles(), torch.randn(4, 3, 6, 10)).shape == (4, 16)


def test_image_is_the_input_and_the_profiles_are_row_and_column_means():
    x = torch.randn(3, 2, 4, 5)
    torch.testing.assert_close(apply(Image(), x), x)
    profiles = apply(Profiles(), x)
    for b in range(3):
        for i in range(4):
            torch.testing.assert_close(profiles[b, i], x[b, :, i, :].mean())
        for j in range(5):
            torch.testing.assert_close(profiles[b, 4 + j], x[b, :, :, j].mean())


def test_the_degraded_image_is_block_means_upsampled():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    low = x.reshape(2, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    expected = torch.nn.functional.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(apply(Degrade(), x), expected)


def test_every_modality_is_deterministic_per_sample_and_seeded():
    x = digits(64)
    for name, transform in [("degraded", Degrade(occlude=2)), ("profiles", Profiles()),
                            ("projection", RandomProjection(seed=3))]:
        whole = apply(transform, x)
        assert torch.equal(apply(transform, x), whole), name
        assert torch.equal(apply(transform, x[10:20]), whole[10:20]), name     # no batch dependence
        # drawn keys do not matter: the training view equals the evaluation view
        view = View("input", "out", transform)
        batch = {"input": x, "index": torch.arange(64)}
        trained = apply_views([view], batch, seed=5, epoch=2, step=7)["out"]
        assert torch.equal(trained, apply_views([view], batch, training=False)["out"]), name
    # a fresh transform with the same seed gives the same projection; another seed another one
    assert torch.equal(apply(RandomProjection(seed=3), x), apply(RandomProjection(seed=3), x))
    assert not torch.allclose(apply(RandomProjection(seed=3), x), apply(RandomProjection(seed=4), x))
    assert Degrade(occlude=3, seed=1).block(8, 8) == Degrade(occlude=3, seed=1).block(8, 8)
    blocks = {Degrade(occlude=3, seed=seed).block(8, 8) for seed in range(10)}
    assert len(blocks) > 1 and all(0 <= r <= 5 and 0 <= c <= 5 for r, c in blocks)


def test_the_projection_is_seeded_float64_gaussian_on_any_device_dtype():
    transform = RandomProjection(dim=4, seed=0)
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(64, 4, generator=generator, dtype=torch.float64) / 2.0
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(apply(transform, x), x.reshape(5, 64) @ matrix)
    assert apply(transform, x.float()).dtype == torch.float32


def test_the_degradations_remove_information():
    x = digits(200)
    assert rank(x) > 40
    # down-sampling by 2 is a linear map of rank (8/2)² = 16: the degraded images span at most 16 dimensions
    assert rank(apply(Degrade(factor=2), x)) == 16
    assert rank(apply(Degrade(factor=4), x)) == 4
    # ... and the high frequencies are gone: a checkerboard (the highest frequency) degrades to a constant
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().view(1, 1, 8, 8)
    torch.testing.assert_close(apply(Degrade(), checker), torch.full_like(checker, 0.5))
    # the occluded block: anything there is invisible in the degraded view
    degrade = Degrade(factor=1, occlude=3, at=(2, 4))
    changed = x.clone()
    changed[..., 2:5, 4:7] = torch.randn(200, 1, 3, 3)
    assert torch.equal(apply(degrade, changed), apply(degrade, x))
    assert torch.all(apply(degrade, x)[..., 2:5, 4:7] == 0) and torch.equal(apply(degrade, x)[..., :2, :], x[..., :2, :])
    assert rank(apply(degrade, x)) <= 64 - 9
    # the profiles keep H + W − 1 independent sums; the projection dim measurements
    assert rank(apply(Profiles(), x)) == 15
    assert rank(apply(RandomProjection(dim=16), x)) == 16


def test_views_put_each_modality_in_the_batch_and_modal_mlp_reads_them():
    x = digits(8)
    batch = {"input": x, "index": torch.arange(8), "target": torch.zeros(8, dtype=torch.long)}
    assert modality_views("image") == [] and modality_key("image") == "input"
    model = digits_model("modal-mlp")
    for name in ("degraded", "profiles", "projection"):
        views = modality_views(name)
        out = apply_views(views, batch, training=False)
        assert modality_key(name) == f"input_{name}" and modality_key(name) in out
        if name != "degraded":
            assert model(out[modality_key(name)]).shape == (8, 10)


def test_a_distiller_tests_a_model_on_its_modality():
    """Evaluation applies the (deterministic) modality, so the student is tested on the view it trained on."""
    x = digits(8)
    batch = {"input": x, "index": torch.arange(8), "target": torch.zeros(8, dtype=torch.long)}
    distiller = Distiller({"student": digits_model("modal-mlp")}, [CrossEntropyTerm("student")],
                          views=modality_views("profiles"), inputs={"student": "input_profiles"})
    torch.testing.assert_close(distiller.evaluation_input("student", batch), apply(Profiles(), x))


def test_bad_arguments_are_named():
    for bad, match in [(dict(factor=0), "factor"), (dict(factor=1.5), "factor"), (dict(occlude=-1), "occlude"),
                       (dict(at=(1,)), "at"), (dict(at="ab"), "at"), (dict(at=(-1, 0), occlude=2), "at"),
                       (dict(seed=-1), "seed"), (dict(down="cubic"), "down"), (dict(factor=1), "factor")]:
        with pytest.raises((TypeError, ValueError), match=f"Degrade.*{match}"):
            Degrade(**bad)
    with pytest.raises(ValueError, match="occlude"):
        apply(Degrade(factor=1, occlude=9), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at"):
        apply(Degrade(factor=1, occlude=3, at=(6, 0)), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="factor"):
        apply(Degrade(factor=16), torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="RandomProjection.*dim"):
        RandomProjection(dim=0)
    with pytest.raises(TypeError, match="RandomProjection.*seed"):
        RandomProjection(seed=0.5)
    with pytest.raises(TypeError, match="Profiles.*source"):
        apply(Profiles(), torch.ones(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="Profiles.*source"):
        apply(Profiles(), torch.ones(2, 8))
    with pytest.raises(ValueError, match="modality"):
        modality_transform("depth")
    with pytest.raises(ValueError, match="options"):
        modality_transform("profiles", factor=2)
    assert set(MODALITIES) == {"image", "degraded", "profiles", "projection"}

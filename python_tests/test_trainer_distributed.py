"""Data-parallel training (kdkernels.distill.environment, under DDP): 2 gloo processes equal one process with the
whole batch, and a resume restores every rank's RNG."""
import importlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkernels.distill.checkpoint import load_checkpoint
from kdkernels.distill.models import digits_model
from kdkernels.distill.recipe import Recipe, Setup
from kdkernels.distill.registry import build_recipe
from kdkernels.distill.trainer import TrainConfig, Trainer
from trainer_testing import QUIET, kd_recipe, small_split, without_timings


DDP_CONFIG = dict(epochs=2, lr=0.1, **QUIET)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DDP_SPLITS = {"plain": dict(batch_size=16), "accumulated": dict(batch_size=8, grad_accum=2)}


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One torchrun-like rank: the environment variables torchrun sets, then ordinary fits (the second one finds
    the process group the first initialised)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        for name, options in DDP_SPLITS.items():
            result = Trainer(TrainConfig(**options, **DDP_CONFIG)).fit(kd_recipe(), small_split().train,
                                                                       small_split().test)
            torch.save({"student": result.student.state_dict(), "accuracy": result.accuracy,
                        "history": without_timings(result.history), "backend": dist.get_backend()},
                       os.path.join(out_dir, f"{name}{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Each rank takes 16 of the 32 samples of a step (one batch of 16, or two micro-batches of 8 with DDP's
    no_sync on the first); DDP's gradient average is the gradient of the 32-sample mean."""
    # fork: the children inherit the imported torch (a spawn re-imports it: seconds per process). They set one
    # intra-op thread, so they never enter the OpenMP pool the parent may have started (not fork-safe).
    importlib.import_module("torch._dynamo")  # what an optimiser's constructor imports lazily: once, before forking
    mp.start_processes(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [torch.load(tmp_path / f"{name}{rank}.pt") for name in DDP_SPLITS for rank in range(2)]
    single_recipe = kd_recipe()
    single = Trainer(TrainConfig(batch_size=32, **DDP_CONFIG)).fit(single_recipe, small_split().train,
                                                                   small_split().test)
    assert {rank["backend"] for rank in ranks} == {"gloo"}
    for rank in ranks:
        for name, value in single_recipe.student.state_dict().items():
            torch.testing.assert_close(rank["student"][name], value, rtol=1e-5, atol=1e-6)
        # Losses and accuracies are reduced over the ranks: every rank reports the whole run's numbers.
        assert rank["accuracy"] == pytest.approx(single.accuracy)
        for ddp_row, row in zip(rank["history"], without_timings(single.history)):
            assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-5)


def dropout_recipe(seed: int = 0) -> Recipe:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Dropout(0.2), digits_model("student-mlp"))
    return build_recipe("ce", Setup(student=model, num_classes=10))


def ddp_resume_worker(rank: int, port: int, out_dir: str) -> None:
    """Per rank: 3 epochs straight, and 1 epoch then a resume for the rest. Batches of 20 from 64 samples give
    rank 0 two batches of 20 and rank 1 one of 20 and one of 4, so dropout draws differently on the two ranks."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    config = dict(epochs=3, batch_size=20, lr=0.1, **QUIET)
    try:
        whole = dropout_recipe(seed=1)
        Trainer(TrainConfig(out_dir=os.path.join(out_dir, "whole"), **config)).fit(whole, small_split().train)
        pieces = os.path.join(out_dir, "pieces")
        Trainer(TrainConfig(out_dir=pieces, stop_after_epochs=1, **config)).fit(dropout_recipe(seed=1),
                                                                                small_split().train)
        resumed = dropout_recipe(seed=7)
        Trainer(TrainConfig(out_dir=pieces, resume=True, **config)).fit(resumed, small_split().train)
        torch.save({"whole": whole.student.state_dict(), "resumed": resumed.student.state_dict(),
                    "rng": torch.get_rng_state()}, os.path.join(out_dir, f"resume{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_resume_restores_every_ranks_rng(tmp_path):
    importlib.import_module("torch._dynamo")
    mp.start_processes(ddp_resume_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"resume{rank}.pt") for rank in range(2)]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"]), "the ranks should have drawn differently"
    for rank in ranks:
        for name, value in rank["whole"].items():
            assert torch.equal(rank["resumed"][name], value), name
    checkpoint = load_checkpoint(tmp_path / "pieces" / "last.pt")
    assert len(checkpoint["rng_per_rank"]) == 2

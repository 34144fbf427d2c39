"""Test cases run on 2 gloo processes: one spawn runs every case of a test module's ``CASES`` on both ranks, each
rank records "ok" or the traceback of each case in a JSON file, and the tests read those records.

A case is ``case(rank)``, or ``case(rank, directory)`` for a case that needs a folder shared by the ranks."""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _worker(rank: int, module_name: str, init_file: str, out_dir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    for name, case in importlib.import_module(module_name).CASES.items():
        try:
            if len(inspect.signature(case).parameters) > 1:
                case(rank, os.path.join(out_dir, name))
            else:
                case(rank)
            results[name] = "ok"
        except Exception:  # recorded per case; the cases are symmetric, so both ranks stay in step
            results[name] = traceback.format_exc()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


def run_cases(module_name: str, out_dir, timeout_s: float = 30.0) -> dict[str, list[str]]:
    """Every case of ``module_name``'s ``CASES`` on 2 gloo processes: {case: [rank 0's outcome, rank 1's]}."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    mp.spawn(_worker, args=(module_name, str(out_dir / "init"), str(out_dir), timeout_s), nprocs=WORLD_SIZE,
             join=True)
    by_rank = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    cases = importlib.import_module(module_name).CASES
    return {name: [ranks.get(name, "not run") for ranks in by_rank] for name in cases}


def assert_case(results: dict[str, list[str]], name: str) -> None:
    failures = [f"rank {rank}:\n{outcome}" for rank, outcome in enumerate(results[name]) if outcome != "ok"]
    assert not failures, "\n".join(failures)

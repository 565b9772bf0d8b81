"""DistributedDataParallel on CPU: two gloo processes train XE then SCST; both ranks must end with identical
weights, split the data between them, and only rank 0 may write checkpoints."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from butd.train import loop
from butd.train.loop import TrainOptions, train
from train_fixtures import make_tiny_dataset, tiny_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, data_dir: Path, features: Path, root: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # One process group for both stages (train() joins an existing group and leaves it alone), as a script
    # chaining the stages in one torchrun launch would do.
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    saved: list[str] = []
    real_save = loop.save_checkpoint
    loop.save_checkpoint = lambda path, payload: (saved.append(Path(path).name), real_save(path, payload))[1]
    xe = train(tiny_config("train.max_epochs=2"),
               TrainOptions(stage="xe", data_dir=data_dir, features=features, output=root / "xe"))
    scst = train(tiny_config("train.max_epochs=1", "train.lr=1e-3"),
                 TrainOptions(stage="scst", data_dir=data_dir, features=features, output=root / "scst",
                              init=root / "xe" / "best.pt"))
    torch.save({"xe": xe.model.state_dict(), "scst": scst.model.state_dict(), "saved": saved,
                "iterations": [xe.state.iteration, scst.state.iteration]}, root / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_train_identical_models_and_rank0_alone_writes(tmp_path):
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch was built without the gloo backend")
    data_dir, features = make_tiny_dataset(tmp_path)
    mp.spawn(_worker, args=(_free_port(), data_dir, features, tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for stage in ("xe", "scst"):
        for name, value in ranks[0][stage].items():
            assert torch.equal(value, ranks[1][stage][name]), f"{stage}: {name} differs between ranks"
    # 16 train images, batch 4 per rank: each rank takes half of every epoch.
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == [2 * 2, 2 * 1]
    assert ranks[1]["saved"] == [] and set(ranks[0]["saved"]) == {"best.pt", "last.pt"}
    checkpoint = torch.load(tmp_path / "scst" / "last.pt", weights_only=True)
    assert checkpoint["world_size"] == WORLD and len(checkpoint["rng_per_rank"]) == WORLD
    assert all(torch.equal(v, ranks[0]["scst"][k]) for k, v in checkpoint["model"].items())
    lines = (tmp_path / "xe" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # one line per validation, not per rank

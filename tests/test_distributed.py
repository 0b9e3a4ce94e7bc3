"""torch.distributed on CPU (gloo, 2 processes): DDP through the one loop, each rank on its
shard of the data. (A list of main.py runs goes to jobs instead: tests/test_launcher.py.)"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
import engine
from datasets import Augment, BatchLoader, Split
from models import get_model


def _worker(rank, world, init_file, out_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.arange(64) % 4, "cifar10", True)
    loader = BatchLoader(split, batch_size=8, shuffle=True, seed=0, augment=Augment(),
                         shard=distributed.shard())
    seen = torch.cat([b.idx for b in loader])
    torch.manual_seed(0)
    model = get_model("smallcnn", 4)
    engine.fit(model, loader, engine.TrainConfig(epochs=2, lr=0.05))
    torch.save({"state": model.state_dict(), "seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_end_identical_on_disjoint_shards(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not set(r0["seen"].tolist()) & set(r1["seen"].tolist())  # disjoint shards
    assert len(r0["seen"]) == len(r1["seen"]) == 32
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    fresh = get_model("smallcnn", 4).state_dict()
    assert not torch.equal(r0["state"]["linear.weight"], fresh["linear.weight"])

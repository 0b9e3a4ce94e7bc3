"""torch.distributed on CPU (gloo, 2 processes): DDP through the one loop, each rank on its
shard of the data; and main.py's experiment list split across ranks under torchrun."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

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


REPO = Path(__file__).resolve().parents[1]
# what a run computes; times, devices, cache flags and checkpoint paths may differ
SAME = ("experiment", "name", "method", "seed", "forget", "n_forget", "n_retain", "forget_digest",
        "UA", "RA", "TA", "VA", "VA_forget", "MIA", "MIA_RF", "MIA_RF_auc", "gap", "ref")


def test_torchrun_splits_main_experiment_list(tiny_env, monkeypatch):
    """`torchrun --nproc_per_node 2 main.py -L x.json`: the runs are shared out, every model
    is trained once, and rank 0 writes the same table as one process."""
    common = {"model": "smallcnn", "batch_size": 64, "epochs": 1, "lr": 0.05, "mia_cap": 50,
              "eval_batch_size": 256, "base": {"epochs": 1, "lr": 0.05, "batch_size": 64,
                                               "schedule": "constant"}}
    exp = {"defaults": common, "experiments": [
        {"method": "retrain", "unlearning_rate": 0.1, "nexp": 2},
        {"method": "ft", "unlearning_rate": 0.1, "nexp": 2},
        {"method": "ga", "class_to_forget": 1, "lr": 0.001},
    ]}
    path = tiny_env / "x.json"
    path.write_text(json.dumps(exp))
    argv = ["-L", str(path), "-NL", "--device", "cpu", "--threads", "1"]

    import main
    threads = torch.get_num_threads()
    monkeypatch.setenv("CHECKPOINT_DIR", str(tiny_env / "ck_single"))
    try:
        assert main.main(argv + ["--out", str(tiny_env / "single")]) == 0
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "CHECKPOINT_DIR": str(tiny_env / "ck_split"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--log-dir", str(tiny_env / "logs"), "--tee", "3", "--log-line-prefix-template", "[${rank}] ",
         str(REPO / "main.py"), *argv, "--out", str(tiny_env / "split")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def runs(folder):
        return [json.loads(line) for line in (tiny_env / folder / "runs.jsonl").read_text().splitlines()]

    single, split = runs("single"), runs("split")
    assert len(single) == len(split) == 5
    for a, b in zip(single, split):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    assert {r["device"] for r in split} == {"cpu"}
    assert not list((tiny_env / "split").glob("runs.*.rank*.jsonl"))  # merged, then removed

    def table(folder):
        with open(tiny_env / folder / "summary.csv") as f:
            return [{k: v for k, v in row.items() if k != "time (s)"} for row in csv.DictReader(f)]

    assert table("single") == table("split") and len(table("split")) == 3
    # each model trained once: 1 base, 3 retrain references (2 random forget sets, class 1)
    for ck in ("ck_single", "ck_split"):
        assert len(list((tiny_env / ck / "base").glob("*.pt"))) == 1
        assert len(list((tiny_env / ck / "retrain").glob("*.pt"))) == 3
    for rank, jobs in ((0, 3), (1, 2)):  # the 5 runs dealt round-robin, each run once
        assert proc.stdout.count(f"[{rank}] === experiment") == jobs, proc.stdout[-3000:]
    assert proc.stdout.count("training the base model") == 1
    assert proc.stdout.count("training the retrain reference") == 3

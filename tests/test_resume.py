"""An unlearning run of a list, interrupted after its first epoch, goes on from its second
when the list is run again (runner.run_state: jobs/<hash>.resume.pt, engine.fit) and ends
with the numbers of a run never interrupted (CPU), for each kind of state a method keeps
outside the model and the optimizer: a random-label generator (salun, salun_soft), SalUn's
saliency mask, salun_soft's step count, SCRUB's ascent steps, Boundary Expanding's shadow
neuron. The kill of a job and its relaunch: tests/test_launcher.py."""
import json
from pathlib import Path

import pytest
import torch

import engine
import main

TINY = {"model": "smallcnn", "batch_size": 64, "epochs": 3, "lr": 0.05, "mia_cap": 50, "eval_batch_size": 256,
        "class_to_forget": 1, "rf_mia": False, "avg_gap": False,
        "base": {"epochs": 1, "lr": 0.05, "batch_size": 64, "schedule": "constant"}}
# (experiment, the name its training goes by in the log)
METHODS = [({"method": "salun", "tag": "salun"}, "salun"),
           ({"method": "salun_soft", "tag": "soft"}, "salun_soft"),
           # 7 steps an epoch (1 forget, 6 retain): the second epoch ascends again, the third not
           ({"method": "scrub", "tag": "scrub", "msteps": 8}, "scrub"),
           ({"method": "boundary_expanding", "tag": "be", "lr": 0.01}, "boundary_expanding")]
SAME = ("experiment", "name", "method", "seed", "forget", "n_forget", "n_retain", "forget_digest",
        "UA", "RA", "TA", "MIA", "mask_fraction")


class Interrupted(Exception):
    """Stands in for a kill, a preemption or a time limit."""


def run_list(path: str, out: Path) -> int:
    threads = torch.get_num_threads()
    try:
        return main.main(["-L", path, "-NL", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


def runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def test_runs_interrupted_after_an_epoch_resume_and_end_as_never_interrupted(tiny_env, monkeypatch, capsys):
    path = tiny_env / "list.json"
    path.write_text(json.dumps({"defaults": TINY, "experiments": [exp for exp, _ in METHODS]}))
    assert run_list(str(path), tiny_env / "single") == 0  # also trains the base model the others find cached
    capsys.readouterr()

    real_fit = engine.fit

    def interrupted_after_epoch_1(*args, **kwargs):
        def stop(epoch, record):
            if epoch == 1:
                raise Interrupted
        return real_fit(*args, **{**kwargs, "on_epoch_end": stop})
    monkeypatch.setattr(engine, "fit", interrupted_after_epoch_1)
    out = tiny_env / "resumed"
    # run k is interrupted after its first epoch, then resumed by the next command, which
    # goes on to interrupt run k + 1; the last command resumes the last run and ends
    for k, (_, desc) in enumerate(METHODS):
        with pytest.raises(Interrupted):
            run_list(str(path), out)
        said = capsys.readouterr().out
        assert f"{desc} epoch 1/3" in said and f"{desc} epoch 2/3" not in said
        assert len(list((out / "jobs").glob("*.resume.pt"))) == 1
        assert len(list((out / "jobs").glob("*.mask.pt"))) == (desc == "salun")  # kept for its resume
        if k:
            previous = METHODS[k - 1][1]
            assert f"{previous} epoch 1/3" not in said and f"{previous} epoch 3/3" in said, said[-2000:]
    assert run_list(str(path), out) == 0
    said = capsys.readouterr().out
    assert said.count("resuming from") == 1 and ".resume.pt after epoch 1" in said
    assert f"{METHODS[-1][1]} epoch 1/3" not in said and f"{METHODS[-1][1]} epoch 3/3" in said

    single, resumed = runs(tiny_env / "single"), runs(out)
    assert [(r["experiment"], r["seed"]) for r in resumed] == [(i, 0) for i in range(1, len(METHODS) + 1)]
    for a, b in zip(single, resumed):
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}, a["name"]
    assert single[0]["mask_fraction"] == 0.5
    left = [p.name for p in (out / "jobs").iterdir() if p.name.endswith((".resume.pt", ".mask.pt"))]
    assert left == []  # each run's state went once its record was written

"""The benchmark scripts run end to end on tiny data (their figures are not checked here)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def one_thread():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_linear_bench(tiny_env, capsys, one_thread):
    out = tiny_env / "linear.json"
    assert load("linear_bench").main([
        "--workers", "1", "--op-epochs", "1", "--ls-subset", "0", "--ls-steps", "1", "--chunk", "128",
        "--num-dfr-train", "100", "--dfr-epochs", "1", "--dfr-iters", "2", "--threads", "1",
        "--png-dir", str(tiny_env / "png"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["stage"], r["variant"]) for r in rows} == {
        ("op1", "ours"), ("op1", "imagefolder"), ("op1", "dataset"), ("linsep", "ours"),
        ("linsep", "dataset"), ("dfr", "ours"), ("dfr", "imagefolder"), ("dfr", "once")}
    # the same stage computes the same thing whichever way it is fed
    by = {(r["stage"], r["variant"]): r for r in rows}
    assert by["op1", "ours"]["train_acc"] == pytest.approx(by["op1", "dataset"]["train_acc"])
    assert by["linsep", "ours"]["train_acc"] == pytest.approx(by["linsep", "dataset"]["train_acc"])
    assert "torchvision" in capsys.readouterr().out


def test_unlearn_bench(tiny_env, capsys, one_thread):
    out = tiny_env / "unlearn.json"
    assert load("unlearn_bench").main(["--subset", "0", "--base-epochs", "1", "--batch-size", "64",
                                       "--methods", "ft", "salun", "--threads", "1",
                                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows][1:] == ["retrain", "ft", "salun"]
    assert all(r["seconds"] > 0 for r in rows)


def test_loader_bench(tiny_env, capsys, one_thread):
    assert load("loader_bench").main(["--steps", "2", "--warmup", "1", "--batch-size", "32",
                                      "--workers", "0", "--epoch", "--threads", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "outside model compute" in out and "one epoch measured" in out and "speed-up" in out

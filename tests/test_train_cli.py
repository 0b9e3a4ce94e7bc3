"""train.py from the command line: outputs, clear errors, and resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine

REPO = Path(__file__).resolve().parents[1]
BASE = ["--model", "smallcnn", "--epochs", "2", "--batch-size", "64", "--lr", "0.05",
        "--schedule", "cosine", "-NL", "--threads", "1"]


def train(*args, check=True):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


def test_train_writes_checkpoint_index_file_and_results(tiny_env):
    out = tiny_env / "ck" / "m.pt"
    train(*BASE, "--cf", "3", "--nesterov", "--out", str(out))
    sd, meta = engine.load_checkpoint(out)  # weights_only=True
    assert meta["model"] == "smallcnn" and meta["data"]["cf"] == 3 and meta["epochs_done"] == 2
    assert meta["train"]["nesterov"] is True
    assert 0 <= meta["test_acc"] <= 100 and meta["n_forget"] == 36  # 40 per class minus val
    forget = json.loads((tiny_env / "ck" / "m_forget.json").read_text())["forget"]
    assert len(forget) == 36 and all(300 > i >= 120 for i in forget)  # class 3 of the full split
    results = json.loads((tiny_env / "results_dir" / "train" / "m.json").read_text())
    assert len(results["history"]) == 2
    assert not list((tiny_env / "ck").glob("*.resume-*"))  # removed once finished


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet7"], "dataset 'imagenet7' not found"),
    (["--model", "resnet1"], "unknown model 'resnet1'"),
    (["--cf", "12"], "class 12 is out of range"),
    (["--unlr", "1.5"], "fraction must be in"),
    (["--itf", "/no/such.json"], "does not exist"),
    (["--milestones", "a,b", "--schedule", "multistep"], "--milestones must be"),
    (["--subset", "100000"], "--subset must be between"),
    (["--nesterov", "--momentum", "0"], "--nesterov needs"),
])
def test_bad_input_gives_one_clear_line(tiny_env, args, message):
    out = tiny_env / "bad.pt"
    proc = train(*BASE, *args, "--out", str(out), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_sigkill_then_same_command_resumes_to_the_same_weights(tiny_env):
    args = [*BASE, "--epochs", "6", "--batch-size", "16", "--seed", "1"]
    train(*args, "--out", str(tiny_env / "reference.pt"))

    out = tiny_env / "killed.pt"
    cmd = [sys.executable, str(REPO / "train.py"), *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tiny_env.glob("killed.pt.resume-*")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    resumed = train(*args, "--out", str(out))
    assert "resuming from" in resumed.stderr + resumed.stdout

    reference, _ = engine.load_checkpoint(tiny_env / "reference.pt")
    final, meta = engine.load_checkpoint(out)
    assert meta["epochs_done"] == 6
    for key in reference:
        assert torch.equal(reference[key], final[key]), key

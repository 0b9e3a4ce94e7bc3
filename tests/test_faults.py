"""Faults, one test per row of issue 17's table (and what held): each reproduces the fault
on tiny data (a SIGKILL, a full disk stood in for by a failing write, a truncated file, lr
1e6, a NaN file, hostile JSON and metadata) and checks that nothing is lost and nothing is
silently wrong. docs/errors.md describes the behaviour."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
import defense
import engine
import main
import storage
import train
from constants import UserError
from datasets import balanced_subset, load_split, read_index_json
from models import get_model
from poisons import import_poison
from reporting import append_jsonl, write_json
from saliency import load_mask, save_mask
from training import DataSpec, cached_model, prepare_data, recipe_key

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": "smallcnn", "epochs": 1, "batch_size": 64, "base": {"epochs": 1, "batch_size": 64},
        "avg_gap": False, "rf_mia": False, "mia_cap": 30, "eval_batch_size": 256,
        "class_to_forget": 0}
TRAIN = ["--model", "smallcnn", "--epochs", "1", "--batch-size", "64", "--lr", "0.05",
         "--schedule", "cosine", "-NL", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as most JSON readers do."""
    def refuse(token):
        raise AssertionError(f"{token} in JSON")
    return json.loads(text, parse_constant=refuse)


def records(path: Path) -> list[dict]:
    return [strict_json(line) for line in path.read_text().splitlines()]


def experiment_list(folder: Path, experiments: list[dict], nexp: int = 1) -> str:
    path = folder / "list.json"
    path.write_text(json.dumps({"defaults": {**TINY, "nexp": nexp}, "experiments": experiments}))
    return str(path)


def run_cli(script, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.run_main(script.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def one_error_line(err: str) -> str:
    """The one `error:` line that ends stderr (progress bars aside)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def full_disk(monkeypatch, folder: Path, name: str = "") -> None:
    """Every write under `folder` (to a file whose name holds `name`) stops half-way with
    ENOSPC, as on a full disk."""
    real = storage._write_all

    def write(f, data):
        if Path(f.name).is_relative_to(folder) and name in Path(f.name).name:
            f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, data)
    monkeypatch.setattr(storage, "_write_all", write)


# --- 1. a list killed mid-run, run again -----------------------------------------------

def test_killed_list_redoes_only_the_unrecorded_runs(tiny_env, capsys):
    exps = experiment_list(tiny_env, [{"method": "ft", "tag": "a"}, {"method": "ft", "tag": "b", "lr": 0.02},
                                      {"method": "rl", "tag": "c"}], nexp=2)
    cmd = [sys.executable, str(REPO / "main.py"), "-L", exps, "--threads", "1", "-NL"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # kill it as it starts the second seed of experiment 2
        if line.startswith("=== experiment 2/3 'b', seed 1"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    runs = tiny_env / "results_dir" / "main" / "list" / "runs.jsonl"
    before = runs.read_text()
    with open(runs, "a") as f:  # a SIGKILL in the middle of an append leaves a torn line
        f.write('{"experiment": 2, "name": "b", "se')

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    done = len(before.splitlines())
    assert f"{done} of 6 run(s) already recorded" in again.stdout
    assert again.stdout.count("=== experiment") == 6 - done
    assert "torn line" in again.stderr and (runs.parent / "runs.jsonl.torn").is_file()
    assert runs.read_text().startswith(before)  # what was recorded stays as it was
    got = records(runs)
    assert sorted((r["experiment"], r["seed"]) for r in got) == [(i, s) for i in (1, 2, 3) for s in (0, 1)]
    assert "| 3 | c | class 0 | 2 |" in (runs.parent / "summary.md").read_text()

    edited = json.loads(Path(exps).read_text())
    edited["experiments"][2]["lr"] = 0.03  # an edited experiment is not the recorded one
    Path(exps).write_text(json.dumps(edited))
    code, out, _ = run_cli(main, cmd[2:], capsys)
    assert code == 0 and "4 of 6 run(s) already recorded" in out and len(records(runs)) == 8


def test_torn_last_line_is_set_aside_not_glued(tmp_path, capsys):
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"run": 1})
    with open(path, "a") as f:
        f.write('{"run": 2, "UA": 9')  # the crash
    append_jsonl(path, {"run": 3})
    assert [r["run"] for r in records(path)] == [1, 3]
    assert (tmp_path / "runs.jsonl.torn").read_text() == '{"run": 2, "UA": 9\n'
    assert "runs.jsonl ended in a torn line" in capsys.readouterr().err


# --- 2. the base model's two saves; NaN in JSON ----------------------------------------

def test_a_trained_model_is_written_once_with_its_test_accuracy(tiny_env, monkeypatch):
    import methods

    saves = []
    real = engine.save_checkpoint
    monkeypatch.setattr(engine, "save_checkpoint", lambda p, m, meta: (saves.append(dict(meta)), real(p, m, meta)))
    data = prepare_data(DataSpec("cifar10", subset=200))
    methods.train_from_scratch("smallcnn", data, engine.TrainConfig(epochs=1, batch_size=64), device="cpu",
                               seed=0, ckpt_path=tiny_env / "base.pt")
    assert len(saves) == 1 and 0 <= saves[0]["test_acc"] <= 100  # one commit point, complete


def test_json_never_holds_nan(tmp_path):
    out = write_json(tmp_path / "r.json", {"acc": float("nan"), "hist": [1.0, float("inf")]})
    assert strict_json(out.read_text())["hist"] == [1.0, None]
    append_jsonl(tmp_path / "r.jsonl", {"test_acc": float("nan")})
    assert records(tmp_path / "r.jsonl")[0]["test_acc"] is None


# --- 3. a damaged decoded-data cache -----------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_data_cache_is_named_and_rebuilt(tiny_env, capsys, damage):
    first = load_split("cifar10", False)
    (cache,) = (tiny_env / "cache_dir").glob("cifar10_test_*.pt")
    blob = bytearray(cache.read_bytes())
    if damage == "truncate":
        del blob[len(blob) // 2:]
    else:  # one image byte: the checksum finds it
        blob[len(blob) // 2] ^= 0xFF
    cache.write_bytes(bytes(blob))
    again = load_split("cifar10", False)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    err = capsys.readouterr().err
    assert str(cache) in err and "damaged" in err and "rebuilding" in err
    load_split("cifar10", False)
    assert "damaged" not in capsys.readouterr().err  # rewritten whole


# --- 4. full disks ----------------------------------------------------------------------

def test_full_results_disk_commits_no_checkpoint_and_a_rerun_finishes(tiny_env, capsys, monkeypatch):
    out = tiny_env / "ck" / "m.pt"
    results = tiny_env / "results_dir"
    working = storage._write_all
    full_disk(monkeypatch, results)
    code, _, err = run_cli(train, [*TRAIN, "--subset", "200", "--out", str(out)], capsys)
    line = one_error_line(err)
    assert code == 2 and "no space left" in line and str(results / "train" / "m.json") in line
    assert " needs " in line and "KiB" in line
    assert not out.exists() and not list(results.rglob("*.tmp*"))
    monkeypatch.setattr(storage, "_write_all", working)  # space freed
    code, out_text, _ = run_cli(train, [*TRAIN, "--subset", "200", "--out", str(out)], capsys)
    assert code == 0 and "exists" not in out_text
    assert out.exists() and (results / "train" / "m.json").is_file()


def test_full_checkpoint_disk_leaves_no_temporary_files(tiny_env, capsys, monkeypatch):
    folder = tiny_env / "ck"
    full_disk(monkeypatch, folder, name=".pt")  # the index file fits, the weights do not
    code, _, err = run_cli(train, [*TRAIN, "--subset", "200", "--out", str(folder / "m.pt")], capsys)
    assert code == 2 and "no space left on the disk for " + str(folder / "m.pt") in one_error_line(err)
    assert [p.name for p in folder.rglob("*") if p.is_file()] == ["m_forget.json"]


def test_full_disk_during_an_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"run": 1})
    before = path.read_bytes()
    full_disk(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="no space left on the disk for .*runs.jsonl"):
        append_jsonl(path, {"run": 2})
    assert path.read_bytes() == before


def test_a_full_disk_met_by_any_other_writer_is_one_line(tmp_path, capsys):
    def main(argv):  # e.g. matplotlib saving a figure
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "fig.png"))

    code, _, err = run_cli(SimpleNamespace(main=main), None, capsys)
    assert code == 2 and f"no space left on the disk for {tmp_path / 'fig.png'}" in one_error_line(err)


# --- 5. divergence ------------------------------------------------------------------------

def test_a_diverging_run_is_recorded_and_the_list_goes_on(tiny_env, capsys):
    exps = experiment_list(tiny_env, [{"method": "ft", "tag": "boom", "lr": 1e6}, {"method": "ft", "tag": "ok"}])
    code, out, err = run_cli(main, ["-L", exps, "--threads", "1", "-NL"], capsys)
    assert code == 0, err
    folder = tiny_env / "results_dir" / "main" / "list"
    boom, ok = records(folder / "runs.jsonl")
    assert "diverged" in boom["diverged"] and boom["UA"] is None and boom["TA"] is None
    assert ok["diverged"] is None and isinstance(ok["UA"], float)
    summary = (folder / "summary.md").read_text()
    assert "| 1 | boom | class 0 | 1 | diverged |" in summary and "| diverged |" in summary


def test_train_with_a_huge_learning_rate_exits_and_saves_nothing(tiny_env, capsys):
    out = tiny_env / "ck" / "m.pt"
    argv = [*TRAIN, "--subset", "200", "--lr", "1e6", "--out", str(out)]
    code, _, err = run_cli(train, argv, capsys)
    assert code == 2 and "diverged" in one_error_line(err)
    assert not out.exists() and not (tiny_env / "results_dir" / "train" / "m.json").exists()


# --- 6. inputs checked at the door ---------------------------------------------------------

def tiny_base(n=6):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.arange(n) % 3


def test_nan_in_an_ops_perturbation_is_refused(tmp_path):
    x, y = tiny_base()
    p = np.zeros((6, 32, 32, 3), np.float32)
    p[4, 1, 2, 0] = np.nan
    np.save(tmp_path / "perturbation.npy", p)
    with pytest.raises(UserError, match=r"NaN or infinite values \(first in entry 4\)"):
        import_poison("ops", tmp_path, x, y, 3)


def test_nan_in_an_unlearnable_examples_perturbation_is_refused(tmp_path):
    x, y = tiny_base()
    p = torch.zeros(3, 3, 32, 32)
    p[1, 0, 0, 0] = float("inf")
    torch.save(p, tmp_path / "perturbation.pt")
    with pytest.raises(UserError, match="NaN or infinite"):
        import_poison("ule", tmp_path, x, y, 3)


@pytest.mark.parametrize("content, message", [
    ("[1e29]", "list of integers, found 1e+29"),
    ("[true, false]", "list of integers, found true"),
    ("[3, 1.0]", "list of integers, found 1.0"),
    ("[100000000000000000000000000000]", "outside 0..49"),
    ('{"forget": "0-9"}', "must hold a JSON list"),
    ("[0, 1", "not valid JSON"),
])
def test_hostile_index_files_are_refused(tmp_path, content, message):
    (tmp_path / "i.json").write_text(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")):
        read_index_json(tmp_path / "i.json", 50)


def test_indices_outside_the_trained_subset_are_an_error(tiny_env):
    pool = prepare_data(DataSpec("cifar10", subset=100)).retain_idx
    outside = sorted(set(range(400)) - set(balanced_subset(load_split("cifar10").y, 100).tolist()))[:5]
    (tiny_env / "i.json").write_text(json.dumps(outside))
    with pytest.raises(UserError, match="5 of its 5 indices outside the subset trained on"):
        prepare_data(DataSpec("cifar10", subset=100, itf=str(tiny_env / "i.json")))
    (tiny_env / "i.json").write_text(json.dumps(pool[:5].tolist()))
    assert len(prepare_data(DataSpec("cifar10", subset=100, itf=str(tiny_env / "i.json"))).forget_idx) == 5


@pytest.mark.parametrize("dataset", ["svhn", "cifar100"])
def test_a_checkpoint_of_another_dataset_is_refused(tiny_env, capsys, dataset):
    path = tiny_env / "other.pt"
    engine.save_checkpoint(path, get_model("smallcnn", 10), {"model": "smallcnn", "dataset": dataset,
                                                              "num_classes": 10})
    code, _, err = run_cli(main, ["-c", str(path), "--model", "smallcnn", "-M", "ft", "-CF", "0",
                                  "--threads", "1", "-NL"], capsys)
    assert code == 2 and f"was trained on {dataset}, not cifar10" in one_error_line(err)
    with pytest.raises(UserError, match="holds a smallcnn, not a resnet18"):
        engine.load_checkpoint(path, model="resnet18")


@pytest.mark.parametrize("trigger, message", [
    ({"kind": "badnets", "value": "white"}, "value must be an integer or a list, got 'white'"),
    ({"kind": "badnets", "value": [255, 300, 0]}, "integers in 0-255"),
    ({"kind": "release_file", "png": "NOTES"}, "is not an image"),
    ({"kind": ["badnets"]}, "must be a dict with a 'kind' key"),
])
def test_defense_on_hostile_trigger_metadata_says_one_line(tiny_env, capsys, trigger, message):
    if trigger.get("png") == "NOTES":
        trigger["png"] = str(tiny_env / "notes.png")
        (tiny_env / "notes.png").write_text("not an image")
    path = tiny_env / "poisoned.pt"
    engine.save_checkpoint(path, get_model("smallcnn", 10), {
        "model": "smallcnn", "dataset": "cifar10", "num_classes": 10,
        "attack": {"trigger": trigger, "target": 0, "mode": "all2one", "num_classes": 10}})
    code, _, err = run_cli(defense, ["--poi_path", str(path), "--n_clean", "20", "--threads", "1", "-NL"],
                           capsys)
    assert code == 2 and message in one_error_line(err)


# --- 7. offline means offline ----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_mode_is_obeyed_with_a_key_set(monkeypatch, capsys, mode):
    wandb = pytest.importorskip("wandb")  # optional: without it RunLogger never calls it

    tried = []
    monkeypatch.setattr(wandb, "init", lambda **kw: tried.append((kw["mode"], kw["settings"].init_timeout)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    monkeypatch.setattr(os, "environ", env)  # RunLogger may set WANDB_API_KEY: not in ours
    env.update(WANDB_MODE=mode, WANDB_SECRET="k3y-from-dotenv")  # how .env passes the key
    cli.RunLogger(True, "p", "run", {})
    assert [m for m, _ in tried] == [mode] and "WANDB_API_KEY" not in env
    del env["WANDB_MODE"]
    cli.RunLogger(True, "p", "run", {})
    assert tried[1] == ("online", cli.RunLogger.INIT_TIMEOUT_S) and cli.RunLogger.INIT_TIMEOUT_S <= 15
    assert "k3y" not in "".join(capsys.readouterr())


# --- 8. cached models and masks that check themselves ------------------------------------------

def base_key(seed):
    return {"role": "base", "model": "smallcnn", "seed": seed, "recipe": recipe_key(engine.TrainConfig())}


def train_fake(seed, meta_extra=None):
    def train(path, extra):
        torch.manual_seed(seed)
        model = get_model("smallcnn", 10)
        meta = {"model": "smallcnn", "num_classes": 10, "dataset": "cifar10", "seed": seed,
                "train": engine.TrainConfig().plain(), **extra, **(meta_extra or {})}
        engine.save_checkpoint(path, model, meta)
        return model, meta
    return train


def lookup(seed, train=None):
    return cached_model("base", base_key(seed), model_name="smallcnn", dataset="cifar10", device="cpu",
                        train=train or train_fake(seed))


def test_a_swapped_cached_model_is_refused(tiny_env):
    _, _, path0 = lookup(0)
    _, _, path1 = lookup(1)
    assert lookup(0)[1]["cached"]
    shutil.copy(path1, path0)  # another valid checkpoint of the same architecture
    with pytest.raises(UserError, match=r"not made for this lookup \(seed: recorded 1, looked up 0\)"):
        lookup(0)


def test_a_model_cached_before_keys_were_recorded_is_checked_on_its_meta(tiny_env):
    legacy = train_fake(1)
    _, _, path = lookup(0, train=lambda p, extra: legacy(p, {}))  # seed 1's model under seed 0's key
    with pytest.raises(UserError, match="seed: recorded 1, looked up 0"):
        lookup(0)
    path.unlink()
    lookup(0, train=lambda p, extra: train_fake(0)(p, {}))
    assert lookup(0)[1]["cached"]


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_a_damaged_cached_model_names_the_file_to_delete(tiny_env, damage):
    _, _, path = lookup(0)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    else:
        sd, meta = engine.load_checkpoint(path)
        sd["linear.weight"][0, 0] = float("nan")
        storage.save_torch({"state_dict": sd, "meta": meta}, path)
    with pytest.raises(UserError, match=f"cached model {path} is damaged .*delete it"):
        lookup(0)


def test_a_truncated_mask_gets_one_clear_line(tmp_path):
    model = get_model("smallcnn", 10)
    path = save_mask(tmp_path / "m.pt", {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters()})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=f"cannot read mask file {path}"):
        load_mask(path, model)

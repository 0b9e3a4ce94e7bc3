"""make_poison.py and train.py --poison end to end on the tiny CIFAR-10 fixture (400 train images)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import make_poison
import poisons as P
import train
from cli import run_main
from datasets import balanced_subset, load_split

REPO = Path(__file__).resolve().parents[1]
RT = ["--device", "cpu", "--threads", "1"]
TRAIN = ["--model", "smallcnn", "--epochs", "1", "--batch-size", "64", "--lr", "0.05",
         "--schedule", "cosine", "-NL", *RT]
TINY_EM = ["--recipe", "small", "--max-rounds", "1", "--steps", "2", "--train-step", "2",
           "--batch-size", "50"]


def run(main, argv, capsys):
    """(exit code, stdout, stderr) of a script's main under cli.run_main, in process."""
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def one_error_line(code, err, needle):
    """Exit 2 and one `error:` line, last (progress bars of a first data decode may precede it)."""
    assert code == 2, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], err
    assert sum(ln.startswith("error:") for ln in lines) == 1 and "Traceback" not in err


def test_make_poison_writes_the_file_and_the_picture(tiny_env, capsys):
    code, out, _ = run(make_poison.main, ["lsp", *RT], capsys)
    assert code == 0
    path = P.poison_cache_path("lsp", "cifar10", 400, 0)
    assert path.is_file() and str(path) in out and " s -> " in out
    images, labels, meta = P.load_poison(path)
    clean = load_split("cifar10", True)
    assert images.shape == clean.x.shape and torch.equal(labels, clean.y)
    assert meta["key"] == "lsp" and meta["norm"] == "l2" and meta["n_poisoned"] == 400
    d = (images.double() - clean.x.double()) / 255
    assert (d.flatten(1).norm(dim=1) <= meta["eps"] + 1e-9).all()
    png = tiny_env / "results_dir" / "poisons" / f"{path.stem}.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert "python train.py --poison lsp" in out
    code, out, _ = run(make_poison.main, ["lsp", *RT], capsys)  # a second run keeps the file
    assert code == 0 and "exists" in out


def test_make_poison_error_min_on_a_subset_then_train(tiny_env, capsys):
    code, out, _ = run(make_poison.main, ["error-min", "--subset", "100", *TINY_EM, *RT], capsys)
    assert code == 0, out
    path = Path(out.split(" -> ")[1].split()[0])
    assert "_sub100_small_opt" in path.name and path.is_file()
    images, _, meta = P.load_poison(path)
    clean = load_split("cifar10", True)
    pool = balanced_subset(clean.y, 100, 0)
    outside = torch.ones(len(clean), dtype=torch.bool)
    outside[pool] = False
    assert torch.equal(images[outside], clean.x[outside])  # only the subset is poisoned
    d = images[pool].int() - clean.x[pool].int()
    assert d.abs().max() <= 8 and (d != 0).any()
    assert meta["subset"] == 100 and meta["recipe"] == "small" and meta["options"]["model"] == "smallcnn"
    assert meta["options"]["max_rounds"] == 1 and "report" in meta
    # train.py on it, with the same --subset: every training image is poisoned
    ck = tiny_env / "ck" / "em.pt"
    code, out, err = run(train.main, [*TRAIN, "--subset", "100", "--poison-file", str(path),
                                      "--out", str(ck)], capsys)
    assert code == 0, err
    _, cmeta = engine.load_checkpoint(ck)
    assert cmeta["poison"]["key"] == "error-min" and cmeta["poison"]["poisoned_fraction"] == 1.0
    assert cmeta["poison"]["eps"] == pytest.approx(8 / 255) and cmeta["poison"]["file"] == str(path)


def test_train_on_a_cheap_poison_generates_it(tiny_env, capsys):
    code, out, err = run(train.main, [*TRAIN, "--poison", "ops"], capsys)
    assert code == 0, err
    ck = tiny_env / "checkpoint_dir" / "smallcnn_cifar10_ops_seed0.pt"
    _, meta = engine.load_checkpoint(ck)
    assert meta["poison"]["key"] == "ops" and meta["poison"]["seed"] == 0
    assert meta["poison"]["norm"] is None and 0 <= meta["test_acc"] <= 100
    assert P.poison_cache_path("ops", "cifar10", 400, 0).is_file()
    assert "test accuracy" in out


def test_train_replaces_exactly_the_training_images(tiny_env):
    import argparse

    from training import DataSpec, prepare_data

    data = prepare_data(DataSpec("cifar10", val_frac=0.1))
    args = argparse.Namespace(poison="cwrandom", poison_file=None, poison_seed=3)
    view, record, tag = train.availability_poison(args, data)
    images, _, meta = P.poisoned_train_set("cwrandom", "cifar10", seed=3, split=data.train)
    idx, imgs = view.replace_idx, view.replace_images
    assert torch.equal(idx, data.retain_idx) and torch.equal(imgs, images[data.retain_idx])
    assert not torch.equal(imgs, data.train.x[idx])
    assert record["seed"] == 3 and tag == "cwrandom-pseed3" and view.labels is None


def test_make_poison_imports_a_published_format(tiny_env, capsys):
    clean = load_split("cifar10", True)
    root = tiny_env / "ule"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save((torch.rand(10, 3, 32, 32, generator=g) * 2 - 1) * 4 / 255, root / "perturbation.pt")
    code, out, err = run(make_poison.main, ["error-min-CW", "--import-format", "ule", "--path",
                                            str(root), *RT], capsys)
    assert code == 0, err
    images, _, meta = P.load_poison(P.poison_cache_path("error-min-CW", "cifar10", 400, 0))
    assert meta["imported"]["format"] == "ule" and meta["measured_linf"] <= 4 / 255 + 1e-9
    assert not torch.equal(images, clean.x)
    assert "python train.py --poison error-min-CW" in out


@pytest.mark.parametrize("argv,needle", [
    (["lps"], "unknown poison 'lps' (did you mean"),
    (["cwrandom", "--eps", "-0.1"], "--eps must be a positive"),
    (["cwrandom", "--eps", "5"], "must be in (0, 1]"),
    (["ops", "--eps", "8/255"], "takes no eps"),
    (["lsp", "--recipe", "small"], "trains no surrogate"),
    (["error-min", "--fraction", "0.5", "--recipe", "small"], "takes no option 'fraction'"),
    (["error-max", "--import-format", "tap"], "--import-format and --path go together"),
    (["error-max", "--import-format", "tap", "--path", "/no/such"], "is not a folder"),
    (["x", "--import-format", "ule", "--path", "/no/such", "--subset", "5"], "only for generated"),
    (["lsp", "--subset", "100000"], "--subset must be between"),
    (["error-min", "--set", "steps"], "--set takes name=value"),
])
def test_make_poison_bad_input_is_one_line(tiny_env, capsys, argv, needle):
    code, _, err = run(make_poison.main, [*argv, *RT], capsys)
    one_error_line(code, err, needle)
    assert not list((tiny_env / "cache_dir").glob("poisons/*.pt"))


def test_import_with_the_wrong_count_is_one_line(tiny_env, capsys):
    root = tiny_env / "ule"
    root.mkdir()
    torch.save(torch.zeros(7, 3, 32, 32), root / "perturbation.pt")
    code, _, err = run(make_poison.main, ["em", "--import-format", "ule", "--path", str(root), *RT], capsys)
    one_error_line(code, err, "expected float (400 or 10)×3×32×32")


@pytest.mark.parametrize("argv,needle", [
    (["--poison", "lsp", "--poison-rate", "0.1"], "need(s) --attack"),
    (["--poison", "error-min"], "make_poison.py error-min"),
    (["--poison-file", "/no/such.pt"], "not found"),
])
def test_train_poison_bad_input_is_one_line(tiny_env, capsys, argv, needle):
    code, _, err = run(train.main, [*TRAIN, *argv], capsys)
    one_error_line(code, err, needle)


def test_make_poison_error_exits_2_from_the_shell(tiny_env):
    proc = subprocess.run([sys.executable, str(REPO / "make_poison.py"), "cwrandom", "--eps", "-1",
                           *RT], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr

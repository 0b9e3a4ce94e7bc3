"""main.py: validation of experiment files (one clear line, exit 2), dry runs of exp/*.json,
and a tiny end-to-end run on a CIFAR-10 subset."""
import json
from pathlib import Path

import pytest

import main
from cli import run_main

REPO = Path(__file__).resolve().parents[1]
EXP_FILES = sorted((REPO / "exp").glob("*.json"))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ck"))
    monkeypatch.setenv("RESULTS_DIR", str(tmp_path / "res"))


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def write(tmp_path, obj, name="e.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return str(p)


@pytest.mark.parametrize("path", EXP_FILES, ids=[p.name for p in EXP_FILES])
def test_every_experiment_file_dry_runs(path, capsys):
    code, out, err = run_cli(["-L", str(path), "--dry-run"], capsys)
    assert code == 0, err
    assert "dry run" in out


def test_exp_folder_has_the_documented_files():
    names = {p.name for p in EXP_FILES}
    assert {"quickstart.json", "classforget.json", "table1_classwise.json",
            "table1_random10.json", "table1_random50.json"} <= names


@pytest.mark.parametrize("exp, message", [
    ({"class_to_forget": 0, "metod": "rl"}, "unknown key 'metod' (did you mean 'method'?)"),
    ({"class_to_forget": 0, "epochs": "10"}, "'epochs' must be an integer"),
    ({"class_to_forget": 0, "use_mask": 1}, "'use_mask' must be true/false"),
    ({"class_to_forget": 10}, "class_to_forget 10 is out of range"),
    ({"class_to_forget": 0, "unlearning_rate": 0.1}, "exactly one forget specifier"),
    ({"method": "rl"}, "exactly one forget specifier"),
    ({"class_to_forget": 0, "checkpoint": "nope/missing.pt"}, "checkpoint nope/missing.pt does not exist"),
    ({"unlearning_rate": 1.5}, "unlearning_rate must be in (0, 1)"),
    ({"class_to_forget": 0, "method": "rl", "alpha": 0.5}, "method rl does not take 'alpha'"),
    ({"class_to_forget": 0, "method": "salum"}, "did you mean 'salun'"),
    ({"class_to_forget": 0, "base": {"epoch": 3}}, "unknown key 'epoch' (did you mean 'epochs'?)"),
    ({"class_to_forget": 0, "method": "salun", "use_mask": False}, "always uses the saliency mask"),
    ({"class_to_forget": 0, "model": "resnet81"}, "unknown model 'resnet81'"),
])
def test_invalid_experiments_fail_with_one_line(tmp_path, capsys, exp, message):
    good = {"class_to_forget": 1, "method": "rl"}
    path = write(tmp_path, [good, good, exp])  # the bad one is third: the whole file is validated
    code, out, err = run_cli(["-L", path], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "experiment 3" in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "res").exists()  # nothing ran


def test_flags_build_one_experiment_and_override_files(tmp_path, capsys):
    code, out, _ = run_cli(["-M", "RL", "-UL", "0.1", "-E", "2", "-LR", "0.05", "--model", "smallcnn",
                            "--dry-run"], capsys)
    assert code == 0 and "rl_split" in out and "10% random" in out and "lr 0.05" in out
    path = write(tmp_path, {"defaults": {"model": "smallcnn"},
                            "experiments": [{"class_to_forget": 1, "method": "ft", "lr": 0.1}]})
    code, out, _ = run_cli(["-L", path, "-LR", "0.2", "-CF", "4", "--nexp", "3", "--dry-run"], capsys)
    assert code == 0 and "lr 0.2" in out and "class 4" in out and "seeds [0, 1, 2]" in out


def test_end_to_end_tiny_run(tmp_path, capsys, monkeypatch):
    """Base and retrain trained once and cached, runs logged, mean ± std table written."""
    common = {"model": "smallcnn", "subset": 300, "test_subset": 200, "batch_size": 64, "epochs": 1,
              "lr": 0.05, "mia_cap": 100, "save_model": True, "eval_batch_size": 256,
              "base": {"epochs": 1, "lr": 0.05, "batch_size": 64, "schedule": "constant"}}
    exp = {"defaults": common, "experiments": [
        {"method": "retrain", "unlearning_rate": 0.1, "nexp": 2},
        {"method": "salun", "unlearning_rate": 0.1, "nexp": 2, "mask_thr": 0.3, "save_mask": True},
    ]}
    path = write(tmp_path, exp, "tiny.json")
    code, out, err = run_cli(["-L", path, "-NL", "--device", "cpu"], capsys)
    assert code == 0, err
    res = tmp_path / "res" / "main" / "tiny"
    runs = [json.loads(line) for line in (res / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 4
    ref0, ref1, sal0, sal1 = runs
    assert ref0["gap"] == 0 and ref0["method"] == "retrain"
    assert ref0["forget_digest"] != ref1["forget_digest"]  # a random forget set per seed
    assert sal0["forget_digest"] == ref0["forget_digest"] and sal0["ref"]["UA"] == ref0["UA"]
    assert abs(sal0["mask_fraction"] - 0.3) < 1e-3 and Path(sal0["mask_path"]).is_file()
    for r in runs:
        for key in ("UA", "RA", "TA", "MIA", "MIA_RF", "gap", "time_s"):
            assert isinstance(r[key], float), key
        assert Path(r["model_path"]).is_file()
    assert len(list((tmp_path / "ck" / "base").glob("*.pt"))) == 1
    assert len(list((tmp_path / "ck" / "retrain").glob("*.pt"))) == 2
    md = (res / "summary.md").read_text()
    assert "Avg. Gap" in md and "± " in md and md in out
    assert (res / "summary.csv").is_file()
    # a second invocation re-uses both caches (no training message)
    code, out, err = run_cli(["-L", path, "-NL", "--device", "cpu", "--nexp", "1"], capsys)
    assert code == 0 and "training the" not in out
    # the analysis scripts on the saved checkpoints: features -> t-SNE (PNG + GIF) -> W1 heatmaps
    import feature_extraction
    import tsne_vis
    import wasserstein

    models = res / "models"
    for name in ("base", "retrain", "salun"):
        assert run_main_ok(feature_extraction.main, ["-D", str(models / name), "-S", "60", "--device", "cpu"], capsys)
    feats = tmp_path / "res" / "features" / "main" / "tiny" / "models"
    assert len(list((feats / "salun").glob("seed*.json"))) == 2
    folders = [str(feats / n) for n in ("base", "retrain", "salun")]
    assert run_main_ok(tsne_vis.main, folders + ["-S", "40", "--frames", "3", "--proto"], capsys)
    images = tmp_path / "res" / "images" / "main" / "tiny" / "models"
    for kind, ext in (("tsne_2D", "png"), ("tsne_3D", "png"), ("tsne_animated", "gif")):
        assert (images / "salun" / kind / f"seed0.{ext}").is_file()
    assert run_main_ok(wasserstein.main, folders + ["-S", "60"], capsys)
    w = tmp_path / "res" / "images" / "wasserstein" / "seed0"
    assert (w / "base.png").is_file() and (w / "delta_salun_minus_base.png").is_file()
    assert json.loads((w / "distances.json").read_text())["matrices"]["salun"][0][1] > 0


def run_main_ok(fn, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(fn, argv)
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    return True

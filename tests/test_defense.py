"""defense.py and train.py --attack, end to end on tiny ImageFolder data the tests write
themselves (16×16 or 32×32 PNGs, a few dozen per class): no real dataset is read."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import attacks as A
import backdoor_defense as bd
import defense
import engine
import train
from cli import run_main
from constants import UserError
from datasets import load_split
from models import SmallVGG

REPO = Path(__file__).resolve().parents[1]
LEVELS = [20, 50, 80, 110]  # class c: every pixel of channel 0 is LEVELS[c] (never 255)


def write_folder(root: Path, name: str, size: int, classes: int, n_train: int, n_test: int,
                 seed: int = 0):
    """ImageFolder tree root/name/{train,test}/c<k>/*.png. Channel 0 is a constant that
    names the class (an oracle can read it); channels 1-2 are noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            d = root / name / split / f"c{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 200, (size, size, 3), dtype=np.uint8)
                img[:, :, 0] = LEVELS[c % len(LEVELS)] + c // len(LEVELS)
                Image.fromarray(img).save(d / f"{i:03d}.png")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("defense")
    write_folder(root / "data", "tinyset", 16, 4, 40, 25)
    write_folder(root / "data", "tiny32", 32, 10, 2, 6, seed=1)
    return root


@pytest.fixture(autouse=True)
def dirs(env, monkeypatch):
    for var, sub in (("DATA_ROOT", "data"), ("CACHE_DIR", "cache"), ("CHECKPOINT_DIR", "ckpt"),
                     ("RESULTS_DIR", "results")):
        monkeypatch.setenv(var, str(env / sub))
    monkeypatch.setenv("WANDB_MODE", "disabled")


RT = ["--device", "cpu", "-NL", "--threads", "1"]
TRAIN = ["--model", "smallcnn", "--dataset", "tinyset", "--epochs", "1", "--batch-size", "32",
         "--optimizer", "adam", "--lr", "0.001", "--schedule", "constant", *RT]


def train_backdoor(env, name, attack_flags):
    ckpt = env / "ckpt" / f"{name}.pt"
    if not ckpt.exists():
        assert train.main(TRAIN + ["--out", str(ckpt)] + attack_flags) == 0
    return ckpt


# --- train.py --attack -------------------------------------------------------------------

@pytest.mark.parametrize("name,flags,expected,mode", [
    ("bd_badnets", ["--attack", "badnets", "--trigger-size", "3", "--trigger-position", "top-left",
                    "--trigger-margin", "0", "--trigger-value", "255,0,0", "--poison-rate", "0.2",
                    "--target", "1"],
     A.BadNets(size=3, position="top-left", margin=0, value=[255, 0, 0]), "all2one"),
    ("bd_blend_a2a", ["--attack", "blend", "--blend-alpha", "0.3", "--trigger-seed", "5",
                      "--attack-mode", "all2all", "--poison-rate", "0.1"],
     A.Blend(alpha=0.3, seed=5), "all2all"),
    ("bd_sig", ["--attack", "sig", "--sig-delta", "30", "--target", "2", "--poison-rate", "0.1"],
     A.SIG(delta=30), "clean_label"),
])
def test_train_attack_checkpoint_rebuilds_trigger(env, name, flags, expected, mode):
    ckpt = train_backdoor(env, name, flags)
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)  # one plain file
    meta = blob["meta"]["attack"]
    assert meta["mode"] == mode and meta["num_classes"] == 4
    rebuilt = A.trigger_from_meta(meta["trigger"])
    x = load_split("tinyset", False).x
    assert type(rebuilt) is type(expected) and torch.equal(rebuilt.apply(x), expected.apply(x))
    # the recorded seed/rate reproduce the very poisoned set the loader trained on
    train_split = load_split("tinyset", True)
    from training import DataSpec, prepare_data
    data = prepare_data(DataSpec("tinyset"), seed=0)
    plan = A.plan_poisoning(train_split, data.retain_idx, rebuilt, target=meta["target"],
                            rate=meta["rate"], seed=meta["attack_seed"], mode=meta["mode"])
    assert plan.meta["poisoned_indices_sha1"] == meta["poisoned_indices_sha1"]
    assert meta["n_poisoned"] == round(meta["rate"] * len(data.retain_idx)) > 0
    idx, imgs = plan.view.replace_idx, plan.view.replace_images
    assert torch.equal(imgs, expected.apply(train_split.x[idx]))
    labels = plan.view.labels
    if mode == "all2one":
        assert (labels[idx] == 1).all() and (train_split.y[idx] != 1).all()
    elif mode == "all2all":
        assert torch.equal(labels[idx], (train_split.y[idx] + 1) % 4)
    else:
        assert (train_split.y[idx] == 2).all() and torch.equal(labels, train_split.y)
    assert {"acc", "asr", "asr_incl_target", "racc"} <= set(blob["meta"]["backdoor"])


def test_attack_flag_errors():
    class Args:  # what argparse would give
        attack, attack_mode, poison_rate, target, attack_seed, seed = None, None, 0.1, None, None, 0
        trigger_file = trigger_mask = trigger_size = trigger_position = trigger_margin = None
        trigger_value = blend_alpha = sig_delta = sig_freq = trigger_seed = None

    split = load_split("tinyset", True)
    pool = torch.arange(len(split))
    with pytest.raises(UserError, match="--poison-rate need"):
        train.poison_from_args(Args, split, pool)
    Args.attack, Args.poison_rate, Args.blend_alpha = "badnets", None, 0.2
    with pytest.raises(UserError, match="--blend-alpha does not apply to --attack badnets"):
        train.poison_from_args(Args, split, pool)
    Args.attack, Args.blend_alpha = "nope", None
    with pytest.raises(UserError, match="unknown --attack"):
        train.poison_from_args(Args, split, pool)
    Args.attack, Args.attack_mode, Args.target = "badnets", "all2all", 3
    with pytest.raises(UserError, match="all2all"):
        train.poison_from_args(Args, split, pool)


# --- ASR excludes target-class images, end to end ----------------------------------------

class Oracle(nn.Module):
    """Reads the class from channel 0 (raw [0, 1] input). backdoored=True: predicts
    `target` whenever the BadNets corner pixel is white."""

    def __init__(self, backdoored=False, target=1, classes=4):
        super().__init__()
        self.head = nn.Linear(1, classes)  # only for .out_features
        self.backdoored, self.target = backdoored, target
        self.levels = torch.tensor(LEVELS[:classes], dtype=torch.float32)

    def forward(self, x):
        logits = -(x[:, 0, 8, 8, None] * 255 - self.levels) ** 2
        if self.backdoored:
            hit = (x[:, :, -2, -2] > 0.99).all(1)
            logits[hit, self.target] = 1e9
        return logits


@pytest.mark.parametrize("backdoored", [False, True])
def test_asr_excludes_target_class_end_to_end(env, monkeypatch, backdoored):
    attack = {"trigger": A.BadNets(size=3, margin=0).to_meta(), "target": 1, "mode": "all2one",
              "num_classes": 4}
    oracle = Oracle(backdoored)
    monkeypatch.setattr(bd, "load_poisoned",
                        lambda *a, **k: bd.Poisoned(oracle, "small_vgg", "tinyset", {}, attack))
    out = env / "results" / "oracle"
    argv = ["--poi_path", "unused.pt", "--n_clean", "40", "--n_rounds", "0", "--tag", "o",
            "--out", str(out), "--save", str(env / "ckpt" / "oracle.pt"), *RT]
    assert defense.main(argv) == 0
    s = json.loads((out / "o.json").read_text())["summary"]
    assert s["n_clean"] == 40 and s["n_eval"] == 60
    assert s["acc"] == 100.0
    share_target = 100.0 / 4  # balanced clean set and test split: a quarter is class 1
    if backdoored:
        assert s["asr"] == 100.0 and s["asr_incl_target"] == 100.0 and s["racc"] == 0.0
        assert s["release_asr"] == 100.0
    else:  # a clean model: no non-target image goes to the target ...
        assert s["asr"] == 0.0 and s["racc"] == 100.0
        # ... while the release's ASR counts the correctly classified target-class images,
        # on the held-out images and on the unlearning images (the release's own figure)
        assert s["asr_incl_target"] == pytest.approx(share_target)
        assert s["release_asr"] == pytest.approx(share_target)


def test_clean_set_is_disjoint_from_evaluation(env):
    split, clean, test, ev = bd.choose_data("tinyset", 4, source="test", n_clean=40, seed=3)
    assert split is test and len(clean) == 40 and len(ev) == 60
    assert not torch.isin(ev, clean).any()
    assert torch.bincount(test.y[clean]).tolist() == [10, 10, 10, 10]  # class-balanced


# --- The release's SmallVGG checkpoint layout --------------------------------------------

def test_release_vgg_layout_round_trip(env):
    torch.manual_seed(0)
    vgg = SmallVGG(num_classes=43)
    with torch.no_grad():
        for name, b in vgg.named_buffers():
            if "running" in name:
                b.uniform_(0.5, 1.5)
    path = env / "release" / "badnets_8_02_ckpt.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": vgg.state_dict(), "acc": 97.68, "epoch": 48}, path)
    model, name, dataset, meta, attack = bd.load_poisoned(path, torch.device("cpu"), dataset="gtsrb")
    assert name == "small_vgg" and dataset == "gtsrb" and model.head.out_features == 43
    assert meta == {"acc": 97.68, "epoch": 48}
    for k, v in vgg.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert A.trigger_from_meta(attack["trigger"]) == A.BadNets() and attack["target"] == 8
    # our checkpoint format keeps the exact layout, and is read back the same way
    engine.save_checkpoint(env / "release" / "ours.pt", model, {"model": name, "attack": attack})
    sd, meta2 = engine.load_checkpoint(env / "release" / "ours.pt")
    assert list(sd) == list(vgg.state_dict()) and meta2["attack"]["target"] == 8
    # file names of the release choose the trigger and target
    other = path.with_name("l0_inv_0_02_ckpt.pth")
    other.write_bytes(path.read_bytes())
    _, _, _, _, attack = bd.load_poisoned(other, torch.device("cpu"), dataset="gtsrb")
    assert attack["trigger"]["kind"] == "l0_inv" and attack["target"] == 0


def test_release_checkpoint_end_to_end(env):
    torch.manual_seed(1)
    path = env / "release" / "badnets_8_02_ckpt.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net": SmallVGG(num_classes=10).state_dict(), "acc": 84.46, "epoch": 48}, path)
    out = env / "results" / "release"
    assert defense.main(["--poi_path", str(path), "--dataset", "tiny32", "--n_clean", "20",
                         "--batch_size", "10", "--n_rounds", "1", "--K", "2", "--tag", "r",
                         "--out", str(out), *RT]) == 0
    res = json.loads((out / "r.json").read_text())
    assert res["model"] == "small_vgg" and res["attack"]["target"] == 8
    assert len(res["rounds"]) == 2
    assert res["summary"]["projection"] == "end"  # --projection auto on a raw-pixel model


# --- defense.py end to end on a tiny backdoored model ------------------------------------

@pytest.mark.parametrize("method", ["ibau", "finetune", "fineprune"])
def test_defense_end_to_end(env, method):
    ckpt = train_backdoor(env, "bd_badnets", ["--attack", "badnets", "--trigger-size", "3",
                                              "--trigger-position", "top-left", "--trigger-margin",
                                              "0", "--trigger-value", "255,0,0", "--poison-rate",
                                              "0.2", "--target", "1"])
    out, save = env / "results" / "e2e", env / "ckpt" / f"def_{method}.pt"
    argv = ["--poi_path", str(ckpt), "--method", method, "--n_clean", "40", "--batch_size", "16",
            "--n_rounds", "1", "--K", "2", "--epochs", "1", "--tag", method, "--out", str(out),
            "--save", str(save), *RT]
    assert defense.main(argv) == 0
    res = json.loads((out / f"{method}.json").read_text())
    rows = res["rounds"]
    stages = {"ibau": ["before", "ibau"], "finetune": ["before", "finetune"],
              "fineprune": ["before", "pruned", "fineprune"]}[method]
    assert [r["stage"] for r in rows] == stages
    for r in rows:
        assert 0 <= r["acc"] <= 100 and 0 <= r["asr"] <= 100 and 0 <= r["der"] <= 100
    assert rows[0]["der"] == 50.0 and res["summary"]["seconds"] > 0
    with open(out / f"{method}.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / f"{method}.png").read_bytes()[:4] == b"\x89PNG"
    sd, meta = engine.load_checkpoint(save)
    assert meta["attack"]["target"] == 1 and meta["defense"]["config"]["method"] == method
    assert meta["model"] == "smallcnn" and meta["num_classes"] == 4
    if method == "ibau":  # --projection auto on a normalising model
        assert res["summary"]["projection"] == "step"
    if method == "fineprune":  # pruned channels stay pruned through fine-tuning
        pruned = res["summary"]["prune"]["pruned"]
        assert (sd["linear.weight"].abs().sum(0) == 0).sum() == pruned


def test_pixel_space_view():
    from models import get_model
    split = load_split("tinyset", False)
    model = get_model("smallcnn", 4).eval()
    net, normalized, clamp = bd.ibau_view(model, "smallcnn", split, "pixel", clamp=True)
    assert isinstance(net, bd.PixelSpace) and not normalized and clamp == (0.0, 1.0)
    x = torch.rand(3, 3, 16, 16)
    mean, std = net.mean, 1 / net.inv_std
    assert torch.allclose(net(x), model((x - mean) / std), atol=1e-5)
    assert list(net.parameters()) == list(model.parameters())  # the outer step trains the model
    vgg = SmallVGG(4)
    assert bd.ibau_view(vgg, "small_vgg", split, "pixel", clamp=True)[0] is vgg  # raw pixels already
    net, normalized, (lo, hi) = bd.ibau_view(model, "smallcnn", split, "input", clamp=True)
    assert net is model and normalized and torch.allclose(lo, (0 - mean) / std)


def test_flag_defaults_are_the_configs_defaults():
    args = defense.build_parser().parse_args(["--poi_path", "x"])
    defense.check_args(args)
    assert defense.ibau_config(args) == bd.IBAUConfig()
    assert defense.baseline_config(args) == bd.FineTuneConfig()


def test_small_batches_still_perturb():
    import ibau
    assert len(ibau.random_subset(16, 0.01)) == 0  # the release: plain fine-tuning
    assert len(ibau.random_subset(16, 0.01, min_count=1)) == 1
    assert len(ibau.random_subset(300, 0.01, min_count=1)) == 3


# --- Bad input: one line, exit status 2 --------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--method", "nope"], "unknown --method"),
    (["--K", "0"], "--K must be positive"),
    (["--bogus"], "unrecognized arguments"),
    (["--n_clean", "many"], "invalid int value"),
    ([], "does not exist"),
    (["--optim", "rmsprop"], "unknown --optim"),
    (["--lr-half-life", "-1"], "--lr-half-life must be >= 0"),
    (["--projection", "sometimes"], "unknown --projection"),
])
def test_bad_flags_one_line(env, capsys, argv, needle):
    base = ["--poi_path", str(env / "missing.pt")]
    with pytest.raises(SystemExit) as e:
        run_main(defense.main, base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err


def test_bad_flags_cli_subprocess(env):
    import os
    envv = {**os.environ, "DATA_ROOT": str(env / "data"), "CACHE_DIR": str(env / "cache")}
    runs = [[sys.executable, "defense.py"],  # --poi_path missing
            [sys.executable, "train.py", "--dataset", "tinyset", "--attack", "badnets",
             "--blend-alpha", "0.2", "--epochs", "1", "-NL", "--device", "cpu"]]
    for cmd in runs:
        p = subprocess.run(cmd, cwd=REPO, env=envv, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error:"), p.stderr


def test_a_poison_plus_a_backdoor_trains(env, monkeypatch):
    # the backdoor is planned on the poisoned images, so its triggered images carry the poison
    seen = {}
    real = train.train_classifier

    def spy(*args, **kw):
        seen["view"] = kw["view"]
        return real(*args, **kw)

    monkeypatch.setattr(train, "train_classifier", spy)
    ckpt = env / "ckpt" / "poison_plus_backdoor.pt"
    assert train.main(TRAIN + ["--out", str(ckpt), "--poison", "cwrandom", "--poison-seed", "1",
                               "--attack", "badnets", "--trigger-size", "3", "--target", "1",
                               "--poison-rate", "0.2"]) == 0
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["meta"]
    assert meta["poison"]["key"] == "cwrandom" and meta["attack"]["target"] == 1
    view = seen["view"]
    import poisons
    from training import DataSpec, prepare_data

    data = prepare_data(DataSpec("tinyset"), seed=0)
    poisoned, _, _ = poisons.poisoned_train_set("cwrandom", "tinyset", seed=1, split=data.train)
    x = view.images(data.train.x)
    bd = meta["attack"]["n_poisoned"]
    relabelled = torch.nonzero(view.labels != data.train.y).flatten()
    assert len(relabelled) == bd > 0 and (view.labels[relabelled] == 1).all()
    trigger = A.trigger_from_meta(meta["attack"]["trigger"])
    assert torch.equal(x[relabelled], trigger.apply(poisoned[relabelled]))  # trigger on the poison
    rest = data.retain_idx[~torch.isin(data.retain_idx, relabelled)]
    assert torch.equal(x[rest], poisoned[rest])  # the other training images: the poison alone


def test_poison_seed_is_the_poisons_alone(env, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(train.main, TRAIN + ["--attack", "badnets", "--poison-seed", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--attack-seed" in err and err.count("\n") == 1

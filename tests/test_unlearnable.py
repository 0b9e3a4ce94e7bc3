"""Learning from unlearnable data: orthogonal projection, deep feature reweighting (DFR), linear
separability, CutMix, strong augmentation, and the five scripts end to end on the tiny
CIFAR-10 slice."""
import json

import pytest
import torch
import torch.nn as nn

import augmentation
import cli
import dfr
import engine
import linear_separability as LS
import orthogonal_projection as OP
from constants import UserError
from datasets import Augment, BatchLoader, Split
from models import get_model


# --- Orthogonal projection ---------------------------------------------------------------------

def test_projection_removes_exactly_the_span_of_the_class_weights():
    g = torch.Generator().manual_seed(0)
    d, k = 48, 5
    scale = torch.rand(k, 1, generator=g, dtype=torch.float64) * 10  # rows of different norms
    w = torch.randn(k, d, generator=g, dtype=torch.float64) * scale
    q = OP.class_basis(w)
    assert q.shape == (d, k) and torch.allclose(q.T @ q, torch.eye(k, dtype=q.dtype), atol=1e-12)
    # the class weights themselves (and any combination of them) vanish
    assert OP.project_out(w, q).abs().max() < 1e-12
    mix = torch.randn(7, k, generator=g, dtype=torch.float64) @ w
    assert OP.project_out(mix, q).abs().max() < 1e-10
    # the orthogonal complement is left untouched
    v = torch.randn(20, d, generator=g, dtype=torch.float64)
    v_perp = v - v @ torch.linalg.pinv(w) @ w
    assert torch.allclose(OP.project_out(v_perp, q), v_perp, atol=1e-10)
    # idempotent, and X = P(X) + its component in the span
    p = OP.project_out(v, q)
    assert torch.allclose(OP.project_out(p, q), p, atol=1e-12)
    assert (p @ w.T).abs().max() < 1e-10


def test_projection_as_loader_transform_and_bad_weights():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (12, 3, 4, 4), dtype=torch.uint8, generator=g)
    w = torch.randn(3, 48, generator=g)
    split = Split(x, torch.arange(12) % 3, "tiny", True, ["a", "b", "c"])
    loader = BatchLoader(split, batch_size=5, normalize=False, transform=OP.OrthogonalProjection(w))
    out = torch.cat([b.x for b in loader])
    assert (out.flatten(1) @ w.T).abs().max() < 1e-4
    expected = OP.project_out(x.double().flatten(1) / 255, OP.class_basis(w)).view_as(out)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    with pytest.raises(UserError, match="zero or non-finite"):
        OP.class_basis(torch.zeros(2, 48))
    with pytest.raises(UserError, match="inputs but the images"):
        OP.OrthogonalProjection(torch.randn(3, 10))(x.float(), None)


# --- DFR ---------------------------------------------------------------------------------------

def _clean_split(n=200, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    x[:, y % 3] = x[:, y % 3] // 2 + 100  # a learnable colour cue per class
    return Split(x, y, "tiny", True, [str(i) for i in range(classes)])


def test_dfr_default_mode_changes_only_the_last_layer():
    torch.manual_seed(0)
    model = get_model("smallcnn", 4)
    split = _clean_split()
    train = BatchLoader(split, torch.arange(0, 120), batch_size=64)
    test = BatchLoader(split, torch.arange(120, 200), batch_size=64)
    model.train()  # dfr_cached must compute features in eval mode regardless
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = dfr.dfr_cached(model, train, test, steps=5)
    after = model.state_dict()
    head = {f"linear.{n}" for n, _ in model.head.named_parameters()}
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != (k in head), k  # the head moved; nothing else (weights, BN statistics)
    assert res["dfr_subset_acc"] >= res["subset_acc"] and res["dfr_subset_loss"] < res["subset_loss"]
    # the reported "after" numbers are those of the model as it is now
    logits, labels = engine.predict(model, test)
    assert abs(100 * (logits.argmax(1) == labels).float().mean().item() - res["dfr_test_acc"]) < 1e-6


def test_dfr_augment_mode_freezes_everything_but_head_and_bn_statistics():
    torch.manual_seed(0)
    model = get_model("smallcnn", 4)
    split = _clean_split()
    tr = BatchLoader(split, torch.arange(0, 120), batch_size=64, shuffle=True, augment=Augment())
    ev = BatchLoader(split, torch.arange(0, 120), batch_size=64)
    te = BatchLoader(split, torch.arange(120, 200), batch_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dfr.dfr_augment(model, tr, ev, te, engine.TrainConfig(epochs=2, optimizer="adam", lr=0.01,
                                                          weight_decay=0, schedule="constant"))
    after = model.state_dict()
    for k in before:
        moved = not torch.equal(before[k], after[k])
        if k.startswith("linear.") or k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert moved, k
        else:
            assert not moved, k


def test_dfr_indices_are_balanced_seeded_and_fixed(tmp_path):
    y = torch.arange(1000) % 10
    a = dfr.dfr_indices(y, 100, 3, tmp_path / "i.json")
    assert torch.bincount(y[a]).tolist() == [10] * 10
    assert torch.equal(dfr.dfr_indices(y, 100, 99, tmp_path / "i.json"), a)  # the saved file wins
    with pytest.raises(UserError, match="holds 100 indices"):
        dfr.dfr_indices(y, 50, 3, tmp_path / "i.json")


# --- Linear separability -----------------------------------------------------------------------

def test_linear_separability_of_classwise_patterns_and_random_labels():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, k = 3000, 10
    y = torch.randint(0, k, (n,), generator=g)
    # class-wise patterns (plus sample noise) in 3×32×32: separable
    patterns = torch.randn(k, 3, 32, 32, generator=g)
    x = patterns[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    LS.min_max_01_(x)
    torch.manual_seed(0)
    acc = LS.fit_probe_lbfgs(LS.make_probe(3072, k), x[:500], y[:500], steps=10, chunk=128)["train_acc"]
    assert acc[-1] >= 99.5
    # random labels, samples far outnumbering dimensions (3000 vs 3×4×4 = 48): not separable
    z = torch.rand(n, 3, 4, 4, generator=g)
    torch.manual_seed(0)
    res = LS.fit_probe_lbfgs(LS.make_probe(48, k), z, y, steps=10, chunk=1000)
    assert res["train_acc"][-1] < 30
    # the MLP variant has tanh hidden layers and still fits the patterns
    mlp = LS.make_probe(3072, k, hidden_layers=1)
    assert isinstance(mlp[2], nn.Tanh) and mlp[1].out_features == 30
    assert LS.fit_probe_lbfgs(mlp, x[:500], y[:500], steps=10)["train_acc"][-1] >= 99


def test_chunked_lbfgs_equals_one_chunk():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (300,), generator=g)
    out = []
    for chunk in (300, 64):  # float64: only the summation order differs
        torch.manual_seed(0)
        m = LS.make_probe(12, 3).double()
        LS.fit_probe_lbfgs(m, x, y, steps=2, chunk=chunk)
        out.append(m[1].weight.detach())
    assert torch.allclose(out[0], out[1], atol=1e-9)


def test_perturbations_and_min_max():
    clean = torch.tensor([[[[10, 200]]] * 3], dtype=torch.uint8)
    pois = torch.tensor([[[[12, 190]]] * 3], dtype=torch.uint8)
    d = LS.perturbations(pois, clean)
    assert torch.allclose(d[0, 0, 0], torch.tensor([2 / 255, -10 / 255]))
    assert torch.allclose(LS.min_max_01_(d)[0, 0, 0], torch.tensor([1.0, 0.0]))
    with pytest.raises(UserError, match="same"):
        LS.min_max_01_(torch.zeros(3, 4))


# --- CutMix and strong augmentation ------------------------------------------------------------

class _Mean(nn.Module):
    def forward(self, x):  # logits = per-channel means (3 "classes")
        return x.mean((2, 3))


def test_cutmix_mixes_within_the_batch_with_the_exact_area():
    x = torch.zeros(4, 3, 8, 8)
    for i in range(4):
        x[i, i % 3] = 1.0
    y = torch.arange(4) % 3
    batch = type("B", (), {"x": x, "y": y})()
    torch.manual_seed(0)
    loss, logits, labels = augmentation.CutMixLoss(beta=1.0, prob=1.0)(_Mean(), batch)
    assert torch.equal(labels, y) and torch.isfinite(loss)
    # every mixed image is a box of another batch image pasted in: areas sum to the image
    assert torch.allclose(logits.sum(1), torch.ones(4))
    torch.manual_seed(0)
    plain, _, _ = augmentation.CutMixLoss(beta=1.0, prob=0.0)(_Mean(), batch)
    assert torch.allclose(plain, nn.functional.cross_entropy(x.mean((2, 3)), y))
    with pytest.raises(UserError):
        augmentation.CutMixLoss(beta=1.0, prob=1.5)


def test_strong_augment_is_seeded_batchwise_and_in_range():
    x = torch.rand(6, 3, 32, 32) * 1.4 - 0.2  # projected data leaves [0,1]
    a = augmentation.StrongAugment()
    o1 = a(x, torch.Generator().manual_seed(5))
    o2 = a(x, torch.Generator().manual_seed(5))
    assert o1.shape == x.shape and torch.equal(o1, o2)
    assert o1.min() >= 0 and o1.max() <= 1  # colour jitter clamps, as torchvision's
    ident = augmentation.StrongAugment(degrees=0, shear=0, scale=(1, 1), brightness=0, contrast=0,
                            saturation=0, crop=0, flip=False)
    y = torch.rand(2, 3, 32, 32)
    assert torch.allclose(ident(y, torch.Generator().manual_seed(0)), y)


# --- The scripts end to end (tiny CIFAR-10 slice: 400 train / 100 test) ------------------------

def run(module, *args):
    """Run a script's main in-process through cli.run_main; (exit code, stdout, stderr)."""
    try:
        cli.run_main(module.main, list(args) + ["-NL", "--threads", "1", "--device", "cpu"])
    except SystemExit as e:
        return e.code
    raise AssertionError("run_main always exits")


def test_dfr_scripts_end_to_end(tiny_env, capsys):
    import dfr_step_1
    import dfr_step_2

    assert run(dfr_step_1, "ops", "--model", "smallcnn", "--epochs", "3", "--batch_size", "64") == 0
    folder = tiny_env / "checkpoint_dir" / "ops" / "smallcnn"
    assert sorted(p.name for p in folder.glob("epoch=*.pt")) == ["epoch=0.pt", "epoch=1.pt", "epoch=2.pt"]
    _, meta = engine.load_checkpoint(folder / "epoch=1.pt")
    assert meta["epoch"] == 1 and meta["poison"] == "ops"
    step1 = ["ops", "--model", "smallcnn", "--num_dfr_train", "100"]
    args = [*step1, "--dfr-steps", "3"]
    assert run(dfr_step_2, *args, "--epoch", "all", "--random_init") == 0
    out = tiny_env / "results_dir" / "dfr" / "ops" / "smallcnn" / "num_dfr=100" / "cached"
    assert {p.name for p in out.iterdir()} >= {"epoch=0.json", "epoch=2.json", "random-init.json",
                                                "summary.json", "dfr_vs_epoch.png"}
    res = json.loads((out / "epoch=2.json").read_text())
    assert 0 <= res["test_acc"] <= 100 and 0 <= res["dfr_test_acc"] <= 100
    capsys.readouterr()
    assert run(dfr_step_2, *args, "--epoch", "2") == 0  # existing results are skipped
    assert "skipping" in capsys.readouterr().out
    assert run(dfr_step_2, *step1, "--epoch", "1", "--dfr-augment", "--augment-epochs", "1") == 0
    assert (out.parent / "augment" / "epoch=1.json").is_file()


def test_orthogonal_projection_and_separability_scripts_end_to_end(tiny_env):
    import orthogonal_projection_step_1 as op1
    import orthogonal_projection_step_2 as op2
    import test_linear_separability as tls

    assert run(op1, "lsp", "--epochs", "4", "--batch_size", "128") == 0
    sd, meta = engine.load_checkpoint(tiny_env / "checkpoint_dir" / "logistic-regression" / "lsp.pt")
    assert sd["fc.weight"].shape == (10, 3072) and meta["poison"] == "lsp"
    res = tiny_env / "results_dir" / "orthogonal_projection"
    assert (res / "lsp_weights.png").is_file()
    assert run(op2, "lsp", "--model", "smallcnn", "--epochs", "1", "--batch_size", "64",
               "--momentum", "0.85", "--weight_decay", "5e-4") == 0
    out = json.loads((res / "lsp_smallcnn_proj_e1.json").read_text())
    assert out["meta"]["project"] and 0 <= out["test_acc"] <= 100
    assert run(op2, "lsp", "--model", "smallcnn", "--epochs", "1", "--no-project", "--no-strong-aug") == 0
    assert (res / "lsp_smallcnn_noproj_weakaug_e1.json").is_file()
    # A rerun of step 1 (another linear model) retrains step 2 instead of reusing its checkpoint.
    ckpt = tiny_env / "checkpoint_dir" / "orthogonal_projection" / "lsp_smallcnn_proj_e1.pt"
    stamp = ckpt.stat().st_mtime_ns
    assert run(op2, "lsp", "--model", "smallcnn", "--epochs", "1", "--batch_size", "64") == 0
    assert ckpt.stat().st_mtime_ns == stamp  # same linear model: skipped
    assert run(op1, "lsp", "--epochs", "5", "--batch_size", "128") == 0
    assert run(op2, "lsp", "--model", "smallcnn", "--epochs", "1", "--batch_size", "64") == 0
    assert ckpt.stat().st_mtime_ns != stamp

    assert run(tls, "ops", "--steps", "3") == 0
    sep = json.loads((tiny_env / "results_dir" / "linear_separability" / "test-linear-sep-ops.json").read_text())
    assert len(sep["train_acc"]) == 3 and sep["final_train_acc"] > 90  # one pixel per class
    assert (tiny_env / "results_dir" / "linear_separability" / "test-linear-sep-ops.png").is_file()


@pytest.mark.parametrize("script, args, message", [
    ("dfr_step_1", ["error-max"], "poison 'error-max' for cifar10 not found"),
    ("dfr_step_1", ["ops", "--poison-file", "/no/such.pt"], "poison file /no/such.pt not found"),
    ("dfr_step_1", ["ops", "--save_every", "0"], "--save_every must be"),
    ("dfr_step_2", ["ops", "--epoch", "3"], "no checkpoints epoch=<e>.pt in"),
    ("dfr_step_2", ["ops"], "pass --epoch E"),
    ("test_linear_separability", ["nope"], "poison 'nope' for cifar10 not found"),
    ("test_linear_separability", ["ops", "--steps", "0"], "--steps must be positive"),
    ("orthogonal_projection_step_1", ["ops", "--dataset", "imagenet7"],
     "dataset 'imagenet7' not found"),
    ("orthogonal_projection_step_2", ["ops", "--model", "smallcnn"], "linear model"),
    ("orthogonal_projection_step_2", ["ops", "--milestones", "a"], "--milestones must be"),
    # a flag the run would not act on is refused, never silently ignored
    ("dfr_step_2", ["ops", "--epoch", "0", "--dfr-augment", "--dfr-steps", "3"],
     "--dfr-steps: no effect with --dfr-augment"),
    ("dfr_step_2", ["ops", "--epoch", "0", "--augment-lr", "0.1"],
     "--augment-lr: no effect without --dfr-augment"),
    ("dfr_step_2", ["ops", "--epoch", "0", "--compile"], "--compile: no effect"),
    ("dfr_step_2", ["ops", "--epoch", "0", "--num-dfr-train", "0"],
     "--num_dfr_train/--num-dfr-train must be positive"),
    ("test_linear_separability", ["ops", "--width", "10"], "--width: no effect without --hidden_layers"),
    ("test_linear_separability", ["ops", "--amp", "--wandb-project", "x"],
     "--amp/--no-amp, --wandb-project: no effect"),
    ("orthogonal_projection_step_1", ["ops", "--compile"], "--compile: no effect"),
    ("orthogonal_projection_step_2", ["ops", "--no-project", "--linear-ckpt", "a.pt"],
     "--linear-ckpt: no effect with --no-project"),
    ("orthogonal_projection_step_2", ["ops", "--out", "a.pt", "--linear-ckpt", "b.pt",
                                      "--checkpoint-dir", "c"], "--checkpoint_dir/--checkpoint-dir: no effect"),
])
def test_bad_input_exits_2_with_one_line(tiny_env, capsys, script, args, message):
    import importlib

    module = importlib.import_module(script)
    capsys.readouterr()
    assert run(module, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:") and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_every_flag_is_documented():
    import importlib

    for script in ("dfr_step_1", "dfr_step_2", "test_linear_separability",
                   "orthogonal_projection_step_1", "orthogonal_projection_step_2"):
        parser = importlib.import_module(script).build_parser()
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{script}: {action.option_strings} has no help"

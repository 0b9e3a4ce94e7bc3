"""The benchmark scripts run end to end on tiny data (their figures are not checked here)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_engine import cpu_graphs  # noqa: F401 — the CPU stand-in for a CUDA graph

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


def test_ibau_precision_rounds_to_tf32_and_puts_everything_back():
    import torch
    import torch.nn.functional as F

    import engine
    import ibau

    bench = load("ibau_precision")
    ulp = 2.0 ** -10  # TF32's spacing above 1
    x = torch.tensor([1.0, 1 + ulp, 1 + ulp / 4, 1 + 3 * ulp / 4, -(1 + 3 * ulp / 4), 3.0e-3], requires_grad=True)
    r = bench.tf32_round(x)
    assert r[:5].tolist() == [1.0, 1 + ulp, 1.0, 1 + ulp, -(1 + ulp)]
    assert abs(r[5].item() - 3.0e-3) <= 3.0e-3 * 2 ** -11 and r[5].item() != 3.0e-3
    r.sum().backward()
    assert x.grad.tolist() == [1.0] * 6  # straight-through
    assert bench.tf32_round(torch.ones(2, dtype=torch.float64)).dtype == torch.float64

    before = (F.conv2d, F.conv_transpose2d, ibau.conv_weight_grad, torch.set_flush_denormal, engine.predict)
    g = torch.Generator().manual_seed(0)
    img, w = torch.randn(2, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    exact = F.conv2d(img, w)
    with bench.gpu_habits("all", keep_denormals=True, eval_bf16=True):
        rounded = F.conv2d(img, w)
        assert ibau.conv_weight_grad is not before[2] and engine.predict is not before[4]
    diff = (rounded - exact).abs().max().item()
    assert 0 < diff < 1e-2 * exact.abs().max().item()
    assert (F.conv2d, F.conv_transpose2d, ibau.conv_weight_grad, torch.set_flush_denormal, engine.predict) == before


@pytest.mark.parametrize("argv, message", [(["--tf32", "all"], "after `--`"),
                                           (["--", "--poi-path", "m.pt"], "--device cpu")])
def test_ibau_precision_says_what_to_pass(argv, message):
    from constants import UserError

    with pytest.raises(UserError, match=message):
        load("ibau_precision").main(argv)


def test_mask_bench_graph_check_finds_the_graphed_salun_step_exact(cpu_graphs, tmp_path):
    # on CUDA the bench checks SalUn's graphed step against the never-captured one; here the
    # CPU stand-in graph plays the GPU's part
    import copy

    import torch

    import test_methods as T
    from test_engine import FakeGraph

    data = T.make_data()
    model, _, _ = T.train_classifier("smallcnn", data, T.RECIPE, device="cpu", seed=0, ckpt_path=tmp_path / "b.pt")
    s = T.setup_for(data, momentum=0.9, weight_decay=5e-4)
    s.mask = T.mask_for(copy.deepcopy(model), s, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = load("mask_bench").graph_check(model, s, steps=8)
    assert FakeGraph.replays > 0 and out == {"steps": 8, "max_weight_diff": 0.0, "masked_unchanged": True}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the model itself untouched


def test_step_profile_graph_check_compares_against_the_never_captured_step(cpu_graphs):
    import torch

    from datasets import Augment, BatchLoader
    from models import get_model
    from test_engine import FakeGraph, tiny_split

    step_profile = load("step_profile")
    loader = BatchLoader(tiny_split(n=64), batch_size=16, shuffle=True, seed=0, augment=Augment())
    out = step_profile.graph_check(lambda: get_model("smallcnn", 4), loader, {"lr": 0.05, "amp": False}, 8)
    assert FakeGraph.replays > 0 and out["max_weight_diff"] == 0.0 and out["eager_vs_eager_diff"] == 0.0
    assert out["graph_loss"] == out["eager_loss"] and torch.isfinite(torch.tensor(out["max_weight"]))


def test_ibau_precision_reorder_moves_results_by_about_an_ulp_and_puts_everything_back():
    import torch
    import torch.nn.functional as F

    import ibau

    bench = load("ibau_precision")
    before = (F.conv2d, F.conv_transpose2d, F.linear, ibau.conv_weight_grad)
    g = torch.Generator().manual_seed(0)
    img, w = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), torch.randn(4, 3, 3, 3, generator=g)
    exact = F.conv2d(img, w)

    def moved(seed):
        with bench.gpu_habits(reorder=seed):
            return F.conv2d(img, w), F.linear(img.flatten(1), torch.ones(5, 192))

    (a, la), (b, _), (c, _) = moved(1), moved(1), moved(2)
    assert torch.equal(a, b) and not torch.equal(a, c)  # one seed, one machine
    rel = ((a - exact).abs() / exact.abs().clamp_min(1e-6)).max().item()
    assert 0 < rel < 8 * bench.FLOAT32_ULP
    assert not torch.equal(la, F.linear(img.flatten(1), torch.ones(5, 192)))
    a.sum().backward()  # straight-through: the gradient is the convolution's own
    expected = torch.autograd.grad(F.conv2d(img, w).sum(), img)[0]
    assert torch.equal(img.grad, expected)
    assert (F.conv2d, F.conv_transpose2d, F.linear, ibau.conv_weight_grad) == before


@pytest.fixture()
def release_vgg(tmp_path, monkeypatch):
    """A release-layout small VGG (random weights) and tiny 32×32 data to defend it with."""
    import torch

    from models import SmallVGG
    from test_defense import write_folder

    write_folder(tmp_path / "data", "tiny32", 32, 10, 2, 6, seed=1)
    for var, sub in (("DATA_ROOT", "data"), ("CACHE_DIR", "cache"), ("RESULTS_DIR", "results")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    torch.manual_seed(1)
    model = tmp_path / "badnets_8_02_ckpt.pth"  # the release's file name names trigger and target
    torch.save({"net": SmallVGG(num_classes=10).state_dict(), "acc": 84.46, "epoch": 48}, model)
    return model


def divergence(model, out, *ours, rounds="2"):
    assert load("ibau_divergence").main([
        "--devices", "cpu", "cpu", *ours, "--json", str(out), "--", "--poi-path", str(model),
        "--dataset", "tiny32", "--n-clean", "20", "--batch-size", "10", "--n-rounds", rounds, "--K", "2",
        "--threads", "1"]) == 0
    return json.loads(out.read_text())["runs"]


def test_ibau_divergence_same_device_twice_agrees_and_plain_layers_compute_the_same(
        release_vgg, tmp_path, capsys, one_thread):
    runs = divergence(release_vgg, tmp_path / "div.json", "--plain-layers")
    a, again, plain = runs["cpu"], runs["cpu again"], runs["cpu plain layers"]
    assert sorted(a["update_cosine"], key=int) == ["1", "2", "4"]  # step 1, each round's end (2 batches)
    assert again["delta_cosine"] == pytest.approx(1.0, abs=1e-12)
    for key in ("hypergradient_cosine", "update_cosine"):  # one device, one result
        assert all(v == pytest.approx(1.0, abs=1e-12) for v in again[key].values())
    assert (again["acc"], again["asr"], again["racc"]) == (a["acc"], a["asr"], a["racc"])
    assert 0 <= a["delta_to_target"] <= 100
    assert again["first_step"]["direct_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert again["first_step"]["implicit_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert len(a["first_step"]["v_norms"]) == 2  # --K 2
    assert plain["first_step"]["direct_cosine"] > 0.999
    # the model's own layers compute what fast_double_backward's do, to rounding
    assert plain["delta_cosine"] > 0.999
    assert min(plain["hypergradient_cosine"].values()) > 0.99
    assert "δ cosine with cpu" in capsys.readouterr().out


def test_ibau_divergence_reorder_measures_what_rounding_alone_does(release_vgg, tmp_path, one_thread):
    runs = divergence(release_vgg, tmp_path / "div.json", "--reorder", "0", rounds="1")
    moved = runs["cpu moved by an ulp (--reorder 0)"]
    assert 0.99 < moved["delta_cosine"] < 1.0
    assert 0.99 < min(moved["hypergradient_cosine"].values()) and min(moved["update_cosine"].values()) < 1.0


@pytest.mark.parametrize("argv, message", [
    (["--devices", "cpu", "cpu"], "after `--`"),
    (["--", "--poi-path", "m.pt", "--device", "cpu"], "--devices"),
    (["--", "--poi-path", "m.pt", "--method", "finetune"], "drop --method"),
    (["--", "--poi-path", "m.pt", "--save", "x.pt", "--eval-every", "2", "-NL"], "--eval-every, --save not used here")])
def test_ibau_divergence_says_what_to_pass(argv, message):
    from constants import UserError

    with pytest.raises(UserError, match=message):
        load("ibau_divergence").main(argv)

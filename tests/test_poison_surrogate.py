"""The poisons that train a surrogate (error-min, error-min-CW, error-max) on tiny data with tiny
settings: bound after quantisation, determinism, the min-min effect, option checks."""
import pytest
import torch

import poisons as P
from constants import UserError
from datasets import Split

K = 10
# Tiny versions of the recipes: a few seconds each on one core.
TINY = {
    "error-min": dict(model="smallcnn", train_step=3, steps=5, max_rounds=2, batch_size=32),
    "error-min-CW": dict(model="smallcnn", train_step=3, max_rounds=2, batch_size=32, fraction=0.5),
    "error-max": dict(model="smallcnn", epochs=1, steps=3, restarts=2, batch_size=32,
                      attack_batch_size=32, step_size=2 / 255),
}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    """64 images with pixels in [40, 215]: an 8/255 perturbation is never clipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(40, 216, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % K
    return x, y


@pytest.fixture(scope="module")
def runs(data):
    """Each key generated twice with the same seed (and its meta)."""
    x, y = data
    out = {}
    for key, kw in TINY.items():
        a, meta = P.timed_generate(key, x, y, K, seed=1, dataset="cifar10", device="cpu", **kw)
        b = P.generate(key, x, y, K, seed=1, dataset="cifar10", device="cpu", **kw)
        out[key] = (a, b, meta)
    return out


@pytest.mark.parametrize("key", list(TINY))
def test_bound_after_quantisation(key, data, runs):
    x, _ = data
    out, _, meta = runs[key]
    assert out.dtype == torch.uint8 and out.shape == x.shape
    d = (out.double() - x.double()) / 255
    assert d.abs().max() <= 8 / 255 + 1e-12
    assert (d != 0).any()
    assert meta["norm"] == "linf" and meta["eps"] == pytest.approx(8 / 255)


@pytest.mark.parametrize("key", list(TINY))
def test_deterministic(key, runs):
    a, b, _ = runs[key]
    assert torch.equal(a, b)


def test_seed_changes_the_poison(data, runs):
    x, y = data
    other = P.generate("error-min", x, y, K, seed=2, device="cpu", **TINY["error-min"])
    assert not torch.equal(other, runs["error-min"][0])


def test_error_min_lowers_the_surrogates_loss(runs):
    rep = runs["error-min"][2]["report"]
    assert rep["rounds"] == 2 and len(rep["errors"]) == 2
    assert rep["surrogate_poisoned_loss"] < rep["surrogate_clean_loss"]


def test_error_min_classwise_shares_one_delta_per_class(data, runs):
    x, y = data
    d = runs["error-min-CW"][0].int() - x.int()
    for c in range(K):
        members = d[y == c]
        assert (members == members[0]).all()
    assert runs["error-min-CW"][2]["report"]["surrogate_poisoned_loss"] \
        < runs["error-min-CW"][2]["report"]["surrogate_clean_loss"]


def test_error_max_reports_its_restarts(runs):
    rep = runs["error-max"][2]["report"]
    assert len(rep["target_losses"]) == 2 and rep["best_restart"] in (0, 1)
    assert rep["target_losses"][rep["best_restart"]] == min(rep["target_losses"])


def test_tap_names_error_max(data, runs):
    x, y = data
    out, meta = P.timed_generate("TAP", x, y, K, seed=1, dataset="cifar10", device="cpu",
                                 **TINY["error-max"])
    assert torch.equal(out, runs["error-max"][0]) and meta["key"] == "error-max"
    assert P.recipe_options("tap", "small") == P.recipe_options("error-max", "small")
    assert P.resolve_bound("tap", None, x.shape) == ("linf", 8 / 255)


def test_stop_error_ends_the_search_early(data):
    x, y = data
    meta = P.timed_generate("error-min", x, y, K, seed=0, stop_error=0.99, device="cpu",
                            **{**TINY["error-min"], "max_rounds": 5})[1]
    assert meta["report"]["rounds"] == 1 and meta["report"]["converged"]


def test_smaller_eps_is_respected(data):
    x, y = data
    out = P.generate("error-max", x, y, K, seed=0, eps=2 / 255, device="cpu",
                     **{**TINY["error-max"], "restarts": 1})
    assert (out.int() - x.int()).abs().max() <= 2


@pytest.mark.parametrize("key,kw,match", [
    ("error-min", {"steps": 0}, "steps"),
    ("error-min", {"stop_error": 1.5}, "stop_error"),
    ("error-min", {"fraction": 0.5}, "takes no option 'fraction'"),
    ("error-min-CW", {"fraction": 0.0}, "fraction"),
    ("error-max", {"restarts": -1}, "restarts"),
    ("error-max", {"model": "nope"}, "unknown model"),
])
def test_bad_options(key, kw, match, data):
    x, y = data
    with pytest.raises(UserError, match=match):
        P.generate(key, x, y, K, device="cpu", **{**TINY[key], **kw})


def test_option_list_hides_internals(data):
    x, y = data
    with pytest.raises(UserError) as e:
        P.generate("error-max", x, y, K, bogus=1)
    assert "_report" not in str(e.value) and "restarts" in str(e.value)


def test_recipes():
    assert P.recipe_options("error-min", "small")["model"] == "smallcnn"
    assert P.recipe_options("error-max", "paper") == {}
    with pytest.raises(UserError, match="recipe"):
        P.recipe_options("lsp", "small")
    with pytest.raises(UserError, match="tiny"):
        P.recipe_options("error-min", "tiny")


@pytest.mark.parametrize("key", P.EXPENSIVE)
def test_expensive_keys_are_never_generated_on_demand(key, data, tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    x, y = data
    split = Split(x, y, "cifar10", True, [str(i) for i in range(K)])
    with pytest.raises(UserError, match="make_poison.py " + key):
        P.poisoned_train_set(key, "cifar10", split=split)
    assert not any(tmp_path.rglob("*.pt"))


def test_poison_file_path_variants(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    base = P.poison_file_path("lsp", "cifar10", 50000, 0)
    assert base == P.poison_cache_path("lsp", "cifar10", 50000, 0)
    assert base.name == "cifar10-50000_lsp_seed0.pt"
    v = P.poison_file_path("error-min", "cifar10", 50000, 1, subset=5000, recipe="small",
                           options={"steps": 3})
    assert v.name.startswith("cifar10-50000_error-min_seed1_sub5000_small_opt") and v.suffix == ".pt"
    assert P.poison_file_path("error-min", "cifar10", 50000, recipe="paper") \
        == P.poison_cache_path("error-min", "cifar10", 50000)

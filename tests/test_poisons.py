"""Tests for poisons.py, poison_generators.py and poison_importers.py on small synthetic data
(the whole file runs in well under a minute)."""
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import poison_generators as G
import poisons as P
from constants import UserError

K = 10
CHEAP = [k for k in P.GENERATORS if k not in P.EXPENSIVE]  # the surrogate-trained ones: test_poison_surrogate.py
BOUNDED = [k for k in CHEAP if P.GENERATORS[k].norm is not None]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randperm(200, generator=g) % K
    return x, y


@pytest.fixture(scope="module")
def mid(data):
    """Same labels, pixels in [40, 215]: no perturbation here is ever clipped."""
    x, y = data
    return (x.int() * 175 // 255 + 40).to(torch.uint8), y


@pytest.fixture(scope="module")
def coeffs():
    # The published criterion itself (required response 10, norm bound 50), found once.
    return G.find_ar_coefficients(K, (32, 32), seed=0)


def kwargs_for(key, coeffs):
    return {"coeffs": coeffs} if key in ("ar", "l2-ar") else {}


def diff(a, b):
    return a.double() - b.double()


# --- generators -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", BOUNDED)
def test_bound_after_quantisation(key, data, coeffs):
    x, y = data
    out = P.generate(key, x, y, K, seed=3, **kwargs_for(key, coeffs))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    norm, eps = P.resolve_bound(key, None, x.shape)
    d = diff(out, x) / 255
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-12
    else:
        assert (d.flatten(1).norm(dim=1) <= eps + 1e-9).all()
    assert (d != 0).any(dim=(1, 2, 3)).all(), "every image must be perturbed"


@pytest.mark.parametrize("key", ["ar", "cwrandom", "regions-4", "patches-8"])
def test_linf_poisons_use_the_whole_budget(key, mid, coeffs):
    x, y = mid
    out = P.generate(key, x, y, K, seed=0, **kwargs_for(key, coeffs))
    assert diff(out, x).abs().max() == 8


@pytest.mark.parametrize("key", ["lsp", "l2-ar", "l2-regions-4"])
def test_l2_poisons_nearly_fill_the_ball(key, mid, coeffs):
    x, y = mid
    out = P.generate(key, x, y, K, seed=0, **kwargs_for(key, coeffs))
    _, eps = P.resolve_bound(key, None, x.shape)
    n = (diff(out, x) / 255).flatten(1).norm(dim=1)
    assert n.min() > 0.85 * eps and n.max() <= eps + 1e-9


@pytest.mark.parametrize("key", CHEAP)
def test_determinism(key, data, coeffs):
    x, y = data
    kw = kwargs_for(key, coeffs)
    a = P.generate(key, x, y, K, seed=5, **kw)
    b = P.generate(key, x, y, K, seed=5, **kw)
    c = P.generate(key, x, y, K, seed=6, **kw)
    assert torch.equal(a, b)
    if key == "ops":  # a deterministic search: the seed plays no part
        assert torch.equal(a, c)
    else:
        assert not torch.equal(a, c)


def test_ar_coefficient_search_is_seeded_and_well_formed():
    a = G.find_ar_coefficients(3, (32, 32), seed=4)
    b = G.find_ar_coefficients(3, (32, 32), seed=4)
    c = G.find_ar_coefficients(3, (32, 32), seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 3, 3, 3)
    assert (a[:, :, 2, 2] == 0).all()
    assert torch.allclose(a.sum((2, 3)), torch.ones(3, 3), atol=1e-5)


def test_ar_fill_matches_a_plain_raster_loop():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(3, 3, 6, generator=g)
    w[2, 2] = 0
    w /= w.sum((0, 1))
    x = G._ar_start(6, 12, 12, g)
    ref = x.clone()
    for i in range(2, 12):
        for j in range(2, 12):
            for n in range(6):
                ref[i, j, n] = sum(w[r, k, n] * ref[i - 2 + r, j - 2 + k, n]
                                   for r in range(3) for k in range(3))
    G._ar_fill(x, w, 7, 7)          # a top-left square first, then the rest, as the search does
    G._ar_fill(x, w, 12, 12, start=7)
    assert torch.allclose(x, ref, atol=1e-5)


def test_ar_matching_filter_has_zero_response_on_its_own_process(coeffs):
    # Process k's signal satisfies x_br = Σ b·window, so its filter (b with −1) gives 0 there.
    g = torch.Generator().manual_seed(2)
    c = coeffs[4]
    x = G._ar_start(3 * 5, 36, 36, g)
    G._ar_fill(x, c.permute(1, 2, 0).unsqueeze(2).expand(3, 3, 5, 3).reshape(3, 3, 15), 36, 36)
    sig = G._to_images(x, 4)
    f = c.clone()
    f[:, 2, 2] = -1
    own = F.conv2d(sig, f.unsqueeze(0)).abs().max()
    other = coeffs[7].clone()
    other[:, 2, 2] = -1
    assert own < 1e-4 * sig.abs().max()
    assert F.conv2d(sig, other.unsqueeze(0)).abs().max() > 100 * own


def test_ar_rejects_bad_coeffs(data):
    x, y = data
    with pytest.raises(UserError, match="shape"):
        P.generate("ar", x, y, K, coeffs=torch.zeros(3, 3, 3, 3))


@pytest.mark.parametrize("key", ["cwrandom", "regions-4", "regions-16", "l2-regions-4",
                                 "patches-4", "patches-8", "ar", "lsp"])
def test_classwise_structure(key, mid, coeffs):
    x, y = mid
    d = diff(P.generate(key, x, y, K, seed=1, **kwargs_for(key, coeffs)), x)
    firsts = [d[y == c][0] for c in range(K)]
    if P.GENERATORS[key].classwise:
        for c in range(K):
            assert (d[y == c] == firsts[c]).all(), f"class {c} images do not share one perturbation"
        assert len({f.numpy().tobytes() for f in firsts}) == K, "classes must differ"
    else:  # sample-wise: a fresh perturbation per image
        assert not (d[y == 0] == firsts[0]).all()


@pytest.mark.parametrize("key,grid", [("regions-4", 2), ("regions-16", 4)])
def test_regions_are_constant_signed_blocks(key, grid, mid):
    x, y = mid
    d = diff(P.generate(key, x, y, K, seed=0), x)
    blocks = d.view(200, 3, grid, 32 // grid, grid, 32 // grid)
    assert (blocks.abs() == 8).all()
    assert (blocks == blocks[:, :, :, :1, :, :1]).all()


@pytest.mark.parametrize("size", [4, 8])
def test_patches_are_one_square_per_class(size, mid):
    x, y = mid
    d = diff(P.generate(f"patches-{size}", x, y, K, seed=0), x)
    for c in range(K):
        nz = torch.nonzero(d[y == c][0].abs().sum(0))
        assert len(nz) == size * size
        assert (nz.max(0).values - nz.min(0).values == size - 1).all()
        assert (d[y == c][0][:, nz[:, 0], nz[:, 1]].abs() == 8).all()


def test_lsp_is_patchwise_and_linearly_clustered(mid):
    x, y = mid
    d = diff(P.generate("lsp", x, y, K, seed=0), x)
    blocks = d.view(200, 3, 4, 8, 4, 8)
    # one value per 8×8 patch, up to the one-step L2 rounding repair
    assert (blocks - blocks[:, :, :, :1, :, :1]).abs().max() <= 1
    means = torch.stack([d[y == c].mean(0) for c in range(K)]).flatten(1)
    nearest = torch.cdist(d.flatten(1), means).argmin(1)
    assert (nearest == y).float().mean() > 0.95


def test_ops_shares_one_pixel_and_colour_per_class(data):
    x, y = data
    out = P.generate("ops", x, y, K)
    picks = G.ops_search(x, y, K)
    assert len(set(picks)) == K
    changed = (out != x).any(1)
    for c, (r, q, col) in enumerate(picks):
        cls = y == c
        assert (out[cls][:, :, r, q] == G.COLOURS[col].to(torch.uint8) * 255).all()
        others = changed[cls].clone()
        others[:, r, q] = False
        assert not others.any()


def test_ops_finds_a_planted_shortcut():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    for c in range(3):  # class c: pixel (c, 2c) nearly black → far from white, tiny spread
        x[y == c, :, c, 2 * c] = torch.randint(0, 3, (20, 3), dtype=torch.uint8, generator=g)
    assert G.ops_search(x, y, 3) == [(c, 2 * c, 7) for c in range(3)]


def test_ops_search_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (24, 3, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(24) % 2
    taken, expected = set(), []
    for c in range(2):
        xc = x[y == c].double().numpy() / 255
        best = None
        for r in range(4):
            for q in range(4):
                for ci, col in enumerate(G.COLOURS.numpy()):
                    v = np.abs(col[None, :] - xc[:, :, r, q]).ravel()
                    s = v.mean() / v.std()
                    if (r, q, ci) not in taken and (best is None or s > best[0] + 1e-12):
                        best = (s, (r, q, ci))
        taken.add(best[1])
        expected.append(best[1])
    assert G.ops_search(x, y, 2) == expected


# --- apply_perturbation ---------------------------------------------------------------------------

def test_linf_rounding_goes_toward_the_clean_pixel():
    x = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    out = P.apply_perturbation(x, torch.full((1, 3, 2, 2), 7.5 / 255), "linf", 7.5 / 255)
    assert (out == 107).all()  # 107.5 rounds up to 108, which would exceed 7.5
    out = P.apply_perturbation(x, torch.full((1, 3, 2, 2), -0.4 / 255), "linf", 7.5 / 255)
    assert (out == 100).all()


def test_l2_rounding_repair_is_minimal():
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    eps = math.sqrt(3072 * 0.36) / 255            # exactly the norm of a 0.6-pixel change
    out = P.apply_perturbation(x, torch.full(x.shape, 0.6 / 255), "l2", eps)
    d = diff(out, x)
    assert ((d == 0) | (d == 1)).all()
    assert (d.flatten(1).sum(1) == math.floor(3072 * 0.36)).all()  # as many +1s as fit


def test_clipping_at_the_range_ends():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = P.apply_perturbation(x, torch.tensor([-0.1, 0.1]).view(1, 1, 2).expand(3, 1, 2), "linf", 8 / 255)
    assert torch.equal(out, x)


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_key_suggests_the_closest(data):
    x, y = data
    with pytest.raises(UserError, match="did you mean 'l2-ar'.*valid: lsp"):
        P.generate("l2ar", x, y, K)


@pytest.mark.parametrize("key,eps", [("cwrandom", -0.1), ("cwrandom", 0.0), ("cwrandom", 2.0),
                                     ("l2-ar", 1e6), ("lsp", float("nan")), ("ops", 0.1),
                                     ("regions-4", "8")])
def test_bad_eps(key, eps, data):
    x, y = data
    with pytest.raises(UserError, match="eps"):
        P.generate(key, x, y, K, eps=eps)


def test_bad_data_and_options(data):
    x, y = data
    with pytest.raises(UserError, match="labels must lie"):
        P.generate("cwrandom", x, y, 5)
    with pytest.raises(UserError, match="uint8"):
        P.generate("cwrandom", x.float(), y, K)
    with pytest.raises(UserError, match="int64"):
        P.generate("cwrandom", x, y[:10], K)
    with pytest.raises(UserError, match="seed"):
        P.generate("cwrandom", x, y, K, seed=-1)
    with pytest.raises(UserError, match="no option 'patch'"):
        P.generate("cwrandom", x, y, K, patch=4)


# --- importers ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(30) % 3
    return x, y


def nhwc(x):
    return x.permute(0, 2, 3, 1).numpy()


def test_import_tap(tmp_path, small):
    from PIL import Image
    x, y = small
    poisoned = (x.int() ^ 1).to(torch.uint8)
    (tmp_path / "data").mkdir()
    for i, img in enumerate(nhwc(poisoned)):
        Image.fromarray(img).save(tmp_path / "data" / f"{i}.png")
    out, labels = P.import_poison("tap", tmp_path, x, y, 3)
    assert torch.equal(out, poisoned) and torch.equal(labels, y)
    os.remove(tmp_path / "data" / "7.png")
    with pytest.raises(UserError, match="expected 30"):
        P.import_poison("tap", tmp_path, x, y, 3)


@pytest.mark.parametrize("classwise", [False, True])
def test_import_ule(tmp_path, small, classwise):
    x, y = small
    g = torch.Generator().manual_seed(1)
    p = (torch.rand(3 if classwise else 30, 3, 8, 8, generator=g) * 2 - 1) * (8 / 255)
    p[0, 0, 0, 0] = 0.5 / 255  # a half-pixel step that the truncation drops
    torch.save(p, tmp_path / "perturbation.pt")
    out, labels = P.import_poison("ule", tmp_path, x, y, 3)
    pn = p[y] if classwise else p
    expect = np.clip(nhwc(x).astype(np.float32) + nhwc(pn * 255), 0, 255).astype(np.uint8)
    assert torch.equal(out, torch.from_numpy(expect).permute(0, 3, 1, 2)) and torch.equal(labels, y)
    torch.save(p[:, :, :4], tmp_path / "perturbation.pt")
    with pytest.raises(UserError, match="expected float"):
        P.import_poison("ule", tmp_path, x, y, 3)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_import_rem(tmp_path, small, protocol):
    x, y = small
    rng = np.random.default_rng(0)
    noise = rng.integers(-8, 9, size=(30, 3, 8, 8)).astype(np.int8)
    noise[0, 0, 0, :2] = [127, -128]  # forces clipping at both ends
    path = tmp_path / "rem.pkl"
    with open(path, "wb") as f:
        pickle.dump(noise, f, protocol=protocol)
    out, _ = P.import_poison("rem", path, x, y, 3)
    expect = np.clip(x.numpy().astype(np.int16) + noise, 0, 255).astype(np.uint8)
    assert torch.equal(out, torch.from_numpy(expect))
    with open(path, "wb") as f:
        pickle.dump(noise[:5], f, protocol=protocol)
    with pytest.raises(UserError, match="expected int8"):
        P.import_poison("rem", path, x, y, 3)


def test_import_rem_refuses_other_globals(tmp_path, small):
    x, y = small
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump([np.zeros(3, np.int8), _Evil(str(marker))], f)
    with pytest.raises(UserError, match="refusing to unpickle global"):
        P.import_poison("rem", path, x, y, 3)
    assert not marker.exists()


def test_import_ntga(tmp_path, small):
    x, y = small
    rng = np.random.default_rng(0)
    xs = rng.random((30, 8, 8, 3)).astype(np.float32)
    labels = (y.numpy() + 1) % 3  # the file's own labels win
    np.save(tmp_path / "x_train_cifar10_ntga.npy", xs)
    np.save(tmp_path / "y_train_cifar10.npy", np.eye(3, dtype=np.float32)[labels])
    out, lab = P.import_poison("ntga", tmp_path, x, y, 3)
    assert torch.equal(out, torch.from_numpy((xs * 255).astype(np.uint8)).permute(0, 3, 1, 2))
    assert torch.equal(lab, torch.from_numpy(labels).long())
    np.save(tmp_path / "x_train_cifar10_ntga.npy", xs[:20])
    with pytest.raises(UserError, match=r"expected float \(30, 8, 8, 3\)"):
        P.import_poison("ntga", tmp_path, x, y, 3)


@pytest.mark.parametrize("n", [30, 3])
def test_import_ops(tmp_path, small, n):
    x, y = small
    p = np.zeros((n, 8, 8, 3), np.float32)
    p[:, 2, 5, :] = 1.0  # a white pixel
    p[:, 0, 0, 0] = 0.3 / 255  # truncated away
    np.save(tmp_path / "perturbation.npy", p)
    out, _ = P.import_poison("ops", tmp_path, x, y, 3)
    pn = p if n == 30 else p[y.numpy()]
    expect = np.uint8(np.clip(nhwc(x).astype(np.float32) / 255 + pn, 0, 1) * 255)
    assert torch.equal(out, torch.from_numpy(expect).permute(0, 3, 1, 2))
    assert (out[:, :, 2, 5] == 255).all()
    assert torch.equal(out[:, :, 3:], x[:, :, 3:])  # clean pixels survive the float round trip
    np.save(tmp_path / "perturbation.npy", p[:, :4])
    with pytest.raises(UserError, match="expected float"):
        P.import_poison("ops", tmp_path, x, y, 3)


def test_import_lsp(tmp_path, small):
    x, y = small
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(45) % 3)  # 15 synthetic samples per class, 10 needed
    data = rng.normal(0, 0.03, size=(45, 8, 8, 3))
    np.save(tmp_path / "simple_data.npy", data)
    np.save(tmp_path / "simple_label.npy", labels)
    out, lab = P.import_poison("lsp", tmp_path, x, y, 3)
    expect = nhwc(x).astype(np.float64) / 255
    for c in range(3):
        expect[y.numpy() == c] += data[labels == c][:10]
    expect = np.clip(expect * 255, 0, 255).astype(np.uint8)
    assert torch.equal(out, torch.from_numpy(expect).permute(0, 3, 1, 2)) and torch.equal(lab, y)
    np.save(tmp_path / "simple_label.npy", np.where(labels == 2, 0, labels))
    with pytest.raises(UserError, match="class 2.*expected >= 10, got 0"):
        P.import_poison("lsp", tmp_path, x, y, 3)


def test_unknown_format(small, tmp_path):
    x, y = small
    with pytest.raises(UserError, match="did you mean 'ntga'"):
        P.import_poison("ntg", tmp_path, x, y, 3)


# --- own format and picture ---------------------------------------------------------------------

def test_save_load_round_trip(tmp_path, mid):
    x, y = mid
    out, meta = P.timed_generate("cwrandom", x, y, K, seed=2, dataset="synthetic")
    path = P.save_poison(tmp_path / "sub" / "p.pt", out, y, meta)
    assert os.listdir(path.parent) == ["p.pt"]  # no temp files left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "images", "labels", "meta"}
    images, labels, meta2 = P.load_poison(path)
    assert torch.equal(images, out) and torch.equal(labels, y)
    assert meta2 == meta and meta2["eps"] == 8 / 255 and meta2["norm"] == "linf"
    assert meta2["generation_seconds"] >= 0


def test_save_and_load_validate(tmp_path, small):
    x, y = small
    meta = {"key": "cwrandom", "eps": 0.03, "norm": "linf", "seed": 0, "dataset": "d",
            "generation_seconds": 1.0}
    with pytest.raises(UserError, match="lacks seed"):
        P.save_poison(tmp_path / "a.pt", x, y, {k: v for k, v in meta.items() if k != "seed"})
    with pytest.raises(UserError, match="only str"):
        P.save_poison(tmp_path / "a.pt", x, y, {**meta, "extra": np.zeros(2)})
    with pytest.raises(UserError, match="labels"):
        P.save_poison(tmp_path / "a.pt", x, y.int(), meta)
    torch.save({"format": P.FORMAT, "images": x.float(), "labels": y, "meta": meta}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="uint8"):
        P.load_poison(tmp_path / "b.pt")
    torch.save({"format": P.FORMAT, "images": x, "meta": meta}, tmp_path / "c.pt")
    with pytest.raises(UserError, match="lacks labels"):
        P.load_poison(tmp_path / "c.pt")
    torch.save({"format": P.FORMAT, "images": x, "labels": y[:3], "meta": meta}, tmp_path / "d.pt")
    with pytest.raises(UserError, match=r"expected int64 \(30,\)"):
        P.load_poison(tmp_path / "d.pt")
    with pytest.raises(UserError, match="not found"):
        P.load_poison(tmp_path / "none.pt")


def test_save_poison_grid(tmp_path, mid):
    from PIL import Image
    x, y = mid
    out = P.generate("regions-4", x, y, K)
    path = P.save_poison_grid(tmp_path / "grid.png", x, out, y, n_per_class=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # 20 columns, 3 rows


def test_apply_perturbation_rejects_bad_arguments():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(UserError, match="norm"):
        P.apply_perturbation(x, torch.zeros(3, 4, 4), "l1", 0.1)
    with pytest.raises(UserError, match="positive"):
        P.apply_perturbation(x, torch.zeros(3, 4, 4), "linf", -0.1)
    with pytest.raises(UserError, match="does not fit"):
        P.apply_perturbation(x, torch.zeros(3, 3, 4, 4), "linf", 0.1)
    with pytest.raises(UserError, match="NaN"):
        P.apply_perturbation(x, torch.full((3, 4, 4), math.nan), None, None)

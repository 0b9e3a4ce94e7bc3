import json
import math

import numpy as np
import pytest
import torch

import attacks as A
from constants import DATASETS, UserError


def images(n=6, seed=0, c=3, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def changed(before, after):
    """(row, col) positions where any image/channel changed."""
    return {tuple(p) for p in torch.nonzero((before != after).any(0).any(0)).tolist()}


def test_badnets_release_patch_exact():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    y = A.BadNets().apply(x)
    assert changed(x, y) == {(r, c) for r in range(27, 31) for c in range(27, 31)}
    assert (y[:, :, 27:31, 27:31] == 255).all()


def test_badnets_positions_and_colour():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    y = A.BadNets(size=3, margin=0, position="top-left", value=[10, 20, 30]).apply(x)
    assert changed(x, y) == {(r, c) for r in range(3) for c in range(3)}
    assert y[0, :, 0, 0].tolist() == [10, 20, 30]
    y = A.BadNets(size=3, margin=0).apply(x)  # BackdoorBench: rows/cols 5–7 of 8
    assert changed(x, y) == {(r, c) for r in range(5, 8) for c in range(5, 8)}
    with pytest.raises(UserError):
        A.BadNets(size=8, margin=1).apply(x)


def test_single_image_and_dtype_check():
    x = images(1)[0]
    assert A.BadNets().apply(x).shape == x.shape
    with pytest.raises(UserError):
        A.BadNets().apply(x.float())


def test_blend_arithmetic():
    t = A.Blend(alpha=0.25, seed=3)
    x = images(4)
    p = t.pattern((3, 32, 32)).double()
    expected = ((0.75 * x.double() + 0.25 * p).round()).clamp(0, 255)
    assert (t.apply(x).double() - expected).abs().max() <= 1  # float32 vs float64 ties
    assert (A.Blend(alpha=1.0, seed=3).apply(x) == p.to(torch.uint8)).all()
    assert (A.Blend(alpha=0.0, seed=3).apply(x) == x).all()


def test_trojan_square_and_watermark_geometry():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    sq = changed(x, A.TrojanSquare().apply(x))
    assert sq <= {(r, c) for r in range(21, 30) for c in range(21, 30)} and len(sq) > 70
    wm = changed(x, A.TrojanWatermark().apply(x))
    assert len(wm) == 321 and max(max(p) for p in wm) <= 29


def test_sig_signal():
    x = torch.full((1, 3, 4, 32), 100, dtype=torch.uint8)
    y = A.SIG().apply(x).double()
    j = torch.arange(32).double()
    expected = (100 + 40 * torch.sin(2 * math.pi * j * 6 / 32)).round()
    assert (y[0, :, :] == expected).all()


def test_l0_inv_pixels():
    x = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    t = A.L0Invisible(seed=1)
    y = t.apply(x)
    assert changed(x, y) == {(31, c) for c in range(23, 32)}
    set_px = (y[0, :, 31, 23:] != 0).any(0)
    assert set_px.sum() == 8                       # 8 of the 9 masked pixels are set
    assert (y[:, :, 31, 23:] == y[0, :, 31, 23:]).all()  # mask zeroes: result is image-independent


def test_l2_inv_stats():
    p = A.L2Invisible().pattern((3, 32, 32))
    assert p.max() == 68 and p.min() >= 0
    assert abs(float((p / 255).norm()) - 3.2) < 0.1


@pytest.mark.parametrize("kind", ["blend", "trojan_sq", "trojan_wm", "l0_inv", "l2_inv"])
def test_seed_determinism(kind):
    x = images(3)
    a, b = A.make_trigger(kind, seed=5), A.make_trigger(kind, seed=5)
    assert torch.equal(a.apply(x), b.apply(x))
    assert not torch.equal(a.apply(x), A.make_trigger(kind, seed=6).apply(x))


@pytest.mark.parametrize("trigger", [
    A.BadNets(size=3, margin=0, value=[255, 0, 0]), A.Blend(alpha=0.1, seed=9),
    A.TrojanSquare(seed=2), A.TrojanWatermark(seed=2), A.SIG(delta=20, freq=4),
    A.L0Invisible(seed=4), A.L2Invisible(seed=4)])
def test_meta_round_trip(trigger):
    meta = json.loads(json.dumps(trigger.to_meta()))  # plain JSON-able data only
    rebuilt = A.Trigger.from_meta(meta)
    x = images(3)
    assert type(rebuilt) is type(trigger) and torch.equal(rebuilt.apply(x), trigger.apply(x))


def test_meta_errors():
    with pytest.raises(UserError):
        A.trigger_from_meta({"kind": "nope"})
    with pytest.raises(UserError):
        A.trigger_from_meta({"kind": "badnets", "sizee": 3})


def test_poison_all2one_rate_and_pool():
    x, y = images(200), torch.arange(200) % 10
    idx, px, py = A.poison_training_set(x, y, A.BadNets(), target=8, rate=0.2, seed=0)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert (y[idx] != 8).all() and (py == 8).all()
    assert torch.equal(px, A.BadNets().apply(x[idx]))
    idx2, _, _ = A.poison_training_set(x, y, A.BadNets(), target=8, rate=0.2, seed=0)
    idx3, _, _ = A.poison_training_set(x, y, A.BadNets(), target=8, rate=0.2, seed=1)
    assert torch.equal(idx, idx2) and not torch.equal(idx, idx3)


def test_poison_all2all_and_clean_label():
    x, y = images(100), torch.arange(100) % 10
    idx, _, py = A.poison_training_set(x, y, A.BadNets(), None, 0.3, 0, mode="all2all",
                                       num_classes=10)
    assert torch.equal(py, (y[idx] + 1) % 10)
    idx, px, py = A.poison_training_set(x, y, A.SIG(), 3, 0.05, 0, mode="clean_label")
    assert len(idx) == 5 and (y[idx] == 3).all() and torch.equal(py, y[idx])
    assert torch.equal(px, A.SIG().apply(x[idx]))
    with pytest.raises(UserError):  # only 10 target-class images exist
        A.poison_training_set(x, y, A.SIG(), 3, 0.2, 0, mode="clean_label")


def test_triggered_test_set():
    x, y = images(20), torch.arange(20) % 10
    xt, ya, yt = A.make_triggered_test(x, y, A.BadNets(), 8)
    assert torch.equal(xt, A.BadNets().apply(x)) and (ya == 8).all() and torch.equal(yt, y)
    _, ya, _ = A.make_triggered_test(x, y, A.BadNets(), None, mode="all2all", num_classes=10)
    assert torch.equal(ya, (y + 1) % 10)


def test_corner_patch_stamp():
    v = DATASETS["cifar10"].max_normalized
    x = torch.randn(4, 3, 32, 32)
    before = x.clone()
    out = A.corner_patch_stamp(x, value=v)
    assert torch.equal(x, before)  # not in place by default
    assert (out[:, :, 29:, 29:] == v).all()
    assert torch.equal(out[:, :, :29], x[:, :, :29]) and torch.equal(out[:, :, :, :29], x[:, :, :, :29])
    out = A.corner_patch_stamp(x, 2, value=v, mask=torch.tensor([True, False, True, False]),
                               inplace=True)
    assert out is x and (x[0, :, 30:, 30:] == v).all() and torch.equal(x[1], before[1])


def test_release_file_trigger(tmp_path):
    from PIL import Image

    png = np.zeros((32, 32, 3), np.uint8)
    png[31, 23:31] = 200
    Image.fromarray(png).save(tmp_path / "l0_inv.png")
    region = np.zeros((3, 32, 32), np.float32)
    region[:, 31, 23:] = 1
    np.save(tmp_path / "mask.npy", region)
    t = A.load_release_trigger(tmp_path / "l0_inv.png")
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    y = t.apply(x)
    assert changed(x, y) == {(31, c) for c in range(23, 32)}
    assert (y[:, :, 31, 23:31] == 200).all() and (y[:, :, 31, 31] == 0).all()
    rebuilt = A.trigger_from_meta(json.loads(json.dumps(t.to_meta())))
    assert torch.equal(rebuilt.apply(x), y)
    np.save(tmp_path / "mask.npy", 1 - region)  # other polarity, same meaning, new bytes
    with pytest.raises(UserError):
        A.trigger_from_meta(t.to_meta())
    assert torch.equal(A.load_release_trigger(tmp_path / "l0_inv.png").apply(x), y)

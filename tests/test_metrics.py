import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


import metrics as M  # noqa: E402
from constants import UserError  # noqa: E402

C = 10


def _probs_with_conf(conf, labels):
    """Rows with p_y = conf[i] and the rest spread evenly over the other classes."""
    conf = np.asarray(conf, dtype=np.float64)
    p = np.repeat(((1 - conf) / (C - 1))[:, None], C, axis=1)
    p[np.arange(len(labels)), labels] = conf
    return p


def _set(rng, n, lo, hi):
    y = rng.integers(0, C, n)
    return _probs_with_conf(rng.uniform(lo, hi, n), y), y


def test_accuracy_numpy_torch_logits_and_preds():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [4.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2])
    assert M.accuracy(logits, labels) == pytest.approx(50.0)
    assert M.accuracy(torch.tensor(logits), torch.tensor(labels)) == pytest.approx(50.0)
    assert M.accuracy(torch.tensor([0, 1, 2, 0]), labels) == pytest.approx(50.0)
    assert isinstance(M.accuracy(logits, labels), float)
    assert M.unlearning_accuracy(logits, labels) == pytest.approx(50.0)
    # classes 0,1,2 -> 1/1, 1/2, 0/1
    assert M.per_class_accuracy(logits, labels) == pytest.approx([100.0, 50.0, 0.0])
    with pytest.raises(UserError):
        M.accuracy(logits, labels[:3])


def test_mask_out_class_keeps_type():
    y = torch.tensor([0, 3, 3, 1])
    m = M.mask_out_class(y, 3)
    assert isinstance(m, torch.Tensor) and m.tolist() == [True, False, False, True]
    assert M.mask_out_class(np.array([3, 2]), 3).tolist() == [False, True]


def test_modified_entropy_hand_computed():
    p = np.array([[0.7, 0.2, 0.1]])
    want_y0 = -(0.3 * math.log(0.7)) - 0.2 * math.log(0.8) - 0.1 * math.log(0.9)
    want_y1 = -(0.8 * math.log(0.2)) - 0.7 * math.log(0.3) - 0.1 * math.log(0.9)
    assert M.modified_entropy(p, [0])[0] == pytest.approx(want_y0)
    assert M.modified_entropy(p, [1])[0] == pytest.approx(want_y1)
    # a one-hot correct prediction has zero modified entropy and stays finite
    assert M.modified_entropy(np.array([[1.0, 0.0, 0.0]]), [0])[0] == pytest.approx(0.0)
    assert M.entropy(np.array([[0.5, 0.5]]))[0] == pytest.approx(math.log(2))


def test_svc_mia_known_answers():
    rng = np.random.default_rng(0)
    retain = _set(rng, 150, 0.95, 1.0)   # members: confident
    test = _set(rng, 150, 0.03, 0.08)    # non-members: wrong and unsure
    yf = rng.integers(0, C, 40)
    low = M.svc_mia(*retain, *test, _probs_with_conf(np.full(40, 0.05), yf), yf,
                    from_logits=False)
    assert set(low) == set(M.MIA_ATTACKS)
    assert all(v == pytest.approx(100.0) for v in low.values()), low
    high = M.svc_mia(*retain, *test, _probs_with_conf(np.full(40, 0.99), yf), yf,
                     from_logits=False)
    assert all(v == pytest.approx(0.0) for v in high.values()), high
    # logits give the same answer as their softmax
    logits = torch.log(torch.tensor(_probs_with_conf(np.full(40, 0.05), yf)))
    got = M.svc_mia(*(torch.log(torch.tensor(a)) if a.ndim == 2 else a for a in retain + test),
                    logits, torch.tensor(yf), attacks=("confidence",))
    assert got == {"confidence": pytest.approx(100.0)}


def test_svc_mia_uses_first_test_size_retain_samples():
    rng = np.random.default_rng(1)
    hi_p, hi_y = _set(rng, 100, 0.95, 1.0)
    lo_p, lo_y = _set(rng, 300, 0.03, 0.08)
    retain = (np.concatenate([hi_p, lo_p]), np.concatenate([hi_y, lo_y]))
    test = _set(rng, 100, 0.03, 0.08)
    forget = _set(rng, 40, 0.04, 0.07)
    # only retain[:100] (confident) are shadow members; had all 400 been used, the
    # low-confidence region would be mostly "member" and the answer near 0
    got = M.svc_mia(*retain, *test, *forget, from_logits=False, attacks=("confidence",))
    assert got["confidence"] == pytest.approx(100.0)


def test_rf_mia_separable_losses():
    rng = np.random.default_rng(0)
    retain, val = rng.uniform(0, 0.1, 80), rng.uniform(2, 3, 40)
    test = rng.uniform(2, 3, 40)
    res = M.rf_loss_mia(retain, val, rng.uniform(0, 0.1, 30), test)
    assert res["auc"] == pytest.approx(100.0)
    assert res["acc"] == pytest.approx(0.0)          # forget looks like members
    assert res["cv_acc"] == pytest.approx(100.0)
    forgotten = M.rf_loss_mia(retain, val, rng.uniform(2, 3, 30), test, select="max_acc")
    assert forgotten["acc"] == pytest.approx(100.0)  # forget looks like non-members
    assert math.isnan(forgotten["cv_acc"])
    with pytest.raises(UserError):
        M.rf_loss_mia(retain, val, test, test, select="best")


def test_rf_mia_subsample_is_seeded():
    rng = np.random.default_rng(2)
    sets = [rng.normal(m, 1.0, 60) for m in (0.0, 0.5, 0.0, 0.5)]
    a = M.rf_loss_mia(*sets, max_samples=30, seed=3)
    b = M.rf_loss_mia(*sets, max_samples=30, seed=3)
    assert a == b


def test_per_sample_loss_matches_torch():
    logits = torch.tensor([[1.0, 2.0, 0.5], [3.0, -1.0, 0.0]])
    y = torch.tensor([2, 0])
    want = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
    assert M.per_sample_loss(logits, y) == pytest.approx(want, abs=1e-6)


def test_asr_excludes_target_class_and_release_option():
    labels = np.array([0, 0, 1, 2, 3])
    preds = np.array([0, 0, 0, 1, 3])
    assert M.attack_success_rate(preds, labels, target=0) == pytest.approx(100 / 3)
    # I-BAU release: acc(f(x_trig), target) over all images = 3/5
    assert M.attack_success_rate(preds, labels, 0, include_target_class=True) == pytest.approx(60.0)
    assert M.robust_accuracy(preds, labels, target=0) == pytest.approx(100 / 3)
    assert M.asr_poison(preds, labels) == pytest.approx(100 / 3)
    assert M.acc_corr_poison(preds, labels) == pytest.approx(60.0)  # all images, clean labels


def test_der_hand_numbers():
    # I-BAU CIFAR-10 notebook: ACC 84.94 -> 83.08, ASR 97.64 -> 9.36
    assert M.defense_effectiveness_rate(84.94, 83.08, 97.64, 9.36) == pytest.approx(93.21)
    # accuracy up and ASR up: both terms clipped to 0 -> 50
    assert M.defense_effectiveness_rate(80.0, 85.0, 10.0, 20.0) == pytest.approx(50.0)
    assert M.defense_effectiveness_rate(90.0, 90.0, 100.0, 0.0) == pytest.approx(100.0)
    with pytest.raises(UserError):
        M.defense_effectiveness_rate(84.9, 83.1, 150.0, 9.4)  # not a percentage


def test_avg_gap_and_mean_std():
    m = {"UA": 10.0, "RA": 99.0, "TA": 90.0, "MIA": 20.0}
    ref = {"UA": 5.0, "RA": 100.0, "TA": 94.0, "MIA": 12.0}
    assert M.avg_gap(m, ref) == pytest.approx((5 + 1 + 4 + 8) / 4)
    assert M.avg_gap(m, ref, keys=("UA",)) == pytest.approx(5.0)
    with pytest.raises(UserError):
        M.avg_gap(m, {"UA": 1.0})
    assert M.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert M.mean_std([4.0]) == (4.0, 0.0)


def test_interclass_metrics():
    labels = np.array([3, 5, 3, 0, 1, 2])
    preds = np.array([5, 5, 3, 0, 2, 2])
    assert M.acc_corr_interclass(preds, labels) == pytest.approx(200 / 3)
    assert M.acc_retain_interclass(preds, labels) == pytest.approx(200 / 3)
    assert M.acc_retain_interclass(preds, labels, classes=(1,)) == pytest.approx(80.0)  # 4 of the other 5


def test_timer_measures_wall_clock():
    with M.timer("cpu") as t:
        sum(range(10000))
    assert 0.0 <= t.seconds < 5.0
    assert t.minutes == pytest.approx(t.seconds / 60)

"""Metrics as plain functions on logits / predictions and labels.

Inputs may be torch tensors, numpy arrays or lists. A 2-D input is read as logits (or
probabilities) and reduced with argmax; a 1-D input is read as predicted labels.
Every accuracy or rate is returned in PERCENT (0-100) as a Python float; a rate over an
empty set is NaN. Nothing here trains a network or loads data.

Sources (see /work/shared/docs): SalUn (UA/RA/TA, SVC MIA-efficacy, Avg. Gap), DeepDive's
RandomForest MIA, BackdoorBench (ASR, R-Acc, DER), corrective unlearning (Acc_corr,
Acc_retain).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Iterable, Mapping

import numpy as np
import torch

from constants import UserError

# Keeps log() finite where a probability is 0 or 1.
_EPS = 1e-30


# --------------------------------------------------------------------------- helpers

def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(y) -> np.ndarray:
    y = _np(y)
    if y.ndim != 1:
        raise UserError(f"labels must be 1-D, got shape {y.shape}")
    return y.astype(np.int64)


def _preds(logits_or_preds) -> np.ndarray:
    x = _np(logits_or_preds)
    if x.ndim == 2:
        return x.argmax(axis=1).astype(np.int64)
    if x.ndim == 1:
        return x.astype(np.int64)
    raise UserError(f"expected logits (N x C) or predictions (N,), got shape {x.shape}")


def _preds_labels(logits_or_preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = _preds(logits_or_preds), _labels(labels)
    if len(p) != len(y):
        raise UserError(f"{len(p)} predictions but {len(y)} labels")
    return p, y


def _rate(hits: np.ndarray) -> float:
    return float(hits.mean() * 100.0) if hits.size else math.nan


def _probs(logits_or_probs, from_logits: bool) -> np.ndarray:
    x = _np(logits_or_probs).astype(np.float64)
    if x.ndim != 2:
        raise UserError(f"expected an N x C array of logits/probabilities, got shape {x.shape}")
    if not from_logits:
        return x
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------ accuracies

def accuracy(logits_or_preds, labels) -> float:
    """Top-1 accuracy in %."""
    p, y = _preds_labels(logits_or_preds, labels)
    return _rate(p == y)


def per_class_accuracy(logits_or_preds, labels, num_classes: int | None = None) -> list[float]:
    """Accuracy in % for each class 0..num_classes-1 (NaN for a class with no samples)."""
    p, y = _preds_labels(logits_or_preds, labels)
    n = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    return [_rate(p[y == c] == c) for c in range(n)]


def mask_out_class(labels, c: int):
    """Boolean mask of samples whose label is not `c`, of the same kind as `labels`
    (torch in, torch out), e.g. for TA without the forgotten class."""
    if isinstance(labels, torch.Tensor):
        return labels != c
    return _labels(labels) != c


# SalUn: UA = 100 - accuracy on the forget set; RA / TA are plain accuracies on the retain /
# test set (for class-wise forgetting the caller filters the test set with mask_out_class).
def unlearning_accuracy(forget_logits_or_preds, forget_labels) -> float:
    """UA in %: 100 - forget accuracy."""
    return 100.0 - accuracy(forget_logits_or_preds, forget_labels)


def retain_accuracy(retain_logits_or_preds, retain_labels) -> float:
    """RA in %: accuracy on the retain set."""
    return accuracy(retain_logits_or_preds, retain_labels)


def test_accuracy(test_logits_or_preds, test_labels) -> float:
    """TA in %: accuracy on the (possibly class-filtered) test set."""
    return accuracy(test_logits_or_preds, test_labels)


test_accuracy.__test__ = False  # not a pytest test, despite the name


# ----------------------------------------------------------------- SalUn SVC MIA

MIA_ATTACKS = ("correctness", "confidence", "entropy", "m_entropy", "prob")


def entropy(probs) -> np.ndarray:
    """Shannon entropy (nats) of each row of an N x C probability array."""
    p = _np(probs).astype(np.float64)
    return -(p * np.log(np.clip(p, _EPS, None))).sum(axis=1)


def modified_entropy(probs, labels) -> np.ndarray:
    """Song & Mittal's modified entropy, as their paper defines it:
    Mentr(p, y) = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).

    The official SalUn `m_entropy` differs: it indexes `[:, labels]` (whole columns for every
    label present in the batch, so with all classes present every entry is flipped) and takes
    log(p) where log(1 - p) is meant, which yields -sum_i (1 - p_i) log p_i, independent of y.
    We follow the paper's formula.
    """
    p = _np(probs).astype(np.float64)
    y = _labels(labels)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    others = p * np.log(np.clip(1.0 - p, _EPS, None))
    others[rows, y] = 0.0
    return -(1.0 - p_y) * np.log(np.clip(p_y, _EPS, None)) - others.sum(axis=1)


def mia_features(probs, labels, attack: str) -> np.ndarray:
    """N x d feature matrix of one SalUn MIA attack, from probabilities and labels."""
    p = _np(probs).astype(np.float64)
    y = _labels(labels)
    if attack == "correctness":
        f = (p.argmax(axis=1) == y).astype(np.float64)
    elif attack == "confidence":
        f = p[np.arange(len(y)), y]
    elif attack == "entropy":
        f = entropy(p)
    elif attack == "m_entropy":
        f = modified_entropy(p, y)
    elif attack == "prob":
        return p
    else:
        raise UserError(f"unknown MIA attack {attack!r}; choose from {MIA_ATTACKS}")
    return f.reshape(-1, 1)


def svc_mia(retain_logits, retain_labels, test_logits, test_labels, forget_logits,
            forget_labels, *, from_logits: bool = True, attacks: Iterable[str] = MIA_ATTACKS,
            max_shadow: int | None = None) -> dict[str, float]:
    """SalUn's MIA-efficacy (official `SVC_MIA` with target_train=None), in %.

    Shadow members (label 1) are the FIRST n retain samples, shadow non-members (label 0) the
    first n test samples, n = min(|retain|, |test|) (further capped by `max_shadow`, for quick
    runs only; the official code uses n = |test|). For each attack an
    `SVC(C=3, gamma="auto", kernel="rbf")` is fitted on the shadow features, and the result is
    the share of forget samples predicted non-member. Returns {attack: %}; the paper's headline
    MIA-Efficacy is the "confidence" entry. Pass probabilities with `from_logits=False`.
    """
    from sklearn.svm import SVC  # imported here: only this function needs it

    sets = []
    for logits, labels in ((retain_logits, retain_labels), (test_logits, test_labels),
                           (forget_logits, forget_labels)):
        p, y = _probs(logits, from_logits), _labels(labels)
        if len(p) != len(y):
            raise UserError(f"{len(p)} rows of logits but {len(y)} labels")
        sets.append((p, y))
    (pr, yr), (pt, yt), (pf, yf) = sets
    n = min(len(yr), len(yt)) if max_shadow is None else min(len(yr), len(yt), max_shadow)
    if n == 0 or len(yf) == 0:
        raise UserError("SVC MIA needs non-empty retain, test and forget sets")
    if len({pr.shape[1], pt.shape[1], pf.shape[1]}) != 1:
        raise UserError("retain, test and forget logits have different numbers of classes")
    membership = np.concatenate([np.ones(n), np.zeros(n)])
    out = {}
    for attack in attacks:
        x_shadow = np.concatenate([mia_features(pr[:n], yr[:n], attack),
                                   mia_features(pt[:n], yt[:n], attack)])
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x_shadow, membership)
        member = clf.predict(mia_features(pf, yf, attack))
        out[attack] = float((1.0 - member.mean()) * 100.0)
    return out


# ----------------------------------------------------------- DeepDive RF MIA on losses

def per_sample_loss(logits, labels) -> np.ndarray:
    """Per-sample cross-entropy (nats) as a numpy array, the RF MIA's input."""
    x = _np(logits).astype(np.float64)
    y = _labels(labels)
    if x.ndim != 2 or len(x) != len(y):
        raise UserError(f"expected N x C logits for {len(y)} labels, got shape {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=1))
    return log_z - x[np.arange(len(y)), y]


def rf_loss_mia(retain_losses, val_losses, forget_losses, test_losses, *,
                select: str = "cv", max_samples: int | None = 5000, seed: int = 0,
                cv_folds: int = 3) -> dict:
    """DeepDive's RandomForest MIA on 1-D per-sample losses.

    Trained on retain (member, 1) vs validation (non-member, 0) losses; evaluated on forget (1)
    vs test (0). Grid: n_estimators in {20, 50, 100} x criterion in {gini, entropy},
    random_state=0. Returns {"auc": ROC-AUC on the forget/test pool x 100, "acc": (1 - mean
    predicted membership on forget) x 100, "n_estimators", "criterion", "cv_acc"}.

    Config selection: DeepDive keeps the config with the largest `acc`, which peeks at the
    forget set and is optimistic. By default (`select="cv"`) we instead pick the config with
    the best `cv_folds`-fold cross-validated accuracy on the training pool (retain vs val) only;
    `select="max_acc"` reproduces the original. Each set is capped at `max_samples` by a
    subsample seeded with `seed` (None = no cap). DeepDive fed batch-averaged losses; pass
    per-sample losses (see `per_sample_loss`) unless reproducing that exactly.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    if select not in ("cv", "max_acc"):
        raise UserError(f"select must be 'cv' or 'max_acc', got {select!r}")
    rng = np.random.default_rng(seed)

    def prep(losses):
        v = _np(losses).astype(np.float64).reshape(-1)
        if v.size == 0:
            raise UserError("RF MIA needs non-empty retain, val, forget and test losses")
        if max_samples is not None and v.size > max_samples:
            v = v[np.sort(rng.choice(v.size, max_samples, replace=False))]
        return v.reshape(-1, 1)

    r, v, f, t = (prep(x) for x in (retain_losses, val_losses, forget_losses, test_losses))
    x_train = np.concatenate([r, v])
    y_train = np.concatenate([np.ones(len(r)), np.zeros(len(v))])
    x_eval = np.concatenate([f, t])
    y_eval = np.concatenate([np.ones(len(f)), np.zeros(len(t))])
    folds = StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=seed)

    best = None
    for n_est in (20, 50, 100):
        for crit in ("gini", "entropy"):
            clf = RandomForestClassifier(n_estimators=n_est, criterion=crit, random_state=0)
            cv_acc = math.nan
            if select == "cv":
                cv_acc = float(cross_val_score(clf, x_train, y_train, cv=folds).mean() * 100.0)
            clf.fit(x_train, y_train)
            acc = float((1.0 - clf.predict(f).mean()) * 100.0)
            auc = float(roc_auc_score(y_eval, clf.predict_proba(x_eval)[:, 1]) * 100.0)
            res = {"auc": auc, "acc": acc, "n_estimators": n_est, "criterion": crit,
                   "cv_acc": cv_acc}
            key = cv_acc if select == "cv" else acc
            # strict '>' keeps the first (smallest) config on ties
            if best is None or key > best[0]:
                best = (key, res)
    return best[1]


# ------------------------------------------------------------------ aggregation

def avg_gap(metrics: Mapping[str, float], reference: Mapping[str, float],
            keys: Iterable[str] = ("UA", "RA", "TA", "MIA")) -> float:
    """SalUn's Avg. Gap: mean over `keys` of |metrics[k] - reference[k]| (reference = Retrain)."""
    keys = tuple(keys)
    missing = [k for k in keys if k not in metrics or k not in reference]
    if missing or not keys:
        raise UserError(f"avg_gap: keys missing from metrics or reference: {missing or keys}")
    return float(np.mean([abs(float(metrics[k]) - float(reference[k])) for k in keys]))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1); std is 0.0 for a single value."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise UserError("mean_std of no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


# ------------------------------------------------------------------------ backdoors

def attack_success_rate(preds_on_triggered, true_labels, target: int, *,
                        include_target_class: bool = False) -> float:
    """ASR in %: share of triggered images predicted as `target`.

    By default only images whose TRUE class is not `target` count (BackdoorBench). With
    `include_target_class=True` every image counts, as in the I-BAU release
    (acc(f(x_trig), target)), which puts a floor of ~1/num_classes on a clean model.
    """
    p, y = _preds_labels(preds_on_triggered, true_labels)
    keep = np.ones_like(y, dtype=bool) if include_target_class else y != target
    return _rate(p[keep] == target)


def robust_accuracy(preds_on_triggered, true_labels, target: int) -> float:
    """R-Acc (BackdoorBench RA) in %: triggered non-target-class images predicted as their
    true class."""
    p, y = _preds_labels(preds_on_triggered, true_labels)
    keep = y != target
    return _rate(p[keep] == y[keep])


def defense_effectiveness_rate(acc_before: float, acc_after: float,
                               asr_before: float, asr_after: float) -> float:
    """BackdoorBench DER, inputs and output in PERCENT:
    DER = [max(0, dASR) - max(0, dACC) + 1] / 2 with d = before - after on the [0, 1] scale,
    returned x100, so it lies in [0, 100]; 50 means no change.
    (BackdoorBench's non-"simplied" version adds the ACC term; we follow the formula.)"""
    vals = (acc_before, acc_after, asr_before, asr_after)
    if any(not 0.0 <= float(x) <= 100.0 for x in vals):
        raise UserError(f"DER expects accuracies and ASRs in percent (0-100), got {vals}")
    d_asr = max(0.0, float(asr_before) - float(asr_after))
    d_acc = max(0.0, float(acc_before) - float(acc_after))
    return (d_asr - d_acc + 100.0) / 2.0


# ------------------------------------------------------------ corrective unlearning

def acc_corr_poison(preds_on_triggered, clean_labels) -> float:
    """Poisoning Acc_corr in %: ALL triggered test images against their clean labels
    (class-0 images count too, as in the release)."""
    return accuracy(preds_on_triggered, clean_labels)


def acc_retain_poison(preds_on_clean, labels) -> float:
    """Poisoning Acc_retain in %: clean test accuracy."""
    return accuracy(preds_on_clean, labels)


def asr_poison(preds_on_triggered, clean_labels, target: int = 0) -> float:
    """Poisoning ASR in %: triggered non-`target` images predicted as `target` (class 0)."""
    return attack_success_rate(preds_on_triggered, clean_labels, target)


def _in_classes(y: np.ndarray, classes) -> np.ndarray:
    return np.isin(y, np.asarray(tuple(classes), dtype=np.int64))


def acc_corr_interclass(preds, labels, classes=(3, 5)) -> float:
    """Interclass-confusion Acc_corr in %: accuracy on test images of the confused classes
    (CIFAR-10 cat/dog by default)."""
    p, y = _preds_labels(preds, labels)
    keep = _in_classes(y, classes)
    return _rate(p[keep] == y[keep])


def acc_retain_interclass(preds, labels, classes=(3, 5)) -> float:
    """Interclass-confusion Acc_retain in %: accuracy on test images of all other classes."""
    p, y = _preds_labels(preds, labels)
    keep = ~_in_classes(y, classes)
    return _rate(p[keep] == y[keep])


# ------------------------------------------------------------------------- timing

class Timer:
    """Result holder of `timer()`: `seconds` (wall clock) and `minutes` (SalUn's RTE unit)."""

    seconds: float = math.nan

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0


def _needs_sync(device) -> bool:
    if not torch.cuda.is_available():
        return False
    if device is None:  # unknown: sync only if CUDA is already in use (no context creation)
        return torch.cuda.is_initialized()
    return torch.device(device).type == "cuda"


@contextmanager
def timer(device=None):
    """Wall-clock timing: `with timer(device) as t: ...` then `t.seconds`.

    CUDA kernels run asynchronously, so when `device` is a CUDA device we synchronise before
    starting and before stopping the clock; for a CPU device nothing is synchronised.
    """
    sync = _needs_sync(device)
    t = Timer()
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield t
    finally:
        if sync:
            torch.cuda.synchronize(device)
        t.seconds = time.perf_counter() - start

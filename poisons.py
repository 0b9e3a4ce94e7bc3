"""Availability poisons: generators, importers for the published formats, one on-disk format.

Images are uint8 N×3×H×W (RGB), labels int64 N; ε is on the [0,1] pixel scale. Every
generator takes a `seed`, draws only from local generators, and returns uint8 images whose
perturbation respects its bound *after* quantisation (see `apply_perturbation`).

Generators (`generate(key, x, y, num_classes, seed=0, eps=None, **kw)`):
  lsp         Linearly separable synthetic noise (Yu et al.). Per class c a Gaussian cluster in
              d = (H/8)(W/8)·3 dims, built like sklearn's make_classification (class_sep=10, all
              features informative, one cluster per class): centroid = a random distinct vertex
              of the hypercube {±10}^d, sample = N(0, I_d)·A_c + centroid with A_c ~ U(-1,1)^{d×d}.
              Each sample's d values are repeated into 8×8 patches (feature → channel, row, col)
              and the sample is L2-normalised to √(3HW)·6/255 (≈1.304 for CIFAR). Norm: L2.
  ops         One-pixel shortcut (Wu et al.). Per class (in order 0..K-1) the (pixel, colour) pair,
              colour ∈ {0,1}³, maximising mean/std of |colour − x| over the class's images (values
              in [0,1], the three channels pooled, std with ddof=0), skipping pairs chosen by
              earlier classes; ties go to the lowest pixel index (row-major), then the lowest colour
              index (colour bits R,G,B read as a binary number). Every image of the class gets that
              colour at that pixel. Unbounded (L0 = 1); deterministic, so `seed` is unused.
  ar, l2-ar   Autoregressive perturbations (Sandoval-Segura et al.), L∞ 8/255 and L2 1.0. One AR
              process per class, found by `find_ar_coefficients`; each image gets a fresh sample of
              its class's process, scaled to exactly ε in the norm.
  cwrandom    Class-wise uniform noise: per class one δ ~ U(−ε, ε)^{3×H×W}, ε = 8/255 (L∞).
  regions-4, regions-16, l2-regions-4
              The image is cut into a g×g grid of equal regions (g = 2 for 4 regions, 4 for 16;
              region of row r is ⌊r·g/H⌋). Each class draws one random sign per (region, channel);
              δ is that sign times a constant magnitude over the region. L∞: magnitude ε = 8/255.
              l2-regions-4: the same pattern with magnitude ε/√(3HW), so ‖δ‖₂ = ε = 1.0.
  patches-4, patches-8
              Per class one k×k×3 patch of random signs × ε (ε = 8/255, L∞) placed at a class-specific
              position drawn uniformly among those where it fits; zero elsewhere. (A k×k tiling of
              the whole image was rejected as a definition: with k=8 on 32×32 it would coincide with
              regions-16.) Overlapping positions of two classes are allowed.
  error-min   Unlearnable examples, sample-wise (Huang et al., min-min), L∞ 8/255: alternately train a
              surrogate for `train_step` batches on the perturbed data (engine.fit, SGD lr 0.1,
              momentum 0.9, wd 5e-4, grad clip 5, batch 512, shuffled, no augmentation) and
              update every image's δ by `steps`=20 signed-gradient *descent* steps of 0.8/255 on the
              surrogate's loss (eval mode), until the surrogate's error on the perturbed data is
              <= stop_error (0.01) or max_rounds (100; the original has no cap) is reached. δ
              starts at 0 (random_start: U(−ε, ε)). Input-space steps see the model's own
              normalisation; the sign of the gradient is the same as on raw pixels.
  error-min-CW
              The class-wise variant: one δ per class, 1 step per update, optimised on a seeded
              class-balanced 20% of the data (`fraction`), shuffled; after each batch a class's δ
              becomes the mean of that batch's per-sample updates (clamped). stop_error 0.01 as the
              original's scripts (its README says 0.1: pass stop_error=0.1).
  error-max   Targeted adversarial poisoning (Fowl et al.), L∞ 8/255: a surrogate trained on clean data
              (`epochs`=40, SGD+Nesterov lr 0.1, batch 128, wd 5e-4, x0.1 at 3/8, 5/8, 7/8, crop+flip),
              then PGD toward the labels y+1 mod C: `steps`=250 passes over the data in index order,
              step 0.05·ε, signed gradient, random crop+flip of the poison batch (differentiable),
              init N(0, ε²) clipped, `restarts`=8 — the restart with the lowest final target loss
              is kept (as the original; per dataset, not per image).
  These three train a network (GPU-hours at the published settings), are never generated on
  demand, and have a CPU-scale recipe `RECIPES[key]["small"]` (make_poison.py --recipe small):
  a SmallCNN surrogate and far fewer steps. As in the original, the min-min surrogate keeps one
  SGD state throughout (one engine.fit call, one fit epoch per round, the data iterator carried
  across rounds); unlike it, perturbed images are clipped to [0,1] while the surrogate trains
  (the original adds δ unclipped there). `meta["report"]` (timed_generate) records the rounds,
  the surrogate's error per round and its loss on the clean vs the poisoned images.

Importers (`import_poison(fmt, path, x, y, num_classes)`): tap, ule, rem, ntga, ops, lsp; the
exact arithmetic of each is in its function's docstring.
"""
from __future__ import annotations

import difflib
import glob
import inspect
import itertools
import math
import os
import pickle
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from constants import UserError

LINF_8 = 8 / 255
CHUNK = 2048  # images per chunk in the float arithmetic, to bound memory on 50k-image sets


# --- Shared helpers ---------------------------------------------------------------------------

def _progress(it, desc: str, total: int | None = None):
    return tqdm(it, desc=desc, total=total, leave=False, disable=None)


@contextmanager
def _one_thread():
    """The AR raster loop issues thousands of tiny ops; on a busy 2-core box intra-op threading
    made it ~100× slower than one thread, so it runs single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{name} must be a uint8 tensor N×3×H×W, got {got}")


def _check_data(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    _check_images(x)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"y must be an int64 tensor of shape ({len(x)},), got {got}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive int, got {num_classes!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got range "
                        f"[{int(y.min())}, {int(y.max())}]; pass the right num_classes")


def apply_perturbation(x: torch.Tensor, delta: torch.Tensor, norm: str | None,
                       eps: float | None) -> torch.Tensor:
    """x uint8 N×3×H×W plus delta (floats on the [0,1] scale; 3×H×W, 1×3×H×W or N×3×H×W) → uint8.

    Projects delta onto the ε-ball (L∞: clamp; L2: rescale), clips x+δ to [0,1], rounds half up
    to whole pixel values, then repairs what rounding broke: L∞ — any pixel whose rounded change
    exceeds ε is truncated toward the clean pixel; L2 — in an image whose rounded change exceeds
    ε, pixels that were rounded away from the clean value are truncated toward it instead, those
    with the smallest rounding error first, until the norm fits. norm=None: clip + round only.
    """
    _check_images(x)
    if norm not in (None, "linf", "l2"):
        raise UserError(f"norm must be 'linf', 'l2' or None, got {norm!r}")
    if norm is not None and not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
        raise UserError(f"eps must be a positive number for norm {norm!r}, got {eps!r}")
    if tuple(delta.shape) not in (tuple(x.shape[1:]), (1, *x.shape[1:]), tuple(x.shape)):
        raise UserError(f"delta of shape {tuple(delta.shape)} does not fit images {tuple(x.shape)}")
    if not torch.isfinite(delta).all():
        raise UserError("delta contains NaN or inf")
    out = torch.empty_like(x)
    e = None if norm is None else eps * 255  # bound in pixel units
    for s in range(0, len(x), CHUNK):
        xc = x[s:s + CHUNK].double()
        d = (delta[s:s + CHUNK] if delta.dim() == 4 and len(delta) == len(x) else delta)
        d = d.double().mul(255).expand_as(xc)
        if norm == "linf":
            d = d.clamp(-e, e)
        elif norm == "l2":
            n = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = d * torch.where(n > e, e / n, torch.ones_like(n))
        t = torch.minimum(torch.maximum(d, -xc), 255 - xc)  # change after clipping; exact,
        # unlike (x+d).clamp()-x, so equal deltas on different images round alike
        q = torch.floor(t + 0.5)             # round half up, like PNG writers
        if norm == "linf":
            q = torch.where(q.abs() > e + 1e-9, torch.trunc(t), q)
        elif norm == "l2":
            q = _fix_l2(q, t, e)
        out[s:s + CHUNK] = (xc + q).round().to(torch.uint8)
    return out


def _fix_l2(q: torch.Tensor, t: torch.Tensor, e: float) -> torch.Tensor:
    """Greedy repair of L2 violations caused by rounding (see apply_perturbation)."""
    sq = q.flatten(1).pow(2).sum(1)
    bad = torch.nonzero(sq > e * e * (1 + 1e-12)).flatten()
    if len(bad) == 0:
        return q
    qb, tb = q[bad].flatten(1), t[bad].flatten(1)
    tr = torch.trunc(tb)
    away = qb.abs() > tb.abs()                       # rounded away from the clean pixel
    err = (tb - tr).abs()                            # fractional part; switching costs 2·err−1
    key = torch.where(away, err, torch.full_like(err, math.inf))
    order = key.argsort(dim=1, stable=True)  # equal images get equal repairs
    gain = torch.where(away, qb.pow(2) - tr.pow(2), torch.zeros_like(qb))
    cum = gain.gather(1, order).cumsum(1)
    excess = (sq[bad] - e * e * (1 + 1e-12)).unsqueeze(1)
    k = (cum < excess).sum(1, keepdim=True) + 1      # switch the first k sorted entries
    switch_sorted = torch.arange(qb.shape[1]).unsqueeze(0) < k
    switch = torch.zeros_like(away).scatter(1, order, switch_sorted) & away
    qb = torch.where(switch, tr, qb)
    q = q.clone()
    q[bad] = qb.view_as(q[bad])
    return q


def _apply_classwise(x, y, num_classes, delta_for_class, norm, eps, desc):
    """Poison class by class so memory stays at one class's floats; delta_for_class(c, idx)
    returns a 3×H×W (shared) or n_c×3×H×W (per-image) perturbation, or None to skip."""
    out = x.clone()
    for c in _progress(range(num_classes), desc):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            continue
        d = delta_for_class(c, idx)
        if d is not None:
            out[idx] = apply_perturbation(x[idx], d, norm, eps)
    return out


# --- Generators -------------------------------------------------------------------------------

def _lsp(x, y, num_classes, seed, eps, patch: int = 8, class_sep: float = 10.0):
    _, _, h, w = x.shape
    if patch < 1 or h % patch or w % patch:
        raise UserError(f"lsp patch={patch} must divide the image size {h}×{w}")
    gh, gw = h // patch, w // patch
    d = gh * gw * 3
    rng = np.random.default_rng(seed)
    if num_classes > 2 ** d:
        raise UserError(f"lsp: {num_classes} classes need more than {d} features; use a smaller patch")
    centroids = rng.choice([-1.0, 1.0], size=(num_classes, d))
    while len(np.unique(centroids, axis=0)) < num_classes:  # distinct vertices, like sklearn
        _, first = np.unique(centroids, axis=0, return_index=True)
        dup = np.setdiff1d(np.arange(num_classes), first)
        centroids[dup] = rng.choice([-1.0, 1.0], size=(len(dup), d))
    centroids *= class_sep

    def delta(c, idx):
        a = 2 * rng.random((d, d)) - 1
        z = rng.standard_normal((len(idx), d)) @ a + centroids[c]
        z = torch.from_numpy(z).view(len(idx), 3, gh, gw)
        z = z.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
        return z / z.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps

    return _apply_classwise(x, y, num_classes, delta, "l2", eps, "lsp")


COLOURS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)), dtype=torch.float64)  # 8×3


def ops_search(x, y, num_classes) -> list[tuple[int, int, int] | None]:
    """Per class (row, col, colour index) of the OPS pixel, or None for an empty class."""
    _, _, h, w = x.shape
    s1 = torch.zeros(num_classes, 3, h, w, dtype=torch.float64)  # Σ x per class
    s2 = torch.zeros_like(s1)                                    # Σ x² per class
    for s in range(0, len(x), CHUNK):
        xc = x[s:s + CHUNK].double() / 255
        s1.index_add_(0, y[s:s + CHUNK], xc)
        s2.index_add_(0, y[s:s + CHUNK], xc * xc)
    n = torch.bincount(y, minlength=num_classes).double().view(-1, 1, 1, 1)
    # |b − x| is x for colour bit b=0 and 1−x for b=1; pool the three channels.
    b = COLOURS.t().reshape(1, 3, 8, 1, 1)                       # channel × colour
    m1 = torch.where(b == 0, s1.unsqueeze(2), n.unsqueeze(2) - s1.unsqueeze(2)).sum(1)
    m2 = torch.where(b == 0, s2.unsqueeze(2),
                     n.unsqueeze(2) - 2 * s1.unsqueeze(2) + s2.unsqueeze(2)).sum(1)
    m = 3 * n.view(-1, 1, 1, 1)
    mean = m1 / m
    std = (m2 / m - mean ** 2).clamp_min(0).sqrt()
    score = (mean / std).nan_to_num(nan=-math.inf)               # K×8×H×W; 0/0 → never chosen
    score = score.permute(0, 2, 3, 1).reshape(num_classes, h * w * 8)  # (pixel, colour) order
    taken = torch.zeros(h * w * 8, dtype=torch.bool)
    picks = []
    for c in range(num_classes):
        if n[c] == 0:
            picks.append(None)
            continue
        sc = score[c].masked_fill(taken, -math.inf)
        best = int(torch.argmax(sc))
        taken[best] = True
        pix, col = divmod(best, 8)
        picks.append((pix // w, pix % w, col))
    return picks


def _ops(x, y, num_classes, seed, eps):
    picks = ops_search(x, y, num_classes)

    def delta(c, idx):
        r, q, col = picks[c]
        d = torch.zeros(len(idx), 3, *x.shape[2:], dtype=torch.float64)
        d[:, :, r, q] = COLOURS[col] - x[idx][:, :, r, q].double() / 255
        return d

    return _apply_classwise(x, y, num_classes, delta, None, None, "ops")


def _ar_fill(x: torch.Tensor, w: torch.Tensor, rows: int, cols: int, start: int = 2) -> None:
    """In place: raster-order AR update of x (S×S×N, the N independent signals innermost) over
    [2,rows)×[2,cols), skipping the already-filled square [2,start)²; w is 3×3×N with
    w[2,2]=0, so each pixel becomes the 3×3 window sum ending at it. Every pixel depends only
    on pixels above/left of it, so a filled top-left square is final and can be extended."""
    for i in range(2, rows):
        for j in range(start if i < start else 2, cols):
            x[i, j] = (x[i - 2:i + 1, j - 2:j + 1] * w).sum((0, 1))


def _ar_start(n: int, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """N(0,1) start signal, S×S×n. Only the first 2 rows/cols are ever read (everything else is
    overwritten before use), so only those are drawn."""
    x = torch.zeros(rows, cols, n)
    x[:2] = torch.randn(2, cols, n, generator=g)
    x[2:, :2] = torch.randn(rows - 2, 2, n, generator=g)
    return x


def _to_images(x: torch.Tensor, crop: int) -> torch.Tensor:
    """S×S×(B·3) → B×3×(S−crop)×(S−crop)."""
    s1, s2, n = x.shape
    return x[crop:, crop:].permute(2, 0, 1).reshape(n // 3, 3, s1 - crop, s2 - crop)


def _crop_norm(x: torch.Tensor, rows: int, cols: int, crop: int) -> torch.Tensor:
    r = x[crop:rows, crop:cols]
    return r.reshape(r.shape[0], r.shape[1], -1, 3).pow(2).sum((0, 1, 3)).sqrt()


def find_ar_coefficients(num_classes: int, size: tuple[int, int] = (32, 32), seed: int = 0,
                         required_response: float = 10.0, norm_bound: float = 50.0,
                         trials: int = 3, crop: int = 4, max_candidates: int = 2_000_000,
                         batch: int = 4096) -> torch.Tensor:
    """num_classes×3×3×3 AR coefficients by the published rejection criterion.

    Candidate: per channel 8 N(0,1) coefficients and a 0 at the bottom-right, divided by their
    sum. Rejected if any of `trials` generated signals ((H+crop)×(W+crop) from N(0,1), crop
    removed) has L2 norm > norm_bound or is NaN/inf. Otherwise, with s the last signal scaled to
    L2 norm 1, it is kept only if min over earlier accepted processes k of
    Σ ReLU(conv2d(s, f_k)) ≥ required_response, where f_k is process k's coefficients with −1
    at the bottom-right (a 1-output, 3-input-channel 3×3 filter). Candidates are drawn and
    checked in batches; the norm test runs on growing top-left squares first, which is exact
    because the top-left part of a signal is final once filled.
    """
    rows, cols = size[0] + crop, size[1] + crop
    g = torch.Generator().manual_seed(seed)
    accepted: list[torch.Tensor] = []
    filters: list[torch.Tensor] = []
    stages = [s for s in (10, 16, 24) if s < min(rows, cols)] + [None]
    tried = 0
    bar = tqdm(total=num_classes, desc="AR coefficients", leave=False, disable=None)
    with torch.no_grad(), _one_thread():
        while len(accepted) < num_classes:
            if tried >= max_candidates:
                raise UserError(f"found only {len(accepted)}/{num_classes} AR processes in "
                                f"{tried} candidates; lower required_response (e.g. 3 as for "
                                f"CIFAR-100) or raise max_candidates")
            c = torch.randn(batch, 3, 3, 3, generator=g)
            c[:, :, 2, 2] = 0
            c /= c.sum((2, 3), keepdim=True)
            tried += batch
            idx = torch.arange(batch)
            for _ in range(trials):
                x = _ar_start(len(idx) * 3, rows, cols, g)
                prev = 2
                for st in stages:
                    r, q = (rows, cols) if st is None else (st, st)
                    _ar_fill(x, c[idx].permute(2, 3, 0, 1).reshape(3, 3, -1), r, q, prev)
                    prev = st or prev
                    n = _crop_norm(x, r, q, crop)
                    keep = torch.isfinite(n) & (n <= norm_bound)
                    idx = idx[keep]
                    x = x.reshape(rows, cols, -1, 3)[:, :, keep].reshape(rows, cols, -1)
                    if len(idx) == 0:
                        break
                if len(idx) == 0:
                    break
            if len(idx) == 0:
                continue
            sig = _to_images(x, crop)
            sig = sig / sig.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            for k, b in enumerate(idx.tolist()):
                if filters:
                    resp = F.relu(F.conv2d(sig[k:k + 1], torch.stack(filters))).sum((0, 2, 3))
                    if float(resp.min()) < required_response:
                        continue
                accepted.append(c[b].clone())
                f = c[b].clone()
                f[:, 2, 2] = -1
                filters.append(f)
                bar.update(1)
                if len(accepted) == num_classes:
                    break
    bar.close()
    return torch.stack(accepted)


def _check_coeffs(coeffs, num_classes):
    if (not isinstance(coeffs, torch.Tensor) or coeffs.shape != (num_classes, 3, 3, 3)
            or not torch.isfinite(coeffs).all()):
        got = tuple(coeffs.shape) if isinstance(coeffs, torch.Tensor) else type(coeffs).__name__
        raise UserError(f"coeffs must be a finite tensor of shape ({num_classes}, 3, 3, 3), got {got}")
    if coeffs[:, :, 2, 2].abs().max() > 0:
        raise UserError("coeffs must have 0 at the bottom-right [:, :, 2, 2] of every filter")


def _ar_common(x, y, num_classes, seed, eps, norm, coeffs=None, required_response: float = 10.0,
               norm_bound: float = 50.0, trials: int = 3, crop: int = 4,
               max_candidates: int = 2_000_000):
    _, _, h, w = x.shape
    # Independent streams for the coefficients and the samples, both from `seed`.
    s_coef, s_noise = (int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(2))
    if coeffs is None:
        coeffs = find_ar_coefficients(num_classes, (h, w), s_coef, required_response,
                                      norm_bound, trials, crop, max_candidates)
    _check_coeffs(coeffs, num_classes)
    coeffs = coeffs.float()
    g = torch.Generator().manual_seed(s_noise)
    rows, cols = h + crop, w + crop

    def sample(c, n):
        wc = coeffs[c].permute(1, 2, 0).unsqueeze(2).expand(3, 3, n, 3).reshape(3, 3, n * 3)
        xs = _ar_start(n * 3, rows, cols, g)
        _ar_fill(xs, wc, rows, cols)
        s = _to_images(xs, crop).double()
        size = s.flatten(1).norm(dim=1) if norm == "l2" else s.flatten(1).abs().amax(1)
        return s / size.view(-1, 1, 1, 1)

    def delta(c, idx):
        d = sample(c, len(idx))
        for _ in range(20):  # a fresh sample may still diverge: redraw those
            bad = torch.nonzero(~torch.isfinite(d.flatten(1)).all(1)).flatten()
            if len(bad) == 0:
                return d * eps
            d[bad] = sample(c, len(bad))
        raise UserError(f"AR process of class {c} keeps diverging; pass other coeffs or seed")

    with torch.no_grad(), _one_thread():
        return _apply_classwise(x, y, num_classes, delta, norm, eps, "ar")


def _ar(x, y, num_classes, seed, eps, **kw):
    return _ar_common(x, y, num_classes, seed, eps, "linf", **kw)


def _l2_ar(x, y, num_classes, seed, eps, **kw):
    return _ar_common(x, y, num_classes, seed, eps, "l2", **kw)


for _f in (_ar, _l2_ar):  # expose _ar_common's options to the kwarg check in generate()
    _f.__signature__ = inspect.signature(_ar_common).replace(parameters=[
        p for p in inspect.signature(_ar_common).parameters.values() if p.name != "norm"])


def _cwrandom(x, y, num_classes, seed, eps):
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(num_classes, 3, *x.shape[2:], generator=g, dtype=torch.float64) * 2 - 1) * eps
    return _apply_classwise(x, y, num_classes, lambda c, idx: noise[c], "linf", eps, "cwrandom")


def _regions(x, y, num_classes, seed, eps, regions, norm):
    _, _, h, w = x.shape
    k = math.isqrt(regions)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_classes, 3, k, k), generator=g).double() * 2 - 1
    ri = torch.arange(h) * k // h   # region index of each row / column
    ci = torch.arange(w) * k // w
    pattern = signs[:, :, ri][:, :, :, ci]                      # K×3×H×W of ±1
    mag = eps if norm == "linf" else eps / math.sqrt(3 * h * w)
    return _apply_classwise(x, y, num_classes, lambda c, idx: pattern[c] * mag, norm, eps,
                            f"regions-{regions}")


def _patches(x, y, num_classes, seed, eps, size):
    _, _, h, w = x.shape
    if size > min(h, w):
        raise UserError(f"patch size {size} does not fit images of {h}×{w}")
    g = torch.Generator().manual_seed(seed)
    delta = torch.zeros(num_classes, 3, h, w, dtype=torch.float64)
    for c in range(num_classes):
        signs = torch.randint(0, 2, (3, size, size), generator=g).double() * 2 - 1
        r = int(torch.randint(0, h - size + 1, (1,), generator=g))
        q = int(torch.randint(0, w - size + 1, (1,), generator=g))
        delta[c, :, r:r + size, q:q + size] = signs * eps
    return _apply_classwise(x, y, num_classes, lambda c, idx: delta[c], "linf", eps,
                            f"patches-{size}")


@dataclass(frozen=True)
class PoisonSpec:
    fn: Callable
    norm: str | None      # "linf", "l2" or None (unbounded)
    eps: float | Callable[[tuple], float] | None  # default ε, or a function of the image shape
    classwise: bool       # one perturbation shared by every image of a class


def _fixed(fn, **fixed):
    """fn with some options fixed by the registry key; takes no further options."""
    def run(x, y, num_classes, seed, eps):
        return fn(x, y, num_classes, seed, eps, **fixed)
    return run


def _lsp_default_eps(shape) -> float:
    c, h, w = shape[-3:]
    return math.sqrt(c * h * w) * 6 / 255


GENERATORS: dict[str, PoisonSpec] = {
    "lsp": PoisonSpec(_lsp, "l2", _lsp_default_eps, False),
    "ops": PoisonSpec(_ops, None, None, True),
    "ar": PoisonSpec(_ar, "linf", LINF_8, False),
    "l2-ar": PoisonSpec(_l2_ar, "l2", 1.0, False),
    "cwrandom": PoisonSpec(_cwrandom, "linf", LINF_8, True),
    "regions-4": PoisonSpec(_fixed(_regions, regions=4, norm="linf"), "linf", LINF_8, True),
    "regions-16": PoisonSpec(_fixed(_regions, regions=16, norm="linf"), "linf", LINF_8, True),
    "l2-regions-4": PoisonSpec(_fixed(_regions, regions=4, norm="l2"), "l2", 1.0, True),
    "patches-4": PoisonSpec(_fixed(_patches, size=4), "linf", LINF_8, True),
    "patches-8": PoisonSpec(_fixed(_patches, size=8), "linf", LINF_8, True),
}


def _unknown(kind: str, key: str, valid) -> UserError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {key!r}{hint}; valid: {', '.join(valid)}")


def resolve_bound(key: str, eps: float | None, image_shape) -> tuple[str | None, float | None]:
    """(norm, ε) a generator will use: the default ε when eps is None, validated otherwise."""
    if key not in GENERATORS:
        raise _unknown("poison", key, GENERATORS)
    spec = GENERATORS[key]
    if spec.norm is None:
        if eps is not None:
            raise UserError(f"{key} is unbounded and takes no eps; drop --eps")
        return None, None
    if eps is None:
        eps = spec.eps(image_shape) if callable(spec.eps) else spec.eps
    c, h, w = image_shape[-3:]
    limit = 1.0 if spec.norm == "linf" else math.sqrt(c * h * w)  # largest distance possible
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or not 0 < eps <= limit:
        raise UserError(f"eps for {key} ({spec.norm}, [0,1] pixel scale) must be in (0, {limit:.4g}], "
                        f"got {eps!r}; e.g. 8/255 ≈ 0.0314 for L∞ or 1.0 for L2")
    return spec.norm, float(eps)


def generate(key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0,
             eps: float | None = None, **kw) -> torch.Tensor:
    """Poisoned uint8 images for generator `key` (see the module docstring)."""
    if key not in GENERATORS:
        raise _unknown("poison", key, GENERATORS)
    _check_data(x, y, num_classes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative int, got {seed!r}")
    _, eps = resolve_bound(key, eps, x.shape)
    fn = GENERATORS[key].fn
    allowed = [p.name for p in inspect.signature(fn).parameters.values()
               if p.name not in ("x", "y", "num_classes", "seed", "eps")
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in kw:
        if name not in allowed:
            shown = [a for a in allowed if not a.startswith("_")]  # _report is internal
            raise UserError(f"{key} takes no option {name!r}; options: {', '.join(shown) or 'none'}")
    return fn(x, y, num_classes, seed, eps, **kw)


# --- Importers for the published formats --------------------------------------------------------

def _expect(what: str, expected, got) -> UserError:
    return UserError(f"{what}: expected {expected}, got {got}")


def _nhwc_shape(x):
    n, c, h, w = x.shape
    return (n, h, w, c)


def import_tap(root, x, y, num_classes=None):
    """TAP folder `root/data/{idx}.png`, idx = base-dataset index; labels are the base labels."""
    folder = Path(root) / "data"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; a TAP poison is root/data/{{idx}}.png")
    names = {p.name for p in folder.glob("*.png")}
    want = {f"{i}.png" for i in range(len(x))}
    if names != want:
        missing = sorted(want - names, key=lambda s: int(s[:-4]))[:3]
        raise _expect(f"PNG files in {folder} (missing e.g. {missing})",
                      f"{len(x)} named 0.png..{len(x) - 1}.png", f"{len(names)} PNG files")
    from PIL import Image
    out = torch.empty_like(x)
    for i in _progress(range(len(x)), "tap", len(x)):
        with Image.open(folder / f"{i}.png") as im:
            a = np.array(im.convert("RGB"))
        if a.shape != tuple(x.shape[2:]) + (3,):
            raise _expect(f"size of {folder / f'{i}.png'}", tuple(x.shape[2:]), a.shape[:2])
        out[i] = torch.from_numpy(a).permute(2, 0, 1)
    return out, y.clone()


def import_ule(root, x, y, num_classes, mode: str | None = None):
    """Unlearnable Examples `perturbation.pt`: float in [−ε, ε] on the [0,1] scale, N×3×H×W
    (sample-wise) or K×3×H×W (class-wise, applied by label). Result, in float32 like the
    original: clip(x + clamp(255·δ, −255, 255), 0, 255) truncated to uint8. The mode is taken
    from the first dimension unless `mode` ('samplewise'/'classwise') says otherwise (the
    original decides by 'classwise' appearing in the folder name)."""
    path = Path(root)
    path = path / "perturbation.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found; an unlearnable-examples poison is root/perturbation.pt")
    try:
        p = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"cannot read {path} as a tensor file (weights_only): {e}") from None
    n, _, h, w = x.shape
    if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dim() != 4 \
            or tuple(p.shape[1:]) != (3, h, w) or p.shape[0] not in (n, num_classes):
        got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
        raise _expect(f"perturbation in {path}", f"float ({n} or {num_classes})×3×{h}×{w}", got)
    if mode is None:
        mode = "samplewise" if p.shape[0] == n else "classwise"
    if mode not in ("samplewise", "classwise") or p.shape[0] != (n if mode == "samplewise" else num_classes):
        raise UserError(f"mode {mode!r} does not fit a perturbation of {p.shape[0]} entries")
    p = p.float().mul(255).clamp(-255, 255)
    out = torch.empty_like(x)
    for s in range(0, n, CHUNK):
        d = p[s:s + CHUNK] if mode == "samplewise" else p[y[s:s + CHUNK]]
        out[s:s + CHUNK] = (x[s:s + CHUNK].float() + d).clamp(0, 255).to(torch.uint8)  # truncates
    return out, y.clone()


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Only what a pickled numpy array needs: anything else would let the file run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        # protocol 5 pickles an array through _frombuffer; protocol 2 encodes bytes via _codecs
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to unpickle global {module}.{name}: a REM file must hold "
                        f"only a numpy array")


def import_rem(path, x, y, num_classes=None):
    """Robust error-minimising noise: a pickle of an int8 numpy array N×3×H×W in pixel units.
    Result: clip(x + noise, 0, 255) as uint8 (exact integer arithmetic)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; a REM poison is one .pkl file")
    with open(path, "rb") as f:
        try:
            a = _NumpyArrayUnpickler(f).load()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot unpickle {path}: {e}") from None
    if not isinstance(a, np.ndarray) or a.dtype != np.int8 or a.shape != tuple(x.shape):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise _expect(f"array in {path}", f"int8 {tuple(x.shape)}", got)
    noise = torch.from_numpy(a.astype(np.int16))
    return (x.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8), y.clone()


def _one_file(root: Path, pattern: str) -> Path:
    hits = sorted(glob.glob(str(root / pattern)))
    if len(hits) != 1:
        raise _expect(f"files matching {root / pattern}", "exactly 1", f"{len(hits)} {hits[:3]}")
    return Path(hits[0])


def _labels_from(a: np.ndarray, n: int, num_classes: int, where) -> torch.Tensor:
    if a.ndim == 2:
        a = a.argmax(1)  # one-hot
    if a.ndim != 1 or len(a) != n or not np.issubdtype(a.dtype, np.number):
        raise _expect(f"labels in {where}", f"{n} labels (ints or one-hot)", f"{a.dtype} {a.shape}")
    a = a.astype(np.int64)
    if n and (a.min() < 0 or a.max() >= num_classes):
        raise UserError(f"labels in {where} fall outside [0, {num_classes})")
    return torch.from_numpy(a)


def import_ntga(root, x, y, num_classes):
    """NTGA: `x_train*.npy` float [0,1] N×H×W×C and `y_train*.npy` one-hot. Images are
    (255·x).astype(uint8), i.e. truncated, like the original; labels are the file's own."""
    root = Path(root)
    xf, yf = _one_file(root, "x_train*.npy"), _one_file(root, "y_train*.npy")
    a = np.load(xf, mmap_mode="r", allow_pickle=False)
    if a.shape != _nhwc_shape(x) or not np.issubdtype(a.dtype, np.floating):
        raise _expect(f"array in {xf}", f"float {_nhwc_shape(x)}", f"{a.dtype} {a.shape}")
    out = torch.empty_like(x)
    for s in range(0, len(x), CHUNK):
        b = np.clip(np.asarray(a[s:s + CHUNK]) * 255, 0, 255).astype(np.uint8)
        out[s:s + CHUNK] = torch.from_numpy(b).permute(0, 3, 1, 2)
    labels = _labels_from(np.load(yf, allow_pickle=False), len(x), num_classes, yf)
    return out, labels


def import_ops(root, x, y, num_classes):
    """OPS `perturbation.npy`, float on the [0,1] scale: N×H×W×C sample-wise, K×H×W×C
    class-wise (by label) or H×W×C universal, chosen by shape. Result: uint8(clip(x/255 + δ,
    0, 1)·255) in the file's float precision (at least float32) — truncation, like the
    original's np.uint8; a clean pixel k stays k because float32 (k/255)·255 == k for all k."""
    path = Path(root)
    path = path / "perturbation.npy" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found; an OPS poison is root/perturbation.npy")
    p = np.load(path, allow_pickle=False)
    n, c, h, w = x.shape
    ok = np.issubdtype(p.dtype, np.floating) and (
        (p.ndim == 4 and p.shape[1:] == (h, w, c) and p.shape[0] in (n, num_classes))
        or p.shape == (h, w, c))
    if not ok:
        raise _expect(f"perturbation in {path}",
                      f"float ({n} or {num_classes})×{h}×{w}×{c} or {h}×{w}×{c}", f"{p.dtype} {p.shape}")
    lab = y.numpy()
    out = torch.empty_like(x)
    for s in range(0, n, CHUNK):
        data = x[s:s + CHUNK].permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
        d = p if p.ndim == 3 else (p[s:s + CHUNK] if p.shape[0] == n else p[lab[s:s + CHUNK]])
        img = np.uint8(np.clip(data + d, 0, 1) * 255)
        out[s:s + CHUNK] = torch.from_numpy(img).permute(0, 3, 1, 2)
    return out, y.clone()


def import_lsp(root, x, y, num_classes):
    """LSP `simple_data.npy` (M×H×W×C float) + `simple_label.npy`. For each class c the first
    n_c synthetic samples labelled c are added in order to the class-c images (in index order),
    in float64: uint8(clip((x/255 + δ)·255, 0, 255)), truncated like the original's astype."""
    root = Path(root)
    dpath, lpath = root / "simple_data.npy", root / "simple_label.npy"
    for p in (dpath, lpath):
        if not p.is_file():
            raise UserError(f"{p} not found; an LSP poison is root/simple_data.npy + simple_label.npy")
    data = np.load(dpath, mmap_mode="r", allow_pickle=False)
    n, c, h, w = x.shape
    if data.ndim != 4 or data.shape[1:] != (h, w, c) or not np.issubdtype(data.dtype, np.floating):
        raise _expect(f"array in {dpath}", f"float M×{h}×{w}×{c}", f"{data.dtype} {data.shape}")
    labels = _labels_from(np.load(lpath, allow_pickle=False), len(data), num_classes, lpath).numpy()
    out = torch.empty_like(x)
    for k in range(num_classes):
        idx = torch.nonzero(y == k).flatten()
        syn = np.nonzero(labels == k)[0][:len(idx)]
        if len(syn) < len(idx):
            raise _expect(f"synthetic samples of class {k} in {dpath}", f">= {len(idx)}", len(syn))
        if len(idx) == 0:
            continue
        base = x[idx].permute(0, 2, 3, 1).numpy().astype(np.float64) / 255
        img = np.clip((base + data[syn]) * 255, 0, 255).astype(np.uint8)
        out[idx] = torch.from_numpy(img).permute(0, 3, 1, 2)
    return out, y.clone()


IMPORTERS: dict[str, Callable] = {
    "tap": import_tap, "ule": import_ule, "rem": import_rem,
    "ntga": import_ntga, "ops": import_ops, "lsp": import_lsp,
}


def import_poison(fmt: str, path, x: torch.Tensor, y: torch.Tensor, num_classes: int, **kw):
    """(images uint8, labels int64) of a published poison on top of the clean base (x, y)."""
    if fmt not in IMPORTERS:
        raise _unknown("poison format", fmt, IMPORTERS)
    _check_data(x, y, num_classes)
    return IMPORTERS[fmt](path, x, y, num_classes, **kw)


# --- The repository's own on-disk format ---------------------------------------------------------

META_KEYS = ("key", "eps", "norm", "seed", "dataset", "generation_seconds")
FORMAT = "unlearnbench-poison/1"


def _plain(v) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(i) for i in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(i) for k, i in v.items())
    return False


def _check_meta(meta, where: str) -> None:
    if not isinstance(meta, dict):
        raise UserError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{where}: meta lacks {', '.join(missing)}; it needs {', '.join(META_KEYS)}")
    if not _plain(meta):
        raise UserError(f"{where}: meta may hold only str/int/float/bool/None, lists and dicts")


def _check_pair(images, labels, where: str) -> None:
    _check_images(images, f"{where}: images")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 \
            or labels.shape != (len(images),):
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise _expect(f"{where}: labels", f"int64 ({len(images)},)", got)


def save_poison(path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> Path:
    """Write {format, images, labels, meta} with torch.save, atomically (temp file + os.replace)."""
    path = Path(path)
    _check_pair(images, labels, str(path))
    _check_meta(meta, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "images": images.contiguous(), "labels": labels.contiguous(),
               "meta": meta}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_poison(path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images, labels, meta) from a file written by save_poison, loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; write it with `save_poison` (make_poison.py)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a poison file: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} file (keys: "
                        f"{sorted(d) if isinstance(d, dict) else type(d).__name__})")
    missing = [k for k in ("images", "labels", "meta") if k not in d]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; regenerate it")
    _check_pair(d["images"], d["labels"], str(path))
    _check_meta(d["meta"], str(path))
    return d["images"], d["labels"], d["meta"]


def timed_generate(key, x, y, num_classes, seed=0, eps=None, dataset: str = "", **kw):
    """generate() plus the meta dict save_poison wants. A generator that takes `dataset` (its
    normalisation) gets it; one that takes `_report` fills meta["report"] (surrogate losses...)."""
    norm, eps_used = resolve_bound(key, eps, x.shape)
    params = inspect.signature(GENERATORS[key].fn).parameters
    extra, report = {}, {}
    if "dataset" in params and "dataset" not in kw and dataset:
        extra["dataset"] = dataset
    if "_report" in params:
        extra["_report"] = report
    t = time.perf_counter()
    out = generate(key, x, y, num_classes, seed=seed, eps=eps, **kw, **extra)
    meta = {"key": key, "eps": eps_used, "norm": norm, "seed": seed, "dataset": dataset,
            "generation_seconds": round(time.perf_counter() - t, 3), "options": dict(kw)}
    if report:
        meta["report"] = report
    if not _plain(meta):  # e.g. AR coeffs passed as a tensor
        meta["options"] = {k: (v if _plain(v) else repr(v)) for k, v in kw.items()}
    return out, meta


# --- Picture -----------------------------------------------------------------------------------

def save_poison_grid(path_png, clean: torch.Tensor, poisoned: torch.Tensor, labels: torch.Tensor,
                     n_per_class: int = 1) -> Path:
    """PNG with rows clean / perturbation / poisoned, for the first n_per_class images of every
    class present. Each perturbation is scaled per image to [0,1] symmetrically (0 → mid-grey,
    ±max|δ| → 0/1) so that its sign stays readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure

    _check_images(clean, "clean")
    _check_images(poisoned, "poisoned")
    if clean.shape != poisoned.shape or labels.shape != (len(clean),):
        raise UserError(f"clean {tuple(clean.shape)}, poisoned {tuple(poisoned.shape)} and labels "
                        f"{tuple(labels.shape)} must describe the same images")
    if n_per_class < 1:
        raise UserError(f"n_per_class must be >= 1, got {n_per_class}")
    cols = [int(i) for c in torch.unique(labels) for i in torch.nonzero(labels == c).flatten()[:n_per_class]]
    fig = Figure(figsize=(max(len(cols), 1) * 1.0, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(cols), squeeze=False)
    for j, i in enumerate(cols):
        d = poisoned[i].float() - clean[i].float()
        d = d / (2 * d.abs().max()) + 0.5 if d.abs().max() > 0 else torch.full_like(d, 0.5)
        for r, img in enumerate((clean[i].float() / 255, d, poisoned[i].float() / 255)):
            ax = axes[r][j]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(str(int(labels[i])), fontsize=7)
    for r, name in enumerate(("clean", "perturbation", "poisoned")):
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --- Poisoned training sets by key (cache, generating when missing) -----------------------------

def poison_cache_path(key: str, dataset: str, n: int, seed: int = 0, eps: float | None = None) -> Path:
    """Where `poisoned_train_set` keeps the poison `key` of a training split of n images:
    CACHE_DIR/poisons/<dataset>-<n>_<key>_seed<seed>[_eps<eps>].pt (the save_poison format)."""
    from constants import cache_dir, canonical_dataset_name

    tag = f"{canonical_dataset_name(dataset)}-{n}_{key}_seed{seed}" + ("" if eps is None else f"_eps{eps:g}")
    return cache_dir() / "poisons" / f"{tag}.pt"


def poisoned_train_set(key: str, dataset: str = "cifar10", *, seed: int = 0, eps: float | None = None,
                       path=None, split=None, generate_missing: bool = True):
    """(images uint8 N×3×H×W, labels int64 N, meta) of poison `key` over the whole training split
    of `dataset` (index i = clean image i).

    `path` (a save_poison file) wins; otherwise the cache file `poison_cache_path(...)` is read,
    and when it is missing a key of GENERATORS is generated on the clean split and cached there
    (seconds to minutes on a CPU). Any other key (error-min, error-max, ...) must be imported
    first (`import_poison` + `save_poison`) and passed as `path` or put at the cache path.
    `split` is the clean training split when the caller has loaded it already. The key `clean`
    returns the clean split itself (a baseline)."""
    if split is None:
        from datasets import load_split

        split = load_split(dataset, True)
    if key == "clean" and path is None:
        return split.x, split.y, {"key": "clean", "eps": None, "norm": None, "seed": seed,
                                  "dataset": split.name, "generation_seconds": 0.0}
    where = Path(path) if path is not None else poison_cache_path(key, split.name, len(split), seed, eps)
    if where.is_file():
        images, labels, meta = load_poison(where)
        if images.shape != split.x.shape:
            raise UserError(f"{where} holds images {tuple(images.shape)} but the {split.name} training "
                            f"split is {tuple(split.x.shape)}; the poison belongs to other data")
        return images, labels, meta
    if path is not None:
        raise UserError(f"poison file {where} not found")
    if key in EXPENSIVE and generate_missing:
        raise UserError(f"poison {key!r} for {split.name} not found at {where}; it trains a surrogate, "
                        f"so it is never generated on demand: {make_poison_command(key, split.name)}")
    if key not in GENERATORS or not generate_missing:
        known = ", ".join(GENERATORS)
        raise UserError(f"poison {key!r} for {split.name} not found at {where}; keys generated on "
                        f"demand: {known}, clean; import any other one with import_poison + "
                        f"save_poison and pass its file")
    num_classes = max(len(split.classes), int(split.y.max()) + 1)
    tqdm.write(f"generating poison {key} on {split.name} ({len(split)} images) -> {where}")
    images, meta = timed_generate(key, split.x, split.y, num_classes, seed=seed, eps=eps,
                                  dataset=split.name)
    save_poison(where, images, split.y.clone(), meta)
    return images, split.y.clone(), meta


# --- Poisons that need a trained surrogate: error-min, error-min-CW, error-max -------------------
#
# These train a network, so they cost GPU-hours at the papers' settings (ResNet-18 on all of
# CIFAR-10) and are never generated on demand (`poisoned_train_set` asks for make_poison.py).
# `RECIPES[key]["small"]` is a documented CPU-scale recipe; see make_poison.py.

EXPENSIVE = ("error-min", "error-min-CW", "error-max")

RECIPES: dict[str, dict[str, dict]] = {
    # "paper" = the generator defaults (the published settings).
    "error-min": {"paper": {}, "small": dict(model="smallcnn", steps=5, max_rounds=6)},
    "error-min-CW": {"paper": {}, "small": dict(model="smallcnn", max_rounds=10, fraction=1.0)},
    "error-max": {"paper": {}, "small": dict(model="smallcnn", epochs=5, steps=10,
                                             step_size=2 / 255, restarts=1)},
}


class _Converged(Exception):
    """Raised from engine.fit's on_epoch_end to end a min-min search early."""


def _positive(name: str, value, kind=int, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < 0 or (value == 0 and not allow_zero):
        want = "a non-negative" if allow_zero else "a positive"
        raise UserError(f"{name} must be {want} {'integer' if kind is int else 'number'}, got {value!r}")


class _Surrogate:
    """A fresh model (training.build_model, seeded) plus BatchLoaders over the clean images.

    Inputs are normalised like the training data (the dataset's statistics when `dataset` is a
    known name, else measured on x) unless the model takes raw pixels."""

    def __init__(self, model: str, x, y, num_classes: int, seed: int, device, dataset):
        from datasets import BatchLoader, Split
        from models import canonical_model_name, expects_normalized
        from training import build_model

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = canonical_model_name(model)
        self.normalize = expects_normalized(self.name)
        self.split = Split(x, y, dataset or "", True)
        self._loader_cls = BatchLoader
        self.model = build_model(self.name, num_classes, self.device, seed)
        ref = BatchLoader(self.split, torch.arange(1), device=self.device, normalize=True)
        self.mean, self.inv_std = ref.mean, ref.inv_std

    def loader(self, indices=None, *, raw: bool = False, **kw):
        """raw=True: batches of [0,1] pixels (for the attacks, which normalise themselves)."""
        return self._loader_cls(self.split, indices, device=self.device,
                                normalize=self.normalize and not raw, **kw)

    def inputs(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) * self.inv_std if self.normalize else x01

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> dict:
        """Mean cross-entropy and accuracy (%) of the model on uint8 images, in eval mode."""
        import engine
        from datasets import BatchLoader, Split

        ld = BatchLoader(Split(images, labels, self.split.name, True), None, batch_size=batch_size,
                         device=self.device, normalize=self.normalize, mean=self.mean.flatten().tolist(),
                         std=(1 / self.inv_std).flatten().tolist())
        logits, lab = engine.predict(self.model, ld, amp=False)
        return {"loss": float(F.cross_entropy(logits, lab)),
                "acc": float((logits.argmax(1) == lab).float().mean() * 100)}


class _Cycle:
    """`steps` batches per engine.fit epoch, each epoch continuing where the previous one stopped
    (the original's persistent data iterator); the loader's epoch advances when it runs out."""

    def __init__(self, loader, steps: int):
        self.loader, self.steps, self._it, self._epoch = loader, steps, None, 0

    def __len__(self):
        return self.steps

    def set_epoch(self, epoch):  # the position is kept across fit epochs instead
        pass

    def __iter__(self):
        for _ in range(self.steps):
            batch = next(self._it, None) if self._it is not None else None
            if batch is None:
                self.loader.set_epoch(self._epoch)
                self._epoch += 1
                self._it = iter(self.loader)
                batch = next(self._it)
            yield batch


def _signed_descent(model, to_input, x01, target, delta, steps: int, step_size: float, eps: float,
                    augment=None, aug_gen=None):
    """`steps` signed-gradient descent steps on CE(model(clip(x + δ)), target), δ kept in the
    L∞ ε-ball: x' = clip(x + δ, 0, 1); δ ← clamp(x' − step·sign(∇) − x, −ε, ε) (the Unlearnable
    Examples min_min_attack). `augment` (differentiable) is applied to x' before the model."""
    for _ in range(steps):
        xa = (x01 + delta).clamp(0, 1).requires_grad_(True)
        inp = xa if augment is None else augment(xa, aug_gen)
        loss = F.cross_entropy(model(to_input(inp)), target)
        (g,) = torch.autograd.grad(loss, xa)
        delta = (xa.detach() - step_size * g.sign() - x01).clamp(-eps, eps)
    return delta


def _min_min(x, y, num_classes, seed, eps, *, classwise: bool, model, train_step, steps, step_size,
             stop_error, max_rounds, batch_size, lr, momentum, weight_decay, grad_clip, random_start,
             fraction, device, dataset, report):
    import engine
    from datasets import balanced_subset

    for name, v in (("train_step", train_step), ("steps", steps), ("max_rounds", max_rounds),
                    ("batch_size", batch_size)):
        _positive(name, v)
    for name, v in (("step_size", step_size), ("lr", lr)):
        _positive(name, v, float)
    for name, v in (("momentum", momentum), ("weight_decay", weight_decay)):
        _positive(name, v, float, allow_zero=True)
    if grad_clip is not None:
        _positive("grad_clip", grad_clip, float)
    if not (isinstance(stop_error, (int, float)) and 0 <= stop_error < 1):
        raise UserError(f"stop_error is a train error fraction in [0, 1), got {stop_error!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise UserError(f"fraction must be in (0, 1], got {fraction!r}")
    key = "error-min-CW" if classwise else "error-min"
    s = _Surrogate(model, x, y, num_classes, seed, device, dataset)
    n, dev = len(x), s.device
    shape = (num_classes, *x.shape[1:]) if classwise else tuple(x.shape)
    g = torch.Generator().manual_seed(seed)
    noise = ((torch.rand(shape, generator=g) * 2 - 1) * eps if random_start
             else torch.zeros(shape)).to(dev)
    y_dev = y.to(dev)
    if classwise:  # the original optimises on a seeded 20% subset (--use_subset), shuffled
        pool = balanced_subset(y, max(1, round(fraction * n)), seed) if fraction < 1 else None
        size = n if pool is None else len(pool)

        def add(x01, idx):
            return (x01 + noise[y_dev[idx]]).clamp(0, 1)
        train = s.loader(pool, batch_size=batch_size, shuffle=True, seed=seed, transform=add,
                         drop_last=size >= batch_size)
        update = s.loader(pool, raw=True, batch_size=batch_size, shuffle=True, seed=seed + 1)
        check = s.loader(pool, batch_size=max(batch_size, 1024), transform=add)
    else:  # sample-wise: the whole set. The original trains in dataset order, but torchvision's
        # CIFAR order is already mixed while an ImageFolder split is sorted by class: shuffle.
        def add(x01, idx):
            return (x01 + noise[idx]).clamp(0, 1)
        train = s.loader(None, batch_size=batch_size, shuffle=True, seed=seed, transform=add)
        update = s.loader(None, raw=True, batch_size=batch_size)
        check = s.loader(None, batch_size=max(batch_size, 1024), transform=add)
    errors: list[float] = []

    def search(m, rnd):  # engine.fit's evaluate hook: runs after every train_step batches
        m.eval()
        update.set_epoch(rnd)
        for b in _progress(update, f"{key} round {rnd}: noise", len(update)):
            if classwise:
                d = _signed_descent(m, s.inputs, b.x, b.y, noise[b.y], steps, step_size, eps)
                for c in torch.unique(b.y):  # class noise = mean of the per-sample updates
                    noise[c] = d[b.y == c].mean(0).clamp(-eps, eps)
            else:
                noise[b.idx] = _signed_descent(m, s.inputs, b.x, b.y, noise[b.idx], steps,
                                               step_size, eps)
        errors.append(1 - engine.accuracy_on(m, check, amp=False) / 100)
        return {"perturbed_train_error": errors[-1]}

    def stop(rnd, record):
        if record["perturbed_train_error"] <= stop_error:
            raise _Converged

    cfg = engine.TrainConfig(steps=train_step * max_rounds, schedule="constant", lr=lr,
                             momentum=momentum, weight_decay=weight_decay, grad_clip=grad_clip,
                             amp=False, channels_last=False, log_every=10 ** 9)
    try:
        engine.fit(s.model, _Cycle(train, train_step), cfg, evaluate=search, on_epoch_end=stop,
                   desc=f"{key} surrogate")
    except _Converged:
        pass
    s.model.eval()
    if not errors or errors[-1] > stop_error:
        tqdm.write(f"{key}: stopped after max_rounds={max_rounds} with the surrogate's error on the "
                   f"perturbed data at {errors[-1] if errors else float('nan'):.4f} > "
                   f"stop_error={stop_error}; raise max_rounds for the full search")
    noise = noise.cpu()
    if classwise:
        out = _apply_classwise(x, y, num_classes, lambda c, idx: noise[c].double(), "linf", eps, key)
    else:
        out = apply_perturbation(x, noise, "linf", eps)
    if report is not None:
        clean, pois = s.evaluate(x, y), s.evaluate(out, y)
        report.update(rounds=len(errors), errors=[round(e, 5) for e in errors],
                      converged=bool(errors) and errors[-1] <= stop_error,
                      surrogate_clean_loss=clean["loss"], surrogate_poisoned_loss=pois["loss"],
                      surrogate_clean_acc=clean["acc"], surrogate_poisoned_acc=pois["acc"])
    return out


def _error_min(x, y, num_classes, seed, eps, model: str = "resnet18", train_step: int = 10,
               steps: int = 20, step_size: float = 0.8 / 255, stop_error: float = 0.01,
               max_rounds: int = 100, batch_size: int = 512, lr: float = 0.1,
               momentum: float = 0.9, weight_decay: float = 5e-4, grad_clip: float | None = 5.0,
               random_start: bool = False, device: str | None = None, dataset: str | None = None,
               _report: dict | None = None):
    return _min_min(x, y, num_classes, seed, eps, classwise=False, model=model,
                    train_step=train_step, steps=steps, step_size=step_size, stop_error=stop_error,
                    max_rounds=max_rounds, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, grad_clip=grad_clip, random_start=random_start,
                    fraction=1.0, device=device, dataset=dataset, report=_report)


def _error_min_cw(x, y, num_classes, seed, eps, model: str = "resnet18", train_step: int = 10,
                  steps: int = 1, step_size: float = 0.8 / 255, stop_error: float = 0.01,
                  max_rounds: int = 100, fraction: float = 0.2, batch_size: int = 512,
                  lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                  grad_clip: float | None = 5.0, random_start: bool = False,
                  device: str | None = None, dataset: str | None = None,
                  _report: dict | None = None):
    return _min_min(x, y, num_classes, seed, eps, classwise=True, model=model,
                    train_step=train_step, steps=steps, step_size=step_size, stop_error=stop_error,
                    max_rounds=max_rounds, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, grad_clip=grad_clip, random_start=random_start,
                    fraction=fraction, device=device, dataset=dataset, report=_report)


def _error_max(x, y, num_classes, seed, eps, model: str = "resnet18", epochs: int = 40,
               lr: float = 0.1, batch_size: int = 128, steps: int = 250,
               step_size: float | None = None, restarts: int = 8, attack_batch_size: int = 512,
               augment: bool = True, device: str | None = None, dataset: str | None = None,
               _report: dict | None = None):
    import engine
    from datasets import Augment

    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("steps", steps),
                    ("restarts", restarts), ("attack_batch_size", attack_batch_size)):
        _positive(name, v)
    _positive("lr", lr, float)
    step_size = 0.05 * eps if step_size is None else step_size
    _positive("step_size", step_size, float)
    s = _Surrogate(model, x, y, num_classes, seed, device, dataset)
    # 1. The crafting model, trained on clean data ("conservative": SGD + Nesterov, wd 5e-4,
    #    x0.1 at 3/8, 5/8, 7/8 of training, crop + flip).
    train = s.loader(None, batch_size=batch_size, shuffle=True, seed=seed, augment=Augment())
    cfg = engine.TrainConfig(epochs=epochs, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                             schedule="multistep", gamma=0.1,
                             milestones=tuple(int(epochs / f) for f in (2.667, 1.6, 1.142)))
    engine.fit(s.model, train, cfg, desc="error-max surrogate")
    s.model.eval()
    # 2. Class-targeted PGD toward y+1 mod C, every image once per iteration, in index order.
    attack = s.loader(None, raw=True, batch_size=attack_batch_size)
    target = ((y + 1) % num_classes).to(s.device)
    aug = Augment() if augment else None
    best, best_loss, losses = None, math.inf, []
    for r in range(restarts):
        g_seed = int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
        g = torch.Generator().manual_seed(g_seed)
        aug_gen = torch.Generator().manual_seed(g_seed + 1)
        delta = (torch.randn(x.shape, generator=g) * eps).clamp(-eps, eps).to(s.device)
        for _ in _progress(range(steps), f"error-max restart {r + 1}/{restarts}", steps):
            total = 0.0
            for b in attack:
                d = delta[b.idx].requires_grad_(True)
                xa = b.x + d
                if aug is not None:
                    xa = aug(xa, aug_gen)
                loss = F.cross_entropy(s.model(s.inputs(xa)), target[b.idx])
                (grad,) = torch.autograd.grad(loss, d)
                total += float(loss.detach()) * len(b.idx)
                d = (d.detach() - step_size * grad.sign()).clamp(-eps, eps)
                delta[b.idx] = torch.maximum(torch.minimum(d, 1 - b.x), -b.x)
        losses.append(total / len(x))  # target loss of the last iteration, as the original
        if losses[-1] < best_loss:
            best, best_loss = delta, losses[-1]
    out = apply_perturbation(x, best.cpu(), "linf", eps)
    if _report is not None:
        clean, pois = s.evaluate(x, y), s.evaluate(out, y)
        tgt = s.evaluate(out, (y + 1) % num_classes)
        _report.update(target_losses=[round(v, 5) for v in losses], best_restart=losses.index(best_loss),
                       surrogate_clean_loss=clean["loss"], surrogate_poisoned_loss=pois["loss"],
                       surrogate_clean_acc=clean["acc"], surrogate_poisoned_acc=pois["acc"],
                       surrogate_target_acc=tgt["acc"])
    return out


GENERATORS.update({
    "error-min": PoisonSpec(_error_min, "linf", LINF_8, False),
    "error-min-CW": PoisonSpec(_error_min_cw, "linf", LINF_8, True),
    "error-max": PoisonSpec(_error_max, "linf", LINF_8, False),
})


def recipe_options(key: str, recipe: str | None) -> dict:
    """The generator options of a named recipe ('paper' = defaults, 'small' = CPU-scale)."""
    if recipe is None:
        return {}
    if key not in RECIPES:
        raise UserError(f"recipes apply to {', '.join(RECIPES)}; {key!r} has none (drop --recipe)")
    if recipe not in RECIPES[key]:
        raise _unknown(f"recipe of {key}", recipe, RECIPES[key])
    return dict(RECIPES[key][recipe])


def make_poison_command(key: str, dataset: str = "cifar10") -> str:
    """The command that generates an expensive poison (for error messages)."""
    ds = "" if dataset == "cifar10" else f" --dataset {dataset}"
    return (f"python make_poison.py {key}{ds}  (GPU-hours; on a CPU: python make_poison.py {key}{ds} "
            f"--recipe small --subset 5000, then pass the file it prints as --poison-file)")


def poison_file_path(key: str, dataset: str, n: int, seed: int = 0, eps: float | None = None, *,
                     subset: int | None = None, split_seed: int = 0, recipe: str | None = None,
                     options: dict | None = None) -> Path:
    """make_poison.py's default output. Without subset/recipe/options it is
    `poison_cache_path(...)`, where `poisoned_train_set` (train.py --poison KEY, the DFR scripts)
    finds the key; a variant gets suffixes: _sub<N>[s<split_seed>] (generated on a class-balanced
    subset), _<recipe> (not 'paper'), _opt<hash of the explicit options>."""
    base = poison_cache_path(key, dataset, n, seed, eps)
    parts = []
    if subset:
        parts.append(f"sub{subset}" + (f"s{split_seed}" if split_seed else ""))
    if recipe and recipe != "paper":
        parts.append(recipe)
    if options:
        import hashlib
        import json

        blob = json.dumps(options, sort_keys=True, default=repr).encode()
        parts.append("opt" + hashlib.sha1(blob).hexdigest()[:6])
    return base.with_name("_".join([base.stem, *parts]) + ".pt")


# --- A poisoned training set as a view of the clean one --------------------------------

def poison_view(key: str, data, *, seed: int = 0, path=None):
    """(TrainingView putting poison `key` (or the file `path`) in place of the images being
    trained on, data.retain_idx, or None for the clean baseline; the poison's meta). The one
    way every script builds a poisoned training set."""
    from views import TrainingView

    images, labels, meta = poisoned_train_set(key, data.spec.dataset, seed=seed, path=path,
                                              split=data.train)
    if key == "clean" and path is None:
        return None, meta
    idx = data.retain_idx
    own_labels = None if torch.equal(labels, data.train.y) else labels  # NTGA brings its own
    return TrainingView(replace_idx=idx, replace_images=images[idx], labels=own_labels), meta

"""The cheap availability poisons: seconds to minutes on a CPU for all of CIFAR-10, no network.

Each generator is `fn(x, y, num_classes, seed, eps, **options) -> uint8 images`; call them through
`poisons.generate(key, ...)`, which validates the data, the key's bound and the options. Every
generator draws only from local generators seeded by `seed`, and puts its δ on the images with
`poison_pixels.apply_perturbation`, so its bound holds after quantisation.

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
"""
from __future__ import annotations

import inspect
import itertools
import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from constants import UserError
from poison_pixels import CHUNK, apply_classwise


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


def lsp_default_eps(shape) -> float:
    """lsp's L2 budget √(CHW)·6/255 for images of `shape` (…×C×H×W): ≈1.304 for 32×32 RGB."""
    c, h, w = shape[-3:]
    return math.sqrt(c * h * w) * 6 / 255


def lsp(x, y, num_classes, seed, eps, patch: int = 8, class_sep: float = 10.0):
    """Linearly separable synthetic noise, one Gaussian cluster per class (module docstring)."""
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

    return apply_classwise(x, y, num_classes, delta, "l2", eps, "lsp")


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


def ops(x, y, num_classes, seed, eps):
    """One-pixel shortcut: every image of a class gets its class's `ops_search` pixel."""
    picks = ops_search(x, y, num_classes)

    def delta(c, idx):
        r, q, col = picks[c]
        d = torch.zeros(len(idx), 3, *x.shape[2:], dtype=torch.float64)
        d[:, :, r, q] = COLOURS[col] - x[idx][:, :, r, q].double() / 255
        return d

    return apply_classwise(x, y, num_classes, delta, None, None, "ops")


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
        return apply_classwise(x, y, num_classes, delta, norm, eps, "ar")


def ar(x, y, num_classes, seed, eps, **kw):
    """Autoregressive perturbations scaled to L∞ = ε."""
    return _ar_common(x, y, num_classes, seed, eps, "linf", **kw)


def l2_ar(x, y, num_classes, seed, eps, **kw):
    """Autoregressive perturbations scaled to L2 = ε."""
    return _ar_common(x, y, num_classes, seed, eps, "l2", **kw)


for _f in (ar, l2_ar):  # expose _ar_common's options to the kwarg check in generate()
    _f.__signature__ = inspect.signature(_ar_common).replace(parameters=[
        p for p in inspect.signature(_ar_common).parameters.values() if p.name != "norm"])


def cwrandom(x, y, num_classes, seed, eps):
    """One uniform δ ~ U(−ε, ε) per class."""
    g = torch.Generator().manual_seed(seed)
    noise = (torch.rand(num_classes, 3, *x.shape[2:], generator=g, dtype=torch.float64) * 2 - 1) * eps
    return apply_classwise(x, y, num_classes, lambda c, idx: noise[c], "linf", eps, "cwrandom")


def sign_regions(x, y, num_classes, seed, eps, regions, norm):
    """Per class one random sign per (region, channel) of a √regions × √regions grid."""
    _, _, h, w = x.shape
    k = math.isqrt(regions)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (num_classes, 3, k, k), generator=g).double() * 2 - 1
    ri = torch.arange(h) * k // h   # region index of each row / column
    ci = torch.arange(w) * k // w
    pattern = signs[:, :, ri][:, :, :, ci]                      # K×3×H×W of ±1
    mag = eps if norm == "linf" else eps / math.sqrt(3 * h * w)
    return apply_classwise(x, y, num_classes, lambda c, idx: pattern[c] * mag, norm, eps,
                           f"regions-{regions}")


def sign_patches(x, y, num_classes, seed, eps, size):
    """Per class one size×size×3 patch of random signs × ε at a random position."""
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
    return apply_classwise(x, y, num_classes, lambda c, idx: delta[c], "linf", eps,
                           f"patches-{size}")


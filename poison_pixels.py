"""Pixel arithmetic every poison module shares.

Images are uint8 N×3×H×W (RGB); a perturbation δ is a float tensor on the [0,1] pixel scale.
`apply_perturbation` is the one place where δ becomes images: it projects δ onto its ε-ball and
rounds to whole pixel values so that the bound still holds *after* quantisation. Generators
(poison_generators.py, poison_surrogate.py) build δ; this module puts it on the images.
"""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from constants import UserError

CHUNK = 2048  # images per chunk in the float arithmetic, to bound memory on 50k-image sets


def progress(it, desc: str, total: int | None = None):
    return tqdm(it, desc=desc, total=total, leave=False, disable=None)


def check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserError(f"{name} must be a uint8 tensor N×3×H×W, got {got}")


def apply_perturbation(x: torch.Tensor, delta: torch.Tensor, norm: str | None,
                       eps: float | None) -> torch.Tensor:
    """x uint8 N×3×H×W plus delta (floats on the [0,1] scale; 3×H×W, 1×3×H×W or N×3×H×W) → uint8.

    Projects delta onto the ε-ball (L∞: clamp; L2: rescale), clips x+δ to [0,1], rounds half up
    to whole pixel values, then repairs what rounding broke: L∞ — any pixel whose rounded change
    exceeds ε is truncated toward the clean pixel; L2 — in an image whose rounded change exceeds
    ε, pixels that were rounded away from the clean value are truncated toward it instead, those
    with the smallest rounding error first, until the norm fits. norm=None: clip + round only.
    """
    check_images(x)
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


def apply_classwise(x, y, num_classes, delta_for_class, norm, eps, desc):
    """Poison class by class so memory stays at one class's floats; delta_for_class(c, idx)
    returns a 3×H×W (shared) or n_c×3×H×W (per-image) perturbation, or None to skip."""
    out = x.clone()
    for c in progress(range(num_classes), desc):
        idx = torch.nonzero(y == c).flatten()
        if len(idx) == 0:
            continue
        d = delta_for_class(c, idx)
        if d is not None:
            out[idx] = apply_perturbation(x[idx], d, norm, eps)
    return out


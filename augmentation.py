"""CutMix and strong augmentation: the training recipe of orthogonal projection step 2 (the
official learn-from-unlearnable script's CutMix and "strong augmentation"), for any
engine.fit run. Both run on whole batches on the device; the plain crop + flip is
datasets.Augment."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from constants import UserError
from datasets import Augment


def rand_bbox(h: int, w: int, lam: float):
    """CutMix box (Yun et al.): sides √(1−λ)·(H, W), centre uniform (global torch RNG),
    clipped to the image; (row from, row to, column from, column to)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,)))
    cx = int(torch.randint(w, (1,)))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


class CutMixLoss:
    """engine.fit loss_fn: with probability `prob` (and beta > 0), paste a box of a shuffled copy
    of the batch into it (λ ~ Beta(β, β), then λ set to the exact kept area) and mix the two
    cross-entropies; otherwise plain cross-entropy. Accuracy is reported against the original
    labels, as the official script. Draws from the global torch RNG (CPU), which engine.fit
    saves with its resume state, so a resumed run replays the same boxes."""

    def __init__(self, beta: float = 1.0, prob: float = 0.5):
        if beta < 0 or not 0 <= prob <= 1:
            raise UserError(f"CutMix needs beta >= 0 and prob in [0, 1], got {beta}, {prob}")
        self.beta, self.prob = beta, prob
        self._beta = torch.distributions.Beta(torch.tensor(float(max(beta, 1e-8))),
                                              torch.tensor(float(max(beta, 1e-8))))

    def __call__(self, model, batch):
        x, y = batch.x, batch.y
        if self.beta > 0 and float(torch.rand(())) < self.prob:
            lam = float(self._beta.sample())
            perm = torch.randperm(len(x)).to(x.device)
            h, w = x.shape[-2:]
            r1, r2, c1, c2 = rand_bbox(h, w, lam)
            x = x.clone()
            x[:, :, r1:r2, c1:c2] = x[perm, :, r1:r2, c1:c2]
            lam = 1.0 - (r2 - r1) * (c2 - c1) / (h * w)
            logits = model(x)
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
            return loss, logits, y
        logits = model(x)
        return F.cross_entropy(logits, y), logits, y


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """n draws from U(lo, hi) in float64 (on the CPU generator)."""
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


@dataclass
class StrongAugment:
    """The official "strong augmentation", as whole-batch tensor ops (same call signature as
    datasets.Augment): RandomRotation(±degrees), RandomAffine(shear ±shear° along x, scale),
    ColorJitter(brightness, contrast, saturation), then crop (zero padding) + horizontal flip.
    Rotation and shear/scale are composed into one affine warp sampled once with nearest
    neighbour and zero fill (torchvision samples twice); the three jitters run in a random order
    per batch (torchvision: per image). Each jitter clamps to [0,1] like torchvision's, which is
    where projected (out-of-range) pixels get clipped, as in the original."""

    degrees: float = 10.0
    shear: float = 10.0
    scale: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    crop: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        # the draws in this order (warp, jitter, crop + flip) make a seed's batches
        x = self._warp(x, gen)
        x = self._jitter(x, gen)
        return Augment(self.crop, self.flip)(x, gen)

    def _warp(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Rotation, then shear along x and scale: one affine warp, nearest neighbour, zero fill."""
        b = len(x)
        ang = torch.deg2rad(_uniform(b, -self.degrees, self.degrees, gen))
        sh = torch.deg2rad(_uniform(b, -self.shear, self.shear, gen))
        sc = _uniform(b, *self.scale, gen)
        rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], 1),
                           torch.stack([ang.sin(), ang.cos()], 1)], 1)
        shear = torch.zeros(b, 2, 2, dtype=torch.float64)
        shear[:, 0, 0], shear[:, 0, 1], shear[:, 1, 1] = 1.0, sh.tan(), 1.0
        forward = sc.view(-1, 1, 1) * shear @ rot  # rotate first, then shear and scale
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, :, :2] = torch.linalg.inv(forward)  # grid_sample maps output -> input
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast and saturation, one factor per image, in a random order."""
        b = len(x)
        factors = {"b": _uniform(b, 1 - self.brightness, 1 + self.brightness, gen),
                   "c": _uniform(b, 1 - self.contrast, 1 + self.contrast, gen),
                   "s": _uniform(b, 1 - self.saturation, 1 + self.saturation, gen)}
        for i in torch.randperm(3, generator=gen).tolist():
            name = "bcs"[i]
            f = factors[name].to(x.device, x.dtype).view(-1, 1, 1, 1)
            if name == "b":
                x = (x * f).clamp(0, 1)
            elif name == "c":
                m = _gray(x).mean((1, 2, 3), keepdim=True)
                x = (f * x + (1 - f) * m).clamp(0, 1)
            else:
                x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        return x

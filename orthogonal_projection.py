"""The orthogonal projection algorithm (Algorithm 1 of "What Can We Learn from Unlearnable
Datasets?", Sandoval-Segura et al., NeurIPS 2023, §4.4). Lines 1-4, `fit_class_weights`: a
bias-free linear model fit to the poisoned images; its class weight vectors recover the
class-wise perturbations. Lines 5-6: Q, an orthonormal basis of the L2-normalised class
weights (`class_basis`), and every training image projected onto its orthogonal complement,
X_r = X - X Q Q^T (`project_out`; `OrthogonalProjection` does it as a BatchLoader
`transform`), which removes the poison's linear shortcut before a network trains on it.

Against the official code: the step-1 weights are checked for shape and finiteness before
use, and any number of classes and image size works."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from constants import UserError
from numerics import flush_denormal_grad


def milestones_at(epochs: int, fractions=(0.5, 0.75)) -> tuple[int, ...]:
    """int(E·f) for each fraction, as the official scripts (20 → 10, 15; 50 → 25, 37)."""
    return tuple(int(epochs * f) for f in fractions)


class BiasFreeLinear(nn.Module):
    """Linear(C·H·W → K, bias=False) on flattened raw pixels; state_dict key `fc.weight` as in
    the official logistic-regression checkpoints."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def fit_class_weights(loader, num_classes: int, epochs: int = 20, lr: float = 0.1, seed: int = 0,
                      device="cpu", desc: str = "linear model") -> tuple[BiasFreeLinear, list[dict]]:
    """Algorithm 1, lines 1–4: a bias-free linear model on the poisoned images as the loader gives
    them (the scripts pass unnormalised [0,1] pixels, no augmentation, no shuffling): plain SGD
    (no momentum, no weight decay), cross-entropy, LR ×0.1 at 50 % and 75 % of the epochs."""
    x0 = loader.images(loader.indices[:1].to(loader.device))
    torch.manual_seed(seed)
    model = BiasFreeLinear(x0[0].numel(), num_classes).to(device)
    cfg = engine.TrainConfig(epochs=epochs, lr=lr, momentum=0.0, weight_decay=0.0,
                             schedule="multistep", milestones=milestones_at(epochs), amp=False,
                             channels_last=False, log_every=10)
    history = engine.fit(model, loader, cfg, loss_fn=_cross_entropy_ftz, desc=desc)
    return model, history


def _cross_entropy_ftz(model: nn.Module, batch):
    """engine.fit's cross-entropy with the logits' gradient flushed of denormals: the linear
    model fits the poison almost perfectly, and denormal gradients made its epochs ~2.5x slower."""
    logits = flush_denormal_grad(model(batch.x))
    return F.cross_entropy(logits, batch.y), logits, batch.y


def class_basis(weight: torch.Tensor) -> torch.Tensor:
    """Q (d×K, orthonormal columns) spanning the class weight vectors (rows of `weight`, each
    L2-normalised first, as the official `project_data(use_q_matrix=True)`); QR in float64."""
    w = weight.detach().flatten(1).double().cpu()
    norms = w.norm(dim=1, keepdim=True)
    if not torch.isfinite(w).all() or (norms == 0).any():
        raise UserError("the linear model has a zero or non-finite class weight vector; retrain "
                        "orthogonal_projection_step_1.py")
    q, _ = torch.linalg.qr((w / norms).T, mode="reduced")
    return q


def project_out(x_flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """X_r = X − X Q Qᵀ (samples as rows): removes the span of Q's columns, nothing else."""
    return x_flat - (x_flat @ q) @ q.T


class OrthogonalProjection:
    """BatchLoader `transform`: project each [0,1] image (flattened) onto the orthogonal
    complement of the class weights. No clipping afterwards (as the original)."""

    def __init__(self, weight: torch.Tensor):
        self.q = class_basis(weight).float()
        self._on = {}

    def __call__(self, x: torch.Tensor, idx=None) -> torch.Tensor:
        q = self._on.get(x.device)
        if q is None:
            q = self._on[x.device] = self.q.to(x.device)
        if x[0].numel() != q.shape[0]:
            raise UserError(f"the linear model has {q.shape[0]} inputs but the images have "
                            f"{x[0].numel()} values; it was trained on other data")
        return project_out(x.flatten(1), q).view_as(x)


def load_class_weights(path: Path, num_classes: int, image_shape) -> torch.Tensor:
    """fc.weight (K×C·H·W) of a step-1 checkpoint (ours, or the official bare state_dict)."""
    sd, _ = engine.load_checkpoint(path)
    w = sd.get("fc.weight")
    d = math.prod(image_shape)
    if w is None or w.shape != (num_classes, d):
        got = tuple(w.shape) if w is not None else f"keys {list(sd)[:4]}"
        raise UserError(f"{path}: expected fc.weight of shape ({num_classes}, {d}), got {got}")
    return w.float()

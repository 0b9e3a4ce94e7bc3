"""SalUn's weight saliency mask (Fan et al., ICLR 2024) and the hard constraint that holds
masked weights fixed.

The mask keeps the global top `threshold` share of |∇ forget loss| trainable (True) and
freezes every other coordinate. Under the constraint the gradients of masked coordinates
are zeroed, and after every optimiser step masked coordinates are restored to their
original values and their momentum / Adam buffers zeroed, so they stay bit-identical under
momentum and weight decay. Masks are saved as {"mask": {name: bool}, "meta": ...}; the
official SalUn `with_{t}.pt` files ({name: 0/1}) load too.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from constants import UserError
from storage import read_plain, save_torch

@torch.no_grad()
def _flat_abs(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.abs().reshape(-1).float() for g in grads.values()])


def saliency_mask(model: nn.Module, loader, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency mask: the global top-`threshold` fraction of |grad of the
    forget loss| over all parameters may change (True), the rest is frozen (False).

    As the official `generate_mask`: model in eval mode, loss = -CE (mean per batch) on the
    forget set (`loader`: its training stream, with augmentation), gradients summed over
    batches, one global ranking of every parameter (conv, BN, linear). Exactly
    int(N * threshold) entries are True.
    """
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"mask_thr must be in (0, 1], got {threshold}")
    named = [(n, p) for n, p in model.named_parameters()]
    sums = {n: torch.zeros_like(p) for n, p in named}
    was_training = model.training
    model.eval()
    for batch in loader:
        model.zero_grad(set_to_none=True)
        loss = -F.cross_entropy(model(batch.x), batch.y)
        loss.backward()
        with torch.no_grad():
            for n, p in named:
                if p.grad is not None:
                    sums[n] += p.grad
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return mask_from_scores(sums, threshold)


@torch.no_grad()
def mask_from_scores(scores: dict[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Bool mask with True at the global top int(N * threshold) of |score| (ties broken by
    position, so the count is exact)."""
    flat = _flat_abs(scores)
    k = int(flat.numel() * threshold)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, start = {}, 0
    for name, g in scores.items():
        out[name] = keep[start:start + g.numel()].view_as(g).clone()
        start += g.numel()
    return out


def mask_fraction(mask: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(1, total)


def save_mask(path: str | Path, mask: dict[str, torch.Tensor], **meta) -> Path:
    """Atomic save: {"mask": {name: bool tensor (cpu)}, "meta": plain metadata}."""
    path = Path(path)
    save_torch({"mask": {k: v.detach().bool().cpu() for k, v in mask.items()}, "meta": meta}, path)
    return path


def load_mask(path: str | Path, model: nn.Module | None = None, device=None) -> dict[str, torch.Tensor]:
    """Read a mask saved by `save_mask`, or an official SalUn `with_{t}.pt` ({name: 0/1});
    with `model`, names and shapes are checked against it."""
    blob = read_plain(Path(path), "mask file")
    mask = blob.get("mask", blob) if isinstance(blob, dict) else None
    if not isinstance(mask, dict) or not all(isinstance(v, torch.Tensor) for v in mask.values()):
        raise UserError(f"{path} is not a mask file (expected {{param name: 0/1 tensor}})")
    mask = {(k[len("module."):] if k.startswith("module.") else k): v.bool() for k, v in mask.items()}
    if model is not None:
        own = dict(model.named_parameters())
        missing = [n for n in own if n not in mask]
        wrong = [n for n in own if n in mask and mask[n].shape != own[n].shape]
        if missing or wrong:
            what = f"no entry for {missing[0]}" if missing else f"shape mismatch at {wrong[0]}"
            raise UserError(f"mask {path} does not fit this model ({what})")
        mask = {n: mask[n] for n in own}
    if device is not None:
        mask = {k: v.to(device) for k, v in mask.items()}
    return mask


class MaskConstraint:
    """The hard saliency constraint for one model (see the module docstring)."""

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor]):
        self.items = []
        own = dict(model.named_parameters())
        unknown = [n for n in mask if n not in own]
        if unknown:
            raise UserError(f"mask entry {unknown[0]} is not a parameter of this model")
        for name, p in own.items():
            m = mask.get(name)
            if m is None:
                raise UserError(f"the mask has no entry for parameter {name}")
            m = m.to(p.device).bool()
            if m.shape != p.shape:
                raise UserError(f"mask shape {tuple(m.shape)} does not fit {name} {tuple(p.shape)}")
            if not bool(m.all()):
                self.items.append((p, m, p.detach().clone()))
        self.ids = {id(p) for p, _, _ in self.items}

    @torch.no_grad()
    def mask_grads(self, model=None) -> None:
        for p, m, _ in self.items:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def restore(self, model=None) -> None:
        for p, m, p0 in self.items:
            p.copy_(torch.where(m, p, p0))

    @torch.no_grad()
    def clear_buffers(self, optimizer, *_args) -> None:
        """Optimizer post-step hook: zero momentum / Adam moments at masked coordinates."""
        for p, m, _ in self.items:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == m.shape:
                    buf.mul_(m)


@contextmanager
def mask_constraint(model: nn.Module, mask: dict[str, torch.Tensor] | None):
    """Yields a MaskConstraint (or None without a mask). While active, every optimizer step
    that touches masked parameters zeroes their buffers at masked coordinates; the loop
    restores the coordinates themselves in engine.fit's after_step hook."""
    if mask is None:
        yield None
        return
    constraint = MaskConstraint(model, mask)

    def hook(optimizer, args, kwargs):
        if any(id(p) in constraint.ids for g in optimizer.param_groups for p in g["params"]):
            constraint.clear_buffers(optimizer)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield constraint
    finally:
        handle.remove()

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


# the integer type of the same width: the restore works on the parameters' bits
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


class MaskConstraint:
    """The hard saliency constraint for one model (see the module docstring).

    Each of its updates is one foreach call over every constrained parameter, not a loop of
    small kernels: on a GPU the per-parameter loop (about 250 launches a step for ResNet-18)
    cost SalUn 30 % of an epoch. The restore works on the parameters' bits, read as integers:
    bits * keep + frozen, with keep 1 where a coordinate may change (0 where frozen) and
    frozen its original bits where frozen (0 elsewhere), so kept and restored coordinates are
    the exact bits (signed zeros, infinities and NaNs included; tests/test_saliency.py
    compares with the where + copy). Integer multiply and add, because torch's foreach
    clamps send integer lists to their per-tensor path on CUDA (`division_op` in
    ForeachBinaryOpList.cu): the earlier clamp-based restore cost 112 launches a step on an
    H200 (docs/gpu.md), while foreach mul and add take the one-launch path for integers."""

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor]):
        own = dict(model.named_parameters())
        unknown = [n for n in mask if n not in own]
        if unknown:
            raise UserError(f"mask entry {unknown[0]} is not a parameter of this model")
        self.params, self.keep, self.keep_bits, self.frozen = [], [], [], []
        for name, p in own.items():
            m = mask.get(name)
            if m is None:
                raise UserError(f"the mask has no entry for parameter {name}")
            m = m.to(p.device).bool()
            if m.shape != p.shape:
                raise UserError(f"mask shape {tuple(m.shape)} does not fit {name} {tuple(p.shape)}")
            if bool(m.all()):
                continue
            bits = _BITS.get(p.dtype)
            if bits is None:
                raise UserError(f"the saliency mask cannot constrain {name} of type {p.dtype}")
            p0 = p.detach().view(bits)
            self.params.append(p)
            self.keep.append(m.to(p.dtype))  # 1.0 / 0.0: multiplying by it is mul_(bool mask)
            self.keep_bits.append(m.to(bits))
            self.frozen.append(torch.where(m, 0, p0))
        self.ids = {id(p) for p in self.params}
        self._where: list | None = None  # (data_ptr, stride) of each parameter when _bits was built
        self._bits: list[torch.Tensor] = []

    def _follow_storage(self) -> None:
        """Follow the parameters when their storage changes (engine.fit turns them
        channels_last on CUDA after this object exists): lay the constants out alike, since
        the foreach kernels take their fast path only when all strides agree, and rebuild the
        integer views of the parameters' bits (kept, so a step costs no per-parameter calls)."""
        where = [(p.data_ptr(), p.stride()) for p in self.params]
        if where == self._where:
            return
        for i, p in enumerate(self.params):
            if self.keep[i].stride() != p.stride():
                self.keep[i] = torch.empty_like(p).copy_(self.keep[i])
                like = p.detach().view(self.frozen[i].dtype)
                self.keep_bits[i] = torch.empty_like(like).copy_(self.keep_bits[i])
                self.frozen[i] = torch.empty_like(like).copy_(self.frozen[i])
        self._bits = [p.detach().view(f.dtype) for p, f in zip(self.params, self.frozen)]
        self._where = where

    @torch.no_grad()
    def mask_grads(self, model=None) -> None:
        self._follow_storage()
        pairs = [(p.grad, k) for p, k in zip(self.params, self.keep) if p.grad is not None]
        if pairs:
            grads, keep = zip(*pairs)
            torch._foreach_mul_(list(grads), list(keep))

    @torch.no_grad()
    def restore(self, model=None) -> None:
        if self.params:
            self._follow_storage()
            torch._foreach_mul_(self._bits, self.keep_bits)
            torch._foreach_add_(self._bits, self.frozen)

    @torch.no_grad()
    def clear_buffers(self, optimizer, *_args) -> None:
        """Optimizer post-step hook: zero momentum / Adam moments at masked coordinates."""
        bufs, keep = [], []
        for p, k in zip(self.params, self.keep):
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == k.shape:
                    bufs.append(buf)
                    keep.append(k)
        if bufs:
            torch._foreach_mul_(bufs, keep)


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

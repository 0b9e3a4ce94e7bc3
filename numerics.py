"""Denormal floats flushed to zero in CPU fits: a helper module of the fits that reach a near
perfect training fit (the L-BFGS fits of deep feature reweighting and of linear separability,
the SGD fit of orthogonal projection's linear model), where softmax gradients turn denormal
and x86 arithmetic on them runs 10-40x slower. What is flushed lies below the dtype's smallest
normal number (float32: 1.2e-38)."""
from __future__ import annotations

from contextlib import contextmanager

import torch


def _zero_denormals(grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0)


def flush_denormal_grad(logits: torch.Tensor) -> torch.Tensor:
    """Near a perfect fit the softmax gradient holds denormal floats (e.g. 2,015 of the
    10,240 entries of a 1024-image batch in orthogonal projection step 1), and the
    weight-gradient matrix product on them runs ~10x slower on x86 CPUs. flush_denormals()
    reaches only the calling thread, not torch's intra-op worker threads, so on CPU the
    logits' gradient is flushed here (what flush-to-zero would do to it). Returns `logits`."""
    if logits.requires_grad and logits.device.type == "cpu":
        logits.register_hook(_zero_denormals)
    return logits


@contextmanager
def flush_denormals():
    """Near a perfect fit the softmax produces denormal floats, which made CPU L-BFGS ~10-40x
    slower; flush them to zero while fitting (CPU only; restored to torch's default after)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)

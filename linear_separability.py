"""The linear separability test (§4.3 of "What Can We Learn from Unlearnable Datasets?",
Sandoval-Segura et al., NeurIPS 2023): can a linear model (or a small tanh MLP) fit a poison's
perturbations to their labels? `perturbations` (poisoned - clean), `min_max_01_` (one global
scaling to [0,1], as the original), `make_probe`, and `fit_probe_lbfgs`: full-batch L-BFGS on
cross-entropy whose final TRAINING accuracy is the linear separability. The set stays in host
memory and is streamed through the device in chunks (`fit_probe_lbfgs_chunks` takes any
source of chunks, e.g. bench/linear_bench.py's DataLoader), so it never has to fit on a GPU.

Against the official code: any dataset works, and the set need not fit on a GPU."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from constants import UserError
from numerics import flush_denormal_grad, flush_denormals


def perturbations(poisoned: torch.Tensor, clean: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(poisoned − clean)/255 as float32 N×C×H×W in host memory (what the model saw minus the
    clean image, so clipping and quantisation are included). The official script computes
    clean − poisoned; after the global min-max scaling a linear probe cannot tell the two apart."""
    if poisoned.shape != clean.shape:
        raise UserError(f"poisoned {tuple(poisoned.shape)} and clean {tuple(clean.shape)} differ")
    out = torch.empty(poisoned.shape, dtype=torch.float32)
    for s in range(0, len(clean), chunk):
        out[s:s + chunk] = (poisoned[s:s + chunk].float() - clean[s:s + chunk].float()) / 255
    return out


def min_max_01_(x: torch.Tensor) -> torch.Tensor:
    """One global min-max scaling to [0,1], in place (the official `normalize_01`)."""
    lo, hi = x.min(), x.max()
    if not hi > lo:
        raise UserError("every perturbation value is the same (is the poison the clean data?)")
    return x.sub_(lo).div_(hi - lo)


def make_probe(in_features: int, num_classes: int, hidden_layers: int = 0, width: int = 30) -> nn.Module:
    """Flatten → [Linear(·, width) → Tanh] × hidden_layers → Linear(·, K), with biases."""
    if hidden_layers < 0:
        raise UserError(f"--hidden_layers must be >= 0, got {hidden_layers}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def fit_probe_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 500,
                    lr: float = 0.5, max_iter: int = 20, chunk: int = 16384) -> dict:
    """Full-batch L-BFGS (`steps` calls of .step, each up to `max_iter` iterations, torch's
    default 20 as the official script) on cross-entropy over ALL of (x, y). x stays where it is
    (host memory): every evaluation streams it through the model's device in chunks of `chunk`
    rows and accumulates the exact full-batch gradient, so the set never has to fit on a GPU.
    After each step the training accuracy and loss are measured. Returns the curves:
    {"train_acc": [% per step], "train_loss": [mean cross-entropy per step]}."""
    dev = next(model.parameters()).device
    n = len(x)
    yd = y.to(dev)

    def chunks():
        for s in range(0, n, chunk):
            yield x[s:s + chunk].to(dev, non_blocking=True), yd[s:s + chunk]

    return fit_probe_lbfgs_chunks(model, chunks, n, steps=steps, lr=lr, max_iter=max_iter)


def fit_probe_lbfgs_chunks(model: nn.Module, chunks: Callable, n: int, *, steps: int, lr: float,
                           max_iter: int) -> dict:
    """fit_probe_lbfgs over any source of the full set: `chunks()` yields (x, y) on the model's
    device and together covers all n samples once (bench/linear_bench.py feeds it a DataLoader).
    The gradient is summed over the chunks, so it is the exact full-batch one."""
    dev = next(model.parameters()).device
    opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max_iter)

    def closure():
        opt.zero_grad()
        total = torch.zeros((), device=dev)
        for xb, yb in chunks():
            loss = F.cross_entropy(flush_denormal_grad(model(xb)), yb, reduction="sum") / n
            loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def measure():
        correct, total = 0, 0.0
        for xb, yb in chunks():
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            total += float(F.cross_entropy(logits, yb, reduction="sum"))
        return 100.0 * correct / n, total / n

    accs, losses = [], []
    bar = tqdm(range(steps), desc="L-BFGS", leave=False, disable=None)
    for _ in bar:
        with flush_denormals():
            opt.step(closure)
            acc, loss = measure()
        accs.append(acc)
        losses.append(loss)
        bar.set_postfix(acc=f"{acc:.2f}", loss=f"{loss:.3f}")
    return {"train_acc": accs, "train_loss": losses}

"""The deep feature reweighting algorithm (DFR, §4.2 of "What Can We Learn from Unlearnable
Datasets?", Sandoval-Segura et al., NeurIPS 2023): refit only the last layer of a network
trained on a poison, on a fixed clean subset of the training set, and compare clean test
accuracy before and after. A large gain means the poisoned network learned useful features
after all.

  `dfr_indices`      the clean subset: class-balanced, seeded, drawn once and saved.
  `dfr_cached`       (default) features of the subset and the test set computed once in eval
                     mode (`extract_features`), then the head refit by full-batch L-BFGS on
                     them (`fit_head_lbfgs`); nothing but the head changes.
  `dfr_augment`      the official procedure: augmented clean batches through engine.fit in
                     train mode (BatchNorm statistics re-estimated), every parameter but the
                     head frozen, a first-order optimiser (engine.fit has no L-BFGS).

Against the official code: the clean subset is seeded and class-balanced."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import engine
from constants import UserError
from datasets import balanced_subset, read_index_json
from numerics import flush_denormal_grad, flush_denormals
from reporting import write_json


def dfr_indices(labels: torch.Tensor, n: int, seed: int, path: Path) -> torch.Tensor:
    """The fixed clean DFR subset: read from `path`, or drawn once (class-balanced, seeded) and
    saved there. An existing file of another size is an error, never silently replaced."""
    path = Path(path)
    if path.is_file():
        idx = read_index_json(path, len(labels))
        if len(idx) != n:
            raise UserError(f"{path} holds {len(idx)} indices, not --num_dfr_train {n}; delete it "
                            f"or pass --num_dfr_train {len(idx)}")
        return idx
    idx = balanced_subset(labels, n, seed)
    write_json(path, {"indices": idx.tolist(), "n": n, "seed": seed,
                      "per_class": torch.bincount(labels[idx]).tolist()})
    return idx


@torch.no_grad()
def extract_features(model, loader, amp: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features float32, labels), on the loader's device, model in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, labels = [], []
    with engine.autocast(dev, engine.resolve_amp(amp, dev)):
        for batch in loader:
            feats.append(model.features(batch.x).float())
            labels.append(batch.y)
    model.train(was)
    return torch.cat(feats), torch.cat(labels)


def head_loss_closure(opt: torch.optim.Optimizer, head: nn.Linear, feats: torch.Tensor,
                      labels: torch.Tensor, weight_decay: float = 0.0):
    """The L-BFGS closure of a head on cached features: cross-entropy (plus
    weight_decay/2·‖W‖² when set), its gradient computed, the loss returned."""

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(flush_denormal_grad(head(feats)), labels)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    return closure


def fit_head_lbfgs(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int = 75,
                   lr: float = 0.5, max_iter: int = 20, weight_decay: float = 0.0) -> list[float]:
    """Refit `head` in place by full-batch L-BFGS on cached features, starting from its current
    weights as the original does; returns the loss of every step. steps × max_iter mirrors the
    official 15 epochs × 5 minibatches × 20 iterations."""
    opt = torch.optim.LBFGS(list(head.parameters()), lr=lr, max_iter=max_iter)
    closure = head_loss_closure(opt, head, feats, labels, weight_decay)
    losses = []
    with torch.enable_grad(), flush_denormals():
        for _ in tqdm(range(steps), desc="DFR L-BFGS", leave=False, disable=None):
            losses.append(float(opt.step(closure).detach()))
    return losses


def dfr_cached(model, train_loader, test_loader, *, steps: int = 75, lr: float = 0.5,
               max_iter: int = 20, weight_decay: float = 0.0, amp: bool | None = None) -> dict:
    """Deep feature reweighting with features computed once (eval mode, no augmentation) on the
    clean subset (`train_loader`) and the test set; only `model.head` changes. Returns the
    before/after metrics (see `_keyed`) and the final L-BFGS loss."""
    tr_f, tr_y = extract_features(model, train_loader, amp)
    te_f, te_y = extract_features(model, test_loader, amp)
    head = model.head
    out = _keyed("", _head_accuracy_and_loss(head, te_f, te_y), _head_accuracy_and_loss(head, tr_f, tr_y))
    with torch.no_grad():  # a float32 copy even if the model runs in another dtype
        fitted = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           device=tr_f.device)
        fitted.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    losses = fit_head_lbfgs(fitted, tr_f, tr_y, steps, lr, max_iter, weight_decay)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(getattr(fitted, name).to(p.dtype))
    out.update(_keyed("dfr_", _head_accuracy_and_loss(fitted, te_f, te_y),
                      _head_accuracy_and_loss(fitted, tr_f, tr_y)))
    out["dfr_fit_loss"] = losses[-1] if losses else None
    return out


def dfr_augment(model, train_loader, eval_train_loader, test_loader, cfg: engine.TrainConfig) -> dict:
    """The official deep feature reweighting: augmented clean batches (`train_loader`) through
    engine.fit with the model in train mode (BatchNorm running statistics are re-estimated on
    the clean subset; BatchNorm affine and every other parameter stay frozen), only the head
    optimised. engine.fit has no L-BFGS, so `cfg` names a first-order optimiser. Returns the
    before/after metrics (see `_keyed`); `eval_train_loader` is the subset without augmentation."""
    out = _keyed("", _accuracy_and_loss(model, test_loader, cfg.amp),
                 _accuracy_and_loss(model, eval_train_loader, cfg.amp))
    head_params = set(id(p) for p in model.head.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    engine.fit(model, train_loader, cfg, params=model.head.parameters(), desc="DFR (augment)")
    out.update(_keyed("dfr_", _accuracy_and_loss(model, test_loader, cfg.amp),
                      _accuracy_and_loss(model, eval_train_loader, cfg.amp)))
    return out


def _keyed(prefix: str, test: tuple[float, float], subset: tuple[float, float]) -> dict:
    """{prefix}test_acc/test_loss (the clean test set) and {prefix}subset_acc/subset_loss (the
    DFR subset) from (accuracy %, mean cross-entropy) pairs; prefix "" before DFR, "dfr_" after."""
    return {f"{prefix}test_acc": test[0], f"{prefix}test_loss": test[1],
            f"{prefix}subset_acc": subset[0], f"{prefix}subset_loss": subset[1]}


def _logit_accuracy_and_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return (100.0 * (logits.argmax(1) == labels).float().mean().item(),
            F.cross_entropy(logits, labels).item())


@torch.no_grad()
def _head_accuracy_and_loss(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return _logit_accuracy_and_loss(head(feats), labels)


def _accuracy_and_loss(model, loader, amp: bool | None) -> tuple[float, float]:
    return _logit_accuracy_and_loss(*engine.predict(model, loader, amp))

"""The poisons that train a surrogate network: error-min, error-min-CW and error-max (TAP).

Each is `fn(x, y, num_classes, seed, eps, **options) -> uint8 images`; call them through
`poisons.generate` / `poisons.timed_generate` (keys error-min, error-min-CW, error-max; TAP and
tap are names for error-max), which validate the data and the options.

  error-min   Unlearnable examples, sample-wise (Huang et al., ICLR 2021, "min-min"), L∞ 8/255:
              alternately train a surrogate for `train_step` batches on the perturbed data (SGD
              lr 0.1, momentum 0.9, wd 5e-4, grad clip 5, batch 512, shuffled, no augmentation) and
              update every image's δ by `steps`=20 signed-gradient *descent* steps of 0.8/255 on the
              surrogate's loss (eval mode), until the surrogate's error on the perturbed data is
              <= stop_error (0.01) or max_rounds (100; the original has no cap) is reached. δ
              starts at 0 (random_start: U(−ε, ε)). Input-space steps see the model's own
              normalisation; the sign of the gradient is the same as on raw pixels.
  error-min-CW
              The class-wise variant of unlearnable examples: one δ per class, 1 step per update,
              optimised on a seeded class-balanced 20% of the data (`fraction`), shuffled; after each
              batch a class's δ becomes the mean of that batch's per-sample updates (clamped).
              stop_error 0.01 as the original's scripts (its README says 0.1: pass stop_error=0.1).
  error-max   TAP, targeted adversarial poisoning (Fowl et al., "Adversarial Examples Make Strong
              Poisons", NeurIPS 2021), L∞ 8/255: a surrogate trained on clean data (`epochs`=40,
              SGD+Nesterov lr 0.1, batch 128, wd 5e-4, x0.1 at 3/8, 5/8, 7/8, crop+flip), then PGD
              toward the labels y+1 mod C: `steps`=250 passes over the data in index order, step
              0.05·ε, signed gradient, random crop+flip of the poison batch (differentiable), init
              N(0, ε²) clipped, `restarts`=8 — the restart with the lowest final target loss is kept
              (as the original; per dataset, not per image).

These cost GPU-hours at the published settings (ResNet-18 on all of CIFAR-10), are never
generated on demand, and have a CPU-scale recipe (`poisons.RECIPES[key]["small"]`, make_poison.py
--recipe small): a SmallCNN surrogate and far fewer steps. As in the original, the min-min
surrogate keeps one SGD state and one data iterator throughout all rounds; unlike it, perturbed
images are clipped to [0,1] while the surrogate trains (the original adds δ unclipped there).
The `_report` dict (filled by poisons.timed_generate into meta["report"]) records the rounds,
the surrogate's error per round and its loss on the clean vs the poisoned images.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import engine
from constants import UserError
from datasets import Augment, BatchLoader, Split, balanced_subset
from models import canonical_model_name, expects_normalized
from poison_pixels import apply_classwise, apply_perturbation, progress
from training import build_model


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
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = canonical_model_name(model)
        self.normalize = expects_normalized(self.name)
        self.split = Split(x, y, dataset or "", True)
        self.model = build_model(self.name, num_classes, self.device, seed)
        ref = BatchLoader(self.split, torch.arange(1), device=self.device, normalize=True)
        self.mean, self.inv_std = ref.mean, ref.inv_std

    def loader(self, indices=None, *, raw: bool = False, **kw) -> BatchLoader:
        """raw=True: batches of [0,1] pixels (for the attacks, which normalise themselves)."""
        return BatchLoader(self.split, indices, device=self.device,
                           normalize=self.normalize and not raw, **kw)

    def inputs(self, x01: torch.Tensor) -> torch.Tensor:
        return (x01 - self.mean) * self.inv_std if self.normalize else x01

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> dict:
        """Mean cross-entropy and accuracy (%) of the model on uint8 images, in eval mode."""
        ld = BatchLoader(Split(images, labels, self.split.name, True), None, batch_size=batch_size,
                         device=self.device, normalize=self.normalize, mean=self.mean.flatten().tolist(),
                         std=(1 / self.inv_std).flatten().tolist())
        logits, lab = engine.predict(self.model, ld, amp=False)
        return {"loss": float(F.cross_entropy(logits, lab)),
                "acc": float((logits.argmax(1) == lab).float().mean() * 100)}


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


# --- error-min, error-min-CW: unlearnable examples (min-min) ---------------------------------

def _check_min_min_options(train_step, steps, step_size, stop_error, max_rounds, batch_size, lr,
                           momentum, weight_decay, grad_clip, fraction) -> None:
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


def _min_min_loaders(s: _Surrogate, y, noise, classwise: bool, fraction: float, batch_size: int,
                     seed: int):
    """(train, update, check) loaders: the surrogate trains on clip(x + δ) (shuffled), δ is
    updated batch by batch on raw pixels, and the stop criterion is the error on clip(x + δ)."""
    n = len(y)
    if classwise:  # the original optimises on a seeded 20% subset (--use_subset), shuffled
        y_dev = y.to(s.device)
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
    return train, update, check


def _endless(loader: BatchLoader):
    """The loader's batches, epoch 0, 1, 2, ... without end: one data iterator carried across
    the rounds, like the original's. A batch is drawn only when asked for, so it carries the δ
    of that moment."""
    if len(loader) == 0:
        raise UserError("no images to train the surrogate on")
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def _train_steps(model, optimizer, batches, steps: int, grad_clip: float | None, desc: str) -> float:
    """`steps` SGD steps of cross-entropy in train mode, on the next batches; the mean loss.
    Like one step of engine.fit at a constant learning rate, without AMP: the min-min search
    interleaves these with δ updates, so it cannot hand its whole run to fit."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    loss_sum = 0.0
    for _ in progress(range(steps), desc, steps):
        b = next(batches)
        loss = F.cross_entropy(model(b.x), b.y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        loss_sum = loss_sum + loss.detach()  # a tensor: no host-device sync per step
    return float(loss_sum) / steps


def _descend_noise(s: _Surrogate, noise, update: BatchLoader, epoch: int, classwise: bool,
                   steps: int, step_size: float, eps: float, desc: str) -> None:
    """One pass of `update` (at `epoch`, its shuffle) moving δ in place to lower the eval-mode
    surrogate's loss: per image, or per class (the mean of a batch's per-image updates)."""
    s.model.eval()
    update.set_epoch(epoch)
    for b in progress(update, desc, len(update)):
        if classwise:
            d = _signed_descent(s.model, s.inputs, b.x, b.y, noise[b.y], steps, step_size, eps)
            for c in torch.unique(b.y):
                noise[c] = d[b.y == c].mean(0).clamp(-eps, eps)
        else:
            noise[b.idx] = _signed_descent(s.model, s.inputs, b.x, b.y, noise[b.idx], steps,
                                           step_size, eps)


def _min_min(x, y, num_classes, seed, eps, *, classwise: bool, model, train_step, steps, step_size,
             stop_error, max_rounds, batch_size, lr, momentum, weight_decay, grad_clip, random_start,
             fraction, device, dataset, report):
    """Unlearnable examples: rounds of (train the surrogate `train_step` batches on clip(x + δ),
    then lower its loss by moving δ) until its error on clip(x + δ) is <= stop_error."""
    _check_min_min_options(train_step, steps, step_size, stop_error, max_rounds, batch_size, lr,
                           momentum, weight_decay, grad_clip, fraction)
    key = "error-min-CW" if classwise else "error-min"
    s = _Surrogate(model, x, y, num_classes, seed, device, dataset)
    shape = (num_classes, *x.shape[1:]) if classwise else tuple(x.shape)
    g = torch.Generator().manual_seed(seed)
    noise = ((torch.rand(shape, generator=g) * 2 - 1) * eps if random_start
             else torch.zeros(shape)).to(s.device)
    train, update, check = _min_min_loaders(s, y, noise, classwise, fraction, batch_size, seed)
    # One SGD state for the whole search, at a constant learning rate (as the original).
    optimizer = engine.make_optimizer(s.model.parameters(), engine.TrainConfig(
        lr=lr, momentum=momentum, weight_decay=weight_decay))
    batches = _endless(train)
    errors: list[float] = []
    for rnd in range(1, max_rounds + 1):
        loss = _train_steps(s.model, optimizer, batches, train_step, grad_clip,
                            f"{key} round {rnd}: surrogate")
        _descend_noise(s, noise, update, rnd, classwise, steps, step_size, eps,
                       f"{key} round {rnd}: noise")
        errors.append(1 - engine.accuracy_on(s.model, check, amp=False) / 100)
        tqdm.write(f"{key} round {rnd}/{max_rounds}: surrogate train loss {loss:.4g}, "
                   f"error on the perturbed data {errors[-1]:.4g}")
        if errors[-1] <= stop_error:
            break
    converged = errors[-1] <= stop_error
    if not converged:
        tqdm.write(f"{key}: stopped after max_rounds={max_rounds} with the surrogate's error on the "
                   f"perturbed data at {errors[-1]:.4f} > stop_error={stop_error}; raise max_rounds "
                   f"for the full search")
    noise = noise.cpu()
    if classwise:
        out = apply_classwise(x, y, num_classes, lambda c, idx: noise[c].double(), "linf", eps, key)
    else:
        out = apply_perturbation(x, noise, "linf", eps)
    if report is not None:
        clean, pois = s.evaluate(x, y), s.evaluate(out, y)
        report.update(rounds=len(errors), errors=[round(e, 5) for e in errors], converged=converged,
                      surrogate_clean_loss=clean["loss"], surrogate_poisoned_loss=pois["loss"],
                      surrogate_clean_acc=clean["acc"], surrogate_poisoned_acc=pois["acc"])
    return out


def error_min(x, y, num_classes, seed, eps, model: str = "resnet18", train_step: int = 10,
              steps: int = 20, step_size: float = 0.8 / 255, stop_error: float = 0.01,
              max_rounds: int = 100, batch_size: int = 512, lr: float = 0.1,
              momentum: float = 0.9, weight_decay: float = 5e-4, grad_clip: float | None = 5.0,
              random_start: bool = False, device: str | None = None, dataset: str | None = None,
              _report: dict | None = None):
    """Unlearnable examples (Huang et al. 2021), sample-wise: one error-minimising δ per image."""
    return _min_min(x, y, num_classes, seed, eps, classwise=False, model=model,
                    train_step=train_step, steps=steps, step_size=step_size, stop_error=stop_error,
                    max_rounds=max_rounds, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, grad_clip=grad_clip, random_start=random_start,
                    fraction=1.0, device=device, dataset=dataset, report=_report)


def error_min_cw(x, y, num_classes, seed, eps, model: str = "resnet18", train_step: int = 10,
                 steps: int = 1, step_size: float = 0.8 / 255, stop_error: float = 0.01,
                 max_rounds: int = 100, fraction: float = 0.2, batch_size: int = 512,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 grad_clip: float | None = 5.0, random_start: bool = False,
                 device: str | None = None, dataset: str | None = None,
                 _report: dict | None = None):
    """Unlearnable examples (Huang et al. 2021), class-wise: one error-minimising δ per class."""
    return _min_min(x, y, num_classes, seed, eps, classwise=True, model=model,
                    train_step=train_step, steps=steps, step_size=step_size, stop_error=stop_error,
                    max_rounds=max_rounds, batch_size=batch_size, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, grad_clip=grad_clip, random_start=random_start,
                    fraction=fraction, device=device, dataset=dataset, report=_report)


# --- error-max: TAP, targeted adversarial poisoning -------------------------------------------

def _train_clean_surrogate(s: _Surrogate, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """TAP's crafting model, trained on clean data with engine.fit ("conservative": SGD +
    Nesterov, wd 5e-4, x0.1 at 3/8, 5/8, 7/8 of training, crop + flip)."""
    train = s.loader(None, batch_size=batch_size, shuffle=True, seed=seed, augment=Augment())
    cfg = engine.TrainConfig(epochs=epochs, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                             schedule="multistep", gamma=0.1,
                             milestones=tuple(int(epochs / f) for f in (2.667, 1.6, 1.142)))
    engine.fit(s.model, train, cfg, desc="error-max surrogate")
    s.model.eval()


def _tap_restart(s: _Surrogate, x, target, attack: BatchLoader, g_seed: int, eps: float,
                 steps: int, step_size: float, augment: bool, desc: str):
    """One PGD run toward `target`: (δ, the mean target loss of its last pass). Every image once
    per pass, in index order; δ stays in the ε-ball and keeps x + δ in [0, 1]."""
    g = torch.Generator().manual_seed(g_seed)
    aug_gen = torch.Generator().manual_seed(g_seed + 1)
    aug = Augment() if augment else None
    delta = (torch.randn(x.shape, generator=g) * eps).clamp(-eps, eps).to(s.device)
    for _ in progress(range(steps), desc, steps):
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
    return delta, total / len(x)  # the target loss of the last pass, as the original


def error_max_tap(x, y, num_classes, seed, eps, model: str = "resnet18", epochs: int = 40,
                  lr: float = 0.1, batch_size: int = 128, steps: int = 250,
                  step_size: float | None = None, restarts: int = 8, attack_batch_size: int = 512,
                  augment: bool = True, device: str | None = None, dataset: str | None = None,
                  _report: dict | None = None):
    """TAP — targeted adversarial poisoning (Fowl et al. 2021), the key error-max: train a
    surrogate on clean data, then push every image toward class y+1 mod C by PGD; of `restarts`
    runs, the one with the lowest final target loss is kept."""
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("steps", steps),
                    ("restarts", restarts), ("attack_batch_size", attack_batch_size)):
        _positive(name, v)
    _positive("lr", lr, float)
    step_size = 0.05 * eps if step_size is None else step_size
    _positive("step_size", step_size, float)
    s = _Surrogate(model, x, y, num_classes, seed, device, dataset)
    _train_clean_surrogate(s, epochs, lr, batch_size, seed)
    attack = s.loader(None, raw=True, batch_size=attack_batch_size)
    target = ((y + 1) % num_classes).to(s.device)
    best, best_loss, losses = None, math.inf, []
    for r in range(restarts):
        g_seed = int(np.random.SeedSequence([seed, r]).generate_state(1)[0])
        delta, loss = _tap_restart(s, x, target, attack, g_seed, eps, steps, step_size, augment,
                                   f"error-max restart {r + 1}/{restarts}")
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = delta, loss
    out = apply_perturbation(x, best.cpu(), "linf", eps)
    if _report is not None:
        clean, pois = s.evaluate(x, y), s.evaluate(out, y)
        tgt = s.evaluate(out, (y + 1) % num_classes)
        _report.update(target_losses=[round(v, 5) for v in losses], best_restart=losses.index(best_loss),
                       surrogate_clean_loss=clean["loss"], surrogate_poisoned_loss=pois["loss"],
                       surrogate_clean_acc=clean["acc"], surrogate_poisoned_acc=pois["acc"],
                       surrogate_target_acc=tgt["acc"])
    return out

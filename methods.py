"""Machine-unlearning methods: one implementation per algorithm, one signature, one loop.

Every method is a function `fn(model, setup) -> model` registered in `METHODS` under its
canonical name. `model` is the original (trained) model, modified in place unless the method
builds a new one (`retrain`); `setup` (a `Setup`) carries the data (forget / retain /
validation indices), the optimisation settings, the saliency mask and the method's own
hyper-parameters. Iterative methods differ only in their data stream, their loss and which
parameters move; all of them train through `engine.fit` (see `_train`). `iu` is a one-shot
parameter update (no loop).

| name (aliases)                 | algorithm                                                     |
|--------------------------------|---------------------------------------------------------------|
| rl                             | DeepDive RL: one shuffled stream of retain + forget; forget samples get random labels |
| rl_split (RL)                  | official SalUn RL: per epoch one pass over forget with random labels, then one over retain |
| salun (SalUn)                  | rl_split under the saliency mask (the SalUn paper's method)   |
| salun_soft (SalUn-soft, RL_proximal) | RL + proximal soft-thresholding towards the original weights |
| ga                             | DeepDive GA: descent on retain and ascent on forget samples, per batch |
| ga_small (GA)                  | official GA: gradient ascent on the forget set only           |
| neggrad_plus (NegGrad+)        | alpha * CE(retain batch) - (1 - alpha) * CE(forget batch)      |
| ft (FT, Naive, CF)             | fine-tune on retain (CF-k: only the last k layers)            |
| l1_sparse (FT_l1, FT_prune)    | FT + alpha_t * ||theta||_1 (Jia et al., "model sparsity")      |
| retrain (EU)                   | from scratch on retain with the base recipe (EU-k: re-initialise and train the last k layers) |
| boundary_shrink (BS)           | fine-tune forget samples towards their FGSM neighbour's label  |
| boundary_expanding (BE)        | train forget samples into an extra shadow class, then drop it |
| iu (IU, wfisher)               | influence unlearning: one WoodFisher (inverse-Fisher) step     |
| scrub (SCRUB)                  | corrective SCRUB: max steps ascend CE + KL on forget, then min steps on retain |
| badt (BadT)                    | Bad Teacher: distil all data; forget from a random-init teacher |
| ssd (SSD)                      | Selective Synaptic Dampening: shrink weights important to forget only (no training) |

Any method takes the SalUn saliency mask (`Setup.mask`, see `saliency_mask`): a HARD
constraint — gradients of masked coordinates are zeroed, and after every optimiser step
masked coordinates are restored to their original values and their momentum / Adam buffers
zeroed, so they stay bit-identical under momentum and weight decay.

Adding a method: write `def name(model, s: Setup) -> nn.Module`, decorate it with
`@register("name", aliases=("Name",), params={"alpha": 0.001, ...}, summary=..., source=...)`,
and build its stream/loss with the helpers below (`forget_loader`, `retain_loader`,
`Paired`, `_train`, `frozen_copy`). `Setup.loader_overrides` passes manipulated labels,
replaced images or trigger stamps to every training loader, so the forget set can carry
what the model saw at training time.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

import engine
from constants import UserError
from datasets import Augment, Batch, Split, save_atomic
from models import last_k_blocks
from training import PreparedData, make_loader, test_indices_without_class, train_classifier


# ============================================================================ the setup

@dataclass
class Setup:
    """What an unlearning method gets besides the model."""

    data: PreparedData
    model_name: str
    device: torch.device | str = "cpu"
    seed: int = 0
    # optimisation (the official SalUn unlearning optimiser by default)
    epochs: int = 10
    steps: int | None = None
    lr: float = 0.01
    batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "constant"
    warmup: float = 0.0
    amp: bool | None = None
    augment: bool = True  # crop + flip on the unlearning streams (official); False = none
    # what may move
    mask: dict[str, torch.Tensor] | None = None  # name -> bool (True = may change)
    params: dict = field(default_factory=dict)  # the method's hyper-parameters
    # retrain (k = -1): the base model's recipe and where to cache the result
    base_recipe: dict | None = None  # {"train": TrainConfig fields, "batch_size", "augment"}
    cache_path: Path | None = None
    # loader overrides for every training stream (manipulated labels, stamps, replacements)
    loader_overrides: dict = field(default_factory=dict)
    eval_batch_size: int = 1024
    log: Callable[[str], None] = print

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def train_config(self, **overrides) -> engine.TrainConfig:
        cfg = dict(epochs=self.epochs, steps=self.steps, optimizer=self.optimizer, lr=self.lr,
                   momentum=self.momentum, weight_decay=self.weight_decay,
                   schedule=self.schedule, warmup=self.warmup, amp=self.amp)
        cfg.update(overrides)
        return engine.TrainConfig(**cfg)


# ============================================================================ registry

@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[nn.Module, Setup], nn.Module]
    summary: str
    source: str
    params: dict  # accepted hyper-parameters and their defaults
    aliases: tuple[str, ...] = ()
    train_defaults: dict = field(default_factory=dict)  # e.g. {"schedule": "cosine"}
    needs_forget: bool = True
    forces_mask: bool = False
    iterative: bool = True


METHODS: dict[str, Method] = {}
# alias -> (canonical name, fixed hyper-parameters)
ALIASES: dict[str, tuple[str, dict]] = {}


def register(name: str, *, summary: str, source: str, aliases=(), params: dict | None = None,
             train_defaults: dict | None = None, needs_forget: bool = True,
             forces_mask: bool = False, iterative: bool = True):
    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name} registered twice")
        names = []
        for a in aliases:
            alias, fixed = (a if isinstance(a, tuple) else (a, {}))
            ALIASES[alias] = (name, dict(fixed))
            names.append(alias)
        METHODS[name] = Method(name, fn, summary, source, dict(params or {}), tuple(names),
                               dict(train_defaults or {}), needs_forget, forces_mask, iterative)
        return fn

    return wrap


def resolve(name: str) -> tuple[Method, dict]:
    """(method, fixed hyper-parameters) for a name or alias.

    Exact names and aliases win (`rl` is DeepDive's RL, `RL` the official one = rl_split;
    `ga` / `GA` likewise); otherwise the match is case-insensitive, and a spelling that
    could mean two methods is refused."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("method must be a non-empty string")
    name = name.strip()
    if name in METHODS:
        return METHODS[name], {}
    if name in ALIASES:
        canon, fixed = ALIASES[name]
        return METHODS[canon], dict(fixed)
    low = name.lower().replace("-", "_")
    hits = {}
    for key in METHODS:
        if key.lower() == low:
            hits[key] = (key, {})
    for alias, (canon, fixed) in ALIASES.items():
        if alias.lower().replace("-", "_") == low:
            hits.setdefault(canon, (canon, fixed))
    if len(hits) == 1:
        canon, fixed = next(iter(hits.values()))
        return METHODS[canon], dict(fixed)
    if len(hits) > 1:
        options = " or ".join(f"'{n}'" for n in sorted(_spellings_for(hits)))
        raise UserError(f"method '{name}' is ambiguous: write {options}")
    close = difflib.get_close_matches(name, list(METHODS) + list(ALIASES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"unknown method '{name}'{hint}; choose from {', '.join(method_names())}")


def _spellings_for(hits) -> list[str]:
    out = []
    for canon in hits:
        out.append(canon)
        out += [a for a, (c, _) in ALIASES.items() if c == canon and a.lower() == canon.lower()]
    return sorted(set(out))


def method_names() -> list[str]:
    return sorted(METHODS)


def method_help() -> str:
    lines = []
    for m in METHODS.values():
        alias = f" ({', '.join(m.aliases)})" if m.aliases else ""
        lines.append(f"  {m.name}{alias}: {m.summary}")
    return "\n".join(lines)


def method_params(name: str, given: dict | None = None) -> dict:
    """The method's hyper-parameters: defaults, then alias-fixed values, then `given`."""
    method, fixed = resolve(name)
    out = dict(method.params)
    out.update(fixed)
    for key, value in (given or {}).items():
        if key not in method.params:
            accepted = ", ".join(method.params) or "none"
            raise UserError(f"method {method.name} does not take '{key}' (it takes: {accepted})")
        out[key] = value
    return out


def unlearn(model: nn.Module, name: str, setup: Setup) -> nn.Module:
    """Run method `name` (name or alias) on `model` with `setup`; returns the unlearned model.
    `setup.params` may hold only the method's own hyper-parameters."""
    method, _ = resolve(name)
    setup.params = method_params(name, setup.params)
    if method.needs_forget and len(setup.data.forget_idx) == 0:
        raise UserError(f"{method.name} needs a non-empty forget set")
    if method.forces_mask and setup.mask is None:
        raise UserError(f"{method.name} needs a saliency mask: compute one with saliency_mask()")
    return method.fn(model, setup)


# ============================================================================ data streams

def train_loader(s: Setup, indices: torch.Tensor, salt: int, *, batch_size: int | None = None,
                 shuffle: bool = True, augment: bool | None = None):
    """A training stream over `indices` of the train split (shuffled, augmented per setup),
    with the setup's loader overrides (manipulated labels, stamps)."""
    on = s.augment if augment is None else augment
    aug = Augment() if on else Augment(crop=0, flip=False)
    loader = make_loader(s.data, "train", indices, model_name=s.model_name,
                         batch_size=batch_size or s.batch_size, device=s.device, train=True,
                         seed=s.seed * 1000 + salt, augment=aug, **s.loader_overrides)
    loader.shuffle = shuffle
    return loader


def forget_loader(s: Setup, salt: int = 1, **kw):
    return train_loader(s, s.data.forget_idx, salt, **kw)


def retain_loader(s: Setup, salt: int = 2, **kw):
    return train_loader(s, s.data.retain_idx, salt, **kw)


def union_loader(s: Setup, salt: int = 3, **kw):
    """Retain and forget samples in one shuffled stream."""
    idx = torch.sort(torch.cat([s.data.retain_idx, s.data.forget_idx]))[0]
    return train_loader(s, idx, salt, **kw)


def eval_loader(s: Setup, indices: torch.Tensor, split: str = "train"):
    return make_loader(s.data, split, indices, model_name=s.model_name,
                       batch_size=s.eval_batch_size, device=s.device, **s.loader_overrides)


def forget_membership(s: Setup) -> torch.Tensor:
    """Full-length bool tensor on the device: True for forget-set indices."""
    member = torch.zeros(len(s.data.train), dtype=torch.bool)
    member[s.data.forget_idx] = True
    return member.to(s.device)


class Paired:
    """Each item is (retain batch, forget batch); the forget stream cycles (re-shuffled on
    every pass) so an epoch is one pass over retain."""

    def __init__(self, retain, forget):
        self.retain, self.forget, self.epoch = retain, forget, 0

    def __len__(self):
        return len(self.retain)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.retain.set_epoch(epoch)

    def _forget_cycle(self):
        n = 0
        while True:
            self.forget.set_epoch(self.epoch * 1000 + n)
            yield from self.forget
            n += 1

    def __iter__(self):
        cycle = self._forget_cycle()
        for batch in self.retain:
            yield batch, next(cycle)


class EpochTracker:
    """A stream wrapper that remembers the epoch engine.fit set (for epoch-dependent losses)."""

    def __init__(self, stream):
        self.stream, self.epoch = stream, 0

    def __len__(self):
        return len(self.stream)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        return iter(self.stream)


class RandomLabels:
    """Uniform random labels in [0, C) drawn fresh for every batch (the true label may come
    up, as in the official RL and DeepDive), from a seeded generator."""

    def __init__(self, num_classes: int, seed: int, device):
        device = torch.device(device)
        self.num_classes, self.device = num_classes, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.num_classes, (n,), generator=self.gen, device=self.device)


# ============================================================================ the loop

def _trainable(model: nn.Module, k: int):
    """(parameters to optimise, modules to keep frozen in eval mode) for the last k layers."""
    if k == -1:
        return [p for p in model.parameters() if p.requires_grad], []
    units = last_k_blocks(model, k)
    chosen = {id(m) for _, m in units}
    frozen = [m for _, m in model.blocks() if id(m) not in chosen]
    params = [p for _, m in units for p in m.parameters()]
    return params, frozen


def _train(model: nn.Module, s: Setup, stream, loss_fn, *, extra_params=(),
           after_step: Callable | None = None, desc: str = "unlearn", **cfg_overrides) -> list[dict]:
    """Every iterative method trains here: the setup's optimiser on `stream` with `loss_fn`,
    only the last k layers when `k` is set, under the saliency mask when one is given."""
    cfg = s.train_config(**cfg_overrides)
    params, frozen = _trainable(model, int(s.params.get("k", -1)))
    if frozen:
        inner = loss_fn

        def loss_fn(m, item):  # noqa: F811 — fit puts the whole model in train mode
            for unit in frozen:
                unit.eval()
            return inner(m, item)

    still = [p for unit in frozen for p in unit.parameters() if p.requires_grad]
    for p in still:  # no gradients for the frozen units (speed; they are not optimised anyway)
        p.requires_grad_(False)
    try:
        with mask_constraint(model, s.mask) as constraint:
            def step_hook(m):
                if after_step is not None:
                    after_step(m)
                if constraint is not None:
                    constraint.restore(m)  # last: the hard constraint wins

            return engine.fit(model, stream, cfg, loss_fn=loss_fn, params=list(params) + list(extra_params),
                              after_backward=constraint.mask_grads if constraint else None,
                              after_step=step_hook, desc=desc)
    finally:
        for p in still:
            p.requires_grad_(True)


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with no gradients (the original model as a teacher / attacker)."""
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


# ============================================================================ saliency mask

@torch.no_grad()
def _flat_abs(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.abs().reshape(-1).float() for g in grads.values()])


def saliency_mask(model: nn.Module, s: Setup, threshold: float = 0.5,
                  loader=None) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency mask: the global top-`threshold` fraction of |grad of the
    forget loss| over all parameters may change (True), the rest is frozen (False).

    As the official `generate_mask`: model in eval mode, loss = -CE (mean per batch) on the
    forget set (training augmentation), gradients summed over batches, one global ranking of
    every parameter (conv, BN, linear). Exactly int(N * threshold) entries are True.
    """
    if not 0.0 < threshold <= 1.0:
        raise UserError(f"mask_thr must be in (0, 1], got {threshold}")
    loader = loader or forget_loader(s, salt=7)
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
    save_atomic({"mask": {k: v.detach().bool().cpu() for k, v in mask.items()}, "meta": meta}, path)
    return path


def load_mask(path: str | Path, model: nn.Module | None = None, device=None) -> dict[str, torch.Tensor]:
    """Read a mask saved by `save_mask`, or an official SalUn `with_{t}.pt` ({name: 0/1});
    with `model`, names and shapes are checked against it."""
    blob = engine.read_plain(Path(path), "mask file")
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
    that touches masked parameters zeroes their buffers at masked coordinates; `_train`
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


# ============================================================================ losses

def _ce(model, batch: Batch):
    logits = model(batch.x)
    return F.cross_entropy(logits, batch.y), logits, batch.y


# ============================================================================ methods

@register("rl", summary="DeepDive RL: shuffled retain + forget, forget samples relabelled at random",
          source="SalUn_DeepDive methods.py `rl`")
def rl(model: nn.Module, s: Setup) -> nn.Module:
    is_forget = forget_membership(s)
    relabel = RandomLabels(s.num_classes, s.seed, s.device)

    def loss_fn(m, batch: Batch):
        sel = is_forget[batch.idx]
        y = torch.where(sel, relabel(len(batch.y)), batch.y)
        logits = m(batch.x)
        return F.cross_entropy(logits, y), logits, y

    _train(model, s, union_loader(s), loss_fn, desc="rl")
    return model


@register("rl_split", aliases=("RL",),
          summary="official RL (random labeling): per epoch forget with random labels, then retain",
          source="Unlearn-Saliency Classification/unlearn/RL.py (CIFAR-10/SVHN branch)")
def rl_split(model: nn.Module, s: Setup) -> nn.Module:
    return _rl_split(model, s, "rl_split")


def _rl_split(model: nn.Module, s: Setup, desc: str) -> nn.Module:
    relabel = RandomLabels(s.num_classes, s.seed, s.device)

    def loss_fn(m, item):
        tag, batch = item
        y = relabel(len(batch.y)) if tag == "forget" else batch.y
        logits = m(batch.x)
        return F.cross_entropy(logits, y), logits, y

    stream = engine.Chain(forget=forget_loader(s), retain=retain_loader(s))
    _train(model, s, stream, loss_fn, desc=desc)
    return model


@register("salun", aliases=("SalUn", "SALUN"), forces_mask=True,
          summary="SalUn: rl_split under the weight saliency mask (mask_thr = share that may change)",
          source="Unlearn-Saliency main_random.py --unlearn RL --mask_path with_0.5.pt")
def salun(model: nn.Module, s: Setup) -> nn.Module:
    return _rl_split(model, s, "salun")


@register("salun_soft", aliases=("SalUn-soft", "RL_proximal"), params={"mask_ratio": 0.5},
          summary="SalUn-soft: RL on shuffled retain+forget, then after every step a soft "
                  "threshold towards the original weights resetting a decaying share of them",
          source="Unlearn-Saliency Classification/unlearn/RL_pro.py")
def salun_soft(model: nn.Module, s: Setup) -> nn.Module:
    """After step t of T the `ratio_t = mask_ratio * (1 - t/T)` share of coordinates with the
    smallest |theta - theta0| are reset to theta0, the rest shrunk by that threshold. (The
    official code computes the ratio from the epoch only and crashes on its undefined
    `args.mask_ratio`; here the decay is per step and mask_ratio has a default.)"""
    ratio0 = float(s.params["mask_ratio"])
    if not 0.0 <= ratio0 < 1.0:
        raise UserError(f"mask_ratio must be in [0, 1), got {ratio0}")
    params = [p for p in model.parameters()]
    theta0 = [p.detach().clone() for p in params]
    n_params = sum(p.numel() for p in params)
    is_forget = forget_membership(s)
    relabel = RandomLabels(s.num_classes, s.seed, s.device)
    stream = union_loader(s)
    total = s.steps or s.epochs * len(stream)
    state = {"step": 0}

    @torch.no_grad()
    def proximal(m):
        state["step"] += 1
        k = int(ratio0 * (total - state["step"]) / total * n_params)
        if k <= 0:
            return
        diffs = [p - p0 for p, p0 in zip(params, theta0)]
        flat = torch.cat([d.reshape(-1).abs() for d in diffs])
        thr = torch.kthvalue(flat.float(), k).values
        for p, p0, d in zip(params, theta0, diffs):
            p.copy_(torch.where(d > thr, p - thr, torch.where(d < -thr, p + thr, p0)))

    def loss_fn(m, batch: Batch):
        y = torch.where(is_forget[batch.idx], relabel(len(batch.y)), batch.y)
        logits = m(batch.x)
        return F.cross_entropy(logits, y), logits, y

    _train(model, s, stream, loss_fn, after_step=proximal, desc="salun_soft")
    return model


@register("ga", train_defaults={"schedule": "cosine"},
          summary="DeepDive GA: per batch of retain + forget, descent on retain and ascent on forget samples",
          source="SalUn_DeepDive methods.py `ga` (per-sample CE, forget losses x -1, cosine lr)")
def ga(model: nn.Module, s: Setup) -> nn.Module:
    is_forget = forget_membership(s)

    def loss_fn(m, batch: Batch):
        logits = m(batch.x)
        per = F.cross_entropy(logits, batch.y, reduction="none")
        sign = 1.0 - 2.0 * is_forget[batch.idx].float()
        return (per * sign).mean(), logits, batch.y

    _train(model, s, union_loader(s), loss_fn, desc="ga")
    return model


@register("ga_small", aliases=("GA",),
          summary="official GA: gradient ascent on the forget set only",
          source="Unlearn-Saliency Classification/unlearn/GA.py")
def ga_small(model: nn.Module, s: Setup) -> nn.Module:
    def loss_fn(m, batch: Batch):
        logits = m(batch.x)
        return -F.cross_entropy(logits, batch.y), logits, batch.y

    _train(model, s, forget_loader(s), loss_fn, desc="ga_small")
    return model


@register("neggrad_plus", aliases=("NegGrad+", "neggrad+", "NegGradPlus"), params={"alpha": 0.95},
          summary="NegGrad+: alpha * CE(retain batch) - (1 - alpha) * CE(forget batch), "
                  "one pass over retain per epoch, forget cycled",
          source="Kurmanji et al. 2023 (SCRUB paper), NegGrad+ baseline")
def neggrad_plus(model: nn.Module, s: Setup) -> nn.Module:
    alpha = float(s.params["alpha"])
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"neggrad_plus alpha must be in [0, 1], got {alpha}")

    def loss_fn(m, item):
        rb, fb = item
        logits = m(torch.cat([rb.x, fb.x]))
        lr_, lf = logits[:len(rb.y)], logits[len(rb.y):]
        loss = alpha * F.cross_entropy(lr_, rb.y) - (1 - alpha) * F.cross_entropy(lf, fb.y)
        return loss, lr_, rb.y

    _train(model, s, Paired(retain_loader(s), forget_loader(s)), loss_fn, desc="neggrad_plus")
    return model


@register("ft", aliases=("FT", "Naive", "CF"), params={"k": -1},
          needs_forget=False,
          summary="fine-tune on the retain set (k = train only the last k layers: CF-k)",
          source="Unlearn-Saliency unlearn/FT.py; corrective-unlearning-bench Naive / CF")
def ft(model: nn.Module, s: Setup) -> nn.Module:
    _train(model, s, retain_loader(s), _ce, desc="ft")
    return model


@register("l1_sparse", aliases=("l1-sparse", "FT_l1", "FT_prune"), params={"alpha": 5e-4, "no_l1_epochs": 0},
          needs_forget=False,
          summary="FT + alpha_t * ||theta||_1, alpha_t = alpha * (1 - epoch / (epochs - no_l1_epochs))",
          source="Unlearn-Saliency unlearn/FT.py FT_l1 (Jia et al. 2023, model sparsity)")
def l1_sparse(model: nn.Module, s: Setup) -> nn.Module:
    alpha, no_l1 = float(s.params["alpha"]), int(s.params["no_l1_epochs"])
    stream = retain_loader(s)
    epochs = math.ceil((s.steps or s.epochs * len(stream)) / len(stream))
    params = [p for p in model.parameters()]

    tracked = EpochTracker(stream)  # the loss needs the epoch

    def loss_fn(m, batch: Batch):
        logits = m(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        span = epochs - no_l1
        if tracked.epoch < span:
            a = alpha * (1 - tracked.epoch / span)
            loss = loss + a * sum(p.abs().sum() for p in params)
        return loss, logits, batch.y

    _train(model, s, tracked, loss_fn, desc="l1_sparse")
    return model


@register("retrain", aliases=("EU",), params={"k": -1}, needs_forget=False,
          summary="exact unlearning: from scratch on the retain set with the base model's recipe "
                  "(k >= 1: EU-k, re-initialise the last k layers and train them on retain)",
          source="Unlearn-Saliency unlearn/retrain.py; corrective-unlearning-bench EU")
def retrain(model: nn.Module, s: Setup) -> nn.Module:
    k = int(s.params["k"])
    if k != -1:
        for _, unit in last_k_blocks(model, k):
            for mod in unit.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
        _train(model, s, retain_loader(s), _ce, desc=f"retrain(k={k})")
        return model
    new, _meta = retrain_from_scratch(s)
    return new


def base_recipe_config(recipe: dict | None) -> tuple[engine.TrainConfig, int, bool]:
    recipe = recipe or {}
    fields = dict(recipe.get("train", {}))
    if "milestones" in fields:
        fields["milestones"] = tuple(fields["milestones"])
    return engine.TrainConfig(**fields), int(recipe.get("batch_size", 256)), bool(recipe.get("augment", True))


def train_from_scratch(model_name: str, data: PreparedData, recipe: dict | None, *, device, seed: int,
                       ckpt_path: Path, eval_batch_size: int = 1024, amp: bool | None = None,
                       loader_overrides: dict | None = None, extra_meta: dict | None = None,
                       test_eval: bool = True, logger=None) -> tuple[nn.Module, dict]:
    """`training.train_classifier` on `data.retain_idx` with a recipe dict, monitoring only the
    validation split each epoch (no pass over the test set per epoch: model selection never
    looks at test, and CPU runs stay fast); with `test_eval`, the final test accuracy is
    measured once and written into the checkpoint's meta."""
    cfg, batch_size, augment = base_recipe_config(recipe)
    cfg.amp = amp
    empty = data.test.x[:0], data.test.y[:0]
    quiet = dataclasses.replace(data, test=Split(*empty, data.test.name, False, list(data.test.classes)))
    with warnings.catch_warnings():  # statistics of the empty split (datasets outside the table)
        warnings.filterwarnings("ignore", message=r"std\(\): degrees of freedom")
        model, meta, _ = train_classifier(
            model_name, quiet, cfg, device=device, batch_size=batch_size, seed=seed, ckpt_path=Path(ckpt_path),
            augment=None if augment else Augment(crop=0, flip=False), eval_batch_size=eval_batch_size,
            logger=logger, loader_overrides=loader_overrides or None,
            extra_meta={"augment": augment, **(extra_meta or {})})
    meta["test_acc"] = None
    if test_eval:
        idx = test_indices_without_class(data.test, data.spec.cf)
        loader = make_loader(data, "test", idx, model_name=model_name, batch_size=eval_batch_size, device=device)
        meta["test_acc"] = engine.accuracy_on(model, loader, amp)
        engine.save_checkpoint(ckpt_path, model, meta)
    return model.eval(), meta


def retrain_from_scratch(s: Setup, logger=None) -> tuple[nn.Module, dict]:
    """Train a fresh model on `s.data.retain_idx` only (never on a forget index) with the
    base recipe and seed `s.seed`; re-uses `s.cache_path` when it exists."""
    from models import get_model
    if s.cache_path is not None and Path(s.cache_path).is_file():
        sd, meta = engine.load_checkpoint(s.cache_path)
        model = get_model(s.model_name, s.num_classes).to(s.device)
        engine.load_weights(model, sd, s.cache_path)
        return model.eval(), {**meta, "cached": True}
    tmp = None
    path = s.cache_path
    if path is None:
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        path = Path(tmp.name) / "retrain.pt"
    try:
        model, meta = train_from_scratch(
            s.model_name, s.data, s.base_recipe, device=s.device, seed=s.seed, ckpt_path=path,
            eval_batch_size=s.eval_batch_size, amp=s.amp, loader_overrides=s.loader_overrides,
            extra_meta={"role": "retrain", "n_forget_excluded": len(s.data.forget_idx)},
            test_eval=False, logger=logger)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return model, {**meta, "cached": False}


# --- Boundary Unlearning (Chen et al. 2023) -------------------------------------------

def _pixel_stats(loader):
    if not loader.normalize:
        return None, None
    return loader.mean, 1.0 / loader.inv_std


def fgsm_neighbour_labels(attacker: nn.Module, batch: Batch, bound: float, mean, std) -> torch.Tensor:
    """Labels the frozen original model gives FGSM-perturbed forget images: one signed
    step of size `bound` in [0, 1] pixel space, clamped and rounded to 1/255 (official BS)."""
    x = batch.x.detach()
    pix = x * std + mean if mean is not None else x
    pix = pix.clone().requires_grad_(True)
    inp = (pix - mean) / std if mean is not None else pix
    with torch.enable_grad():
        loss = F.cross_entropy(attacker(inp), batch.y)
        grad, = torch.autograd.grad(loss, pix)
    adv = torch.round(torch.clamp(pix + bound * grad.sign(), 0.0, 1.0) * 255) / 255
    adv = (adv - mean) / std if mean is not None else adv
    with torch.no_grad():
        return attacker(adv).argmax(1)


@register("boundary_shrink", aliases=("BS", "boundary-shrink"), params={"bound": 0.1},
          summary="Boundary Shrink: fine-tune forget images towards the label the original model "
                  "gives their FGSM neighbour (bound 0.1 in pixel space)",
          source="Unlearn-Saliency unlearn/boundary_sh.py (Chen et al. 2023)")
def boundary_shrink(model: nn.Module, s: Setup) -> nn.Module:
    attacker = frozen_copy(model)
    stream = forget_loader(s)
    mean, std = _pixel_stats(stream)
    bound = float(s.params["bound"])

    def loss_fn(m, batch: Batch):
        target = fgsm_neighbour_labels(attacker, batch, bound, mean, std)
        logits = m(batch.x)
        return F.cross_entropy(logits, target), logits, target

    _train(model, s, stream, loss_fn, desc="boundary_shrink")
    return model


@register("boundary_expanding", aliases=("BE", "boundary-expanding"),
          summary="Boundary Expanding: train forget images into an extra shadow class, then "
                  "drop the shadow neuron (the model keeps its C outputs)",
          source="Unlearn-Saliency unlearn/boundary_ex.py (Chen et al. 2023)")
def boundary_expanding(model: nn.Module, s: Setup) -> nn.Module:
    """The official code keeps the widened C+1-way head for evaluation; Boundary Unlearning
    prunes the shadow neuron afterwards, which we do, so checkpoints keep their shape."""
    head = model.head
    shadow_w = nn.Parameter(torch.empty(1, head.in_features, device=head.weight.device))
    nn.init.kaiming_uniform_(shadow_w, a=math.sqrt(5))
    bound = 1 / math.sqrt(head.in_features)
    shadow_b = nn.Parameter(torch.empty(1, device=head.weight.device).uniform_(-bound, bound))
    shadow = torch.full((1,), s.num_classes, dtype=torch.long, device=s.device)

    def loss_fn(m, batch: Batch):
        feats = m.features(batch.x)
        logits = torch.cat([head(feats), F.linear(feats, shadow_w, shadow_b)], dim=1)
        target = shadow.expand(len(batch.y))
        return F.cross_entropy(logits, target), logits[:, :-1], batch.y

    _train(model, s, forget_loader(s), loss_fn, extra_params=(shadow_w, shadow_b),
           desc="boundary_expanding")
    return model


# --- Influence unlearning (WoodFisher) -------------------------------------------------

def _flat_grad(model, params, x, y) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _per_sample_grads(model, params, names, x, y) -> torch.Tensor:
    """len(x) x P matrix of per-sample gradients (eval mode), via torch.func."""
    from torch.func import functional_call, grad, vmap
    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}

    def loss_one(ps, xi, yi):
        out = functional_call(model, ({**frozen, **ps}, buffers), (xi[None],))
        return F.cross_entropy(out, yi[None])

    ps = {n: p.detach() for n, p in zip(names, params)}
    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(ps, x, y)
    return torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)


def _memory_budget(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.4)
    return 2 * 1024 ** 3


@register("iu", aliases=("IU", "wfisher", "influence"), params={"alpha": 10.0, "samples": 1000,
                                                                 "damping": 1.0},
          iterative=False,
          summary="influence unlearning: theta += alpha * F^-1 (g_forget - g_retain), F the "
                  "damped empirical Fisher of `samples` retain samples (Woodbury, exact)",
          source="Unlearn-Saliency unlearn/Wfisher.py (Izzo et al. / Koh & Liang)")
def iu(model: nn.Module, s: Setup) -> nn.Module:
    """The gradient terms follow the official `Wfisher`: v = n_f/(n_f+n_r) (mean forget grad -
    mean retain grad). The official WoodFisher recursion keeps a single vector for every
    H^-1 g_i, so it reduces to v minus a multiple of the first sample's gradient; here
    F = damping * I + (1/n) G^T G over n per-sample retain gradients G is inverted exactly
    with the Woodbury identity (n capped so G fits in memory). The mask, if given, applies
    to the update."""
    alpha, n_req, lam = float(s.params["alpha"]), int(s.params["samples"]), float(s.params["damping"])
    if lam <= 0:
        raise UserError("iu damping must be positive")
    model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    sums = {}
    for key, idx in (("forget", s.data.forget_idx), ("retain", s.data.retain_idx)):
        total, acc = 0, torch.zeros(n_params, device=params[0].device)
        for batch in eval_loader(s, idx):
            acc += _flat_grad(model, params, batch.x, batch.y) * len(batch.y)
            total += len(batch.y)
        sums[key] = (acc, total)
    (gf, nf), (gr, nr) = sums["forget"], sums["retain"]
    v = gf / (nf + nr) - gr * nf / ((nf + nr) * nr)
    n = min(n_req, len(s.data.retain_idx), max(1, _memory_budget(s.device) // (4 * n_params)))
    if n < min(n_req, len(s.data.retain_idx)):
        s.log(f"iu: Fisher from {n} retain samples (memory limit), not {n_req}")
    chunk = max(1, min(256, int(2e8 // n_params)))
    idx = s.data.retain_idx[:n]
    rows = []
    for batch in eval_loader(s, idx):
        for i in range(0, len(batch.y), chunk):
            rows.append(_per_sample_grads(model, params, names, batch.x[i:i + chunk], batch.y[i:i + chunk]))
    G = torch.cat(rows)  # n x P
    # (lam I + G^T G / n)^-1 v = (v - G^T (n lam I + G G^T)^-1 G v) / lam
    gram = G @ G.T
    gram.diagonal().add_(n * lam)
    coeff = torch.linalg.solve(gram.double(), (G @ v).double()).float()
    update = alpha * (v - G.T @ coeff) / lam
    del G, gram
    with torch.no_grad():
        start = 0
        for name, p in zip(names, params):
            step = update[start:start + p.numel()].view_as(p)
            if s.mask is not None:
                step = step * s.mask[name].to(step.device)
            p.add_(step)
            start += p.numel()
    return model


# --- Corrective unlearning (Goel et al. 2024): SCRUB, Bad Teacher, SSD -----------------
# EU-k and CF-k are `retrain` and `ft` with k. On a manipulated training set the forget
# loader carries what the model was trained on (manipulated labels, the trigger), through
# `Setup.loader_overrides`.

class MaxMinStream:
    """SCRUB's schedule as one stream of (tag, batch): while fewer than `max_steps` items have
    been taken, an epoch is one "max" pass over forget then one "min" pass over retain;
    afterwards retain only. len() is the retain pass (the shortest epoch), so engine.fit
    plans enough epochs for its step budget, which counts max and min steps alike."""

    def __init__(self, forget, retain, max_steps: int):
        self.forget, self.retain, self.max_steps = forget, retain, max_steps
        self.taken = 0

    def __len__(self):
        return len(self.retain)

    def set_epoch(self, epoch):
        self.forget.set_epoch(epoch)
        self.retain.set_epoch(epoch)

    def __iter__(self):
        phases = ([("max", self.forget)] if self.taken < self.max_steps else []) + [("min", self.retain)]
        for tag, stream in phases:
            for batch in stream:
                self.taken += 1
                yield tag, batch


@register("scrub", aliases=("SCRUB", "Scrub"), params={"alpha": 0.001, "kd_T": 4.0, "msteps": 100, "k": -1},
          train_defaults={"lr": 0.0025},
          summary="SCRUB, corrective variant: loss CE + alpha * T^2 KL_T(teacher || student); "
                  "while step < msteps each epoch first ascends the whole loss on forget "
                  "(manipulated labels), then descends it on retain",
          source="corrective-unlearning-bench src/methods.py Scrub (Kurmanji et al. 2023)")
def scrub(model: nn.Module, s: Setup) -> nn.Module:
    """The corrective paper's SCRUB maximises CE + KL on the forget set (the original SCRUB
    maximises only the KL). The KL is averaged per sample (batchmean), times T^2."""
    alpha, temp, msteps = float(s.params["alpha"]), float(s.params["kd_T"]), int(s.params["msteps"])
    if alpha < 0 or temp <= 0 or msteps < 0:
        raise UserError("scrub needs alpha >= 0, kd_T > 0 and msteps >= 0")
    teacher = frozen_copy(model)

    def loss_fn(m, item):
        tag, batch = item
        logits = m(batch.x)
        with torch.no_grad():
            target = F.softmax(teacher(batch.x).float() / temp, dim=1)
        kl = F.kl_div(F.log_softmax(logits.float() / temp, dim=1), target, reduction="batchmean")
        loss = F.cross_entropy(logits, batch.y) + alpha * kl * temp * temp
        return (-loss if tag == "max" else loss), logits, batch.y

    _train(model, s, MaxMinStream(forget_loader(s), retain_loader(s), msteps), loss_fn, desc="scrub")
    return model


def random_init_copy(model_name: str, num_classes: int, device, seed: int) -> nn.Module:
    """A freshly initialised model of the same architecture (seeded, no gradients, eval)."""
    from models import get_model
    with torch.random.fork_rng(devices=[]):  # leave the global RNG stream as it was
        torch.manual_seed(seed)
        return frozen_copy(get_model(model_name, num_classes).to(device))


@register("badt", aliases=("BadT", "bad_teacher"), params={"k": -1},
          summary="Bad Teacher: distil the whole training set, S_f from a random-init "
                  "(incompetent) teacher, the rest from the original model (KL, T = 1)",
          source="corrective-unlearning-bench src/methods.py BadT (Chundawat et al. 2023)")
def badt(model: nn.Module, s: Setup) -> nn.Module:
    """The original averages F.kl_div over classes too (reduction='mean', 1/C of the KL);
    here the KL is per sample (batchmean), so learning rates are C times smaller for the
    same step."""
    good = frozen_copy(model)
    bad = random_init_copy(s.model_name, s.num_classes, s.device, s.seed + 7919)
    is_forget = forget_membership(s)

    def loss_fn(m, batch: Batch):
        logits = m(batch.x)
        with torch.no_grad():
            target = F.softmax(good(batch.x).float(), dim=1)
            sel = is_forget[batch.idx]
            if sel.any():
                target[sel] = F.softmax(bad(batch.x[sel]).float(), dim=1)
        loss = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
        return loss, logits, batch.y

    _train(model, s, union_loader(s), loss_fn, desc="badt")
    return model


def ssd_importance(model: nn.Module, loader, params: list[torch.Tensor], amp: bool = False) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean cross-entropy (eval mode)."""
    sums = [torch.zeros_like(p) for p in params]
    batches = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for batch in loader:
        with engine.autocast(device, amp):
            loss = F.cross_entropy(model(batch.x), batch.y)
        for acc, g in zip(sums, torch.autograd.grad(loss, params)):
            acc += g.float().pow(2)
        batches += 1
    model.train(was_training)
    return [acc / max(1, batches) for acc in sums]


@torch.no_grad()
def ssd_dampen(params: list[torch.Tensor], imp_forget: list[torch.Tensor], imp_retain: list[torch.Tensor],
               dampening: float, select_weight: float, masks: list[torch.Tensor] | None = None) -> int:
    """Selective synaptic dampening in place: where I_f > alpha * I_D, theta *= min(lambda *
    I_D / I_f, 1); every other coordinate is left bit-identical. Returns how many were selected."""
    selected = 0
    for i, (p, i_f, i_d) in enumerate(zip(params, imp_forget, imp_retain)):
        sel = i_f > select_weight * i_d  # implies I_f > 0
        if masks is not None:
            sel &= masks[i]
        if not sel.any():
            continue
        beta = (dampening * i_d / torch.where(sel, i_f, torch.ones_like(i_f))).clamp(max=1.0)
        p.copy_(torch.where(sel, p * beta.to(p.dtype), p))
        selected += int(sel.sum())
    return selected


_IMPORTANCE_CACHE: dict = {}  # key -> (objects kept alive for the key's ids, result)


def _importances(model, s: Setup, params, names, amp):
    """(I_f, I_D) on the forget and retain streams. Settings of one grid share the same
    importances: they are cached for the same weights, data, seed and loader overrides (the
    entry holds the data objects, so their ids cannot be reused while it lives)."""
    h = hashlib.sha1()
    for n, p in zip(names, params):
        h.update(n.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    for idx in (s.data.forget_idx, s.data.retain_idx):
        h.update(idx.cpu().numpy().tobytes())
    key = (h.hexdigest(), id(s.data), id(s.loader_overrides.get("labels")),
           id(s.loader_overrides.get("stamp_mask")), s.seed, s.batch_size, s.augment, bool(amp))
    if key in _IMPORTANCE_CACHE:
        return _IMPORTANCE_CACHE[key][1]
    result = (ssd_importance(model, forget_loader(s, salt=11), params, amp),
              ssd_importance(model, retain_loader(s, salt=12), params, amp))
    while len(_IMPORTANCE_CACHE) >= 4:
        _IMPORTANCE_CACHE.pop(next(iter(_IMPORTANCE_CACHE)))
    _IMPORTANCE_CACHE[key] = ((s.data, s.loader_overrides.get("labels"), s.loader_overrides.get("stamp_mask")),
                              result)
    return result


@register("ssd", aliases=("SSD",), params={"SSDdampening": 1.0, "SSDselectwt": 10.0, "k": -1},
          iterative=False,
          summary="Selective Synaptic Dampening: importances I = mean squared gradient on forget "
                  "(I_f) and retain (I_D); where I_f > SSDselectwt * I_D, theta *= "
                  "min(SSDdampening * I_D / I_f, 1); no training",
          source="corrective-unlearning-bench src/methods.py SSD (Foster et al. 2024)")
def ssd(model: nn.Module, s: Setup) -> nn.Module:
    """As the corrective paper: I_D on the retain set (the original SSD uses the whole
    training set), gradients with the training augmentation, every parameter tensor
    including BatchNorm's, exponent 1. k restricts it to the last k layers (the original
    crashes for k != -1); a saliency mask, if given, restricts it further."""
    lam, alpha = float(s.params["SSDdampening"]), float(s.params["SSDselectwt"])
    if lam <= 0 or alpha <= 0:
        raise UserError(f"ssd needs SSDdampening > 0 and SSDselectwt > 0, got {lam} and {alpha}")
    params, _ = _trainable(model, int(s.params["k"]))
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    amp = engine.resolve_amp(s.amp, torch.device(s.device))
    imp_f, imp_d = _importances(model, s, params, names, amp)
    masks = None if s.mask is None else [s.mask[n].to(p.device) for n, p in zip(names, params)]
    selected = ssd_dampen(params, imp_f, imp_d, lam, alpha, masks)
    s.log(f"ssd: dampened {selected} of {sum(p.numel() for p in params)} parameters")
    model.eval()
    return model


__all__ = ["Setup", "Method", "METHODS", "ALIASES", "register", "resolve", "unlearn",
           "method_params", "method_names", "saliency_mask", "mask_from_scores", "save_mask",
           "load_mask", "mask_fraction", "MaskConstraint", "mask_constraint", "retrain_from_scratch",
           "train_from_scratch", "base_recipe_config",
           "Paired", "RandomLabels", "frozen_copy", "train_loader", "forget_loader",
           "retain_loader", "union_loader", "eval_loader", "MaxMinStream", "ssd_importance",
           "ssd_dampen", "random_init_copy"]

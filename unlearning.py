"""How an unlearning method is written and run: its `Setup`, the registry, the data streams
and the one loop.

Every method is a function `fn(model, setup) -> model` registered with `@register` under
its canonical name (plus aliases and its hyper-parameters with defaults). `model` is the
original (trained) model, modified in place unless the method builds a new one; `setup`
carries the data (forget / retain / validation indices), the optimisation settings (one
`engine.TrainConfig`), the saliency mask, the method's hyper-parameters and the view of the
training set the model was trained on. Iterative methods differ only in their data stream,
their loss and which parameters move; all of them train through `engine.fit` (`train`).

Adding a method: write `def name(model, s: Setup) -> nn.Module`, decorate it with
`@register("name", aliases=("Name",), params={"alpha": 0.001, ...}, summary=..., source=...)`,
and build its stream and loss with the helpers here (`forget_loader`, `retain_loader`,
`Paired`, `train`, `frozen_copy`). The forget stream carries what the model saw at training
time (manipulated labels, the trigger) through `Setup.view`. What the loss, hooks or stream
keep from step to step (a random-label generator, a counter: anything with `state_dict` /
`load_state_dict`) goes to `train(..., state=(...))`: a run resumed after an interruption
(`Setup.resume_path`) then gets it back and ends as if never interrupted.

The methods themselves: `methods.py` (the SalUn paper's comparison), `corrective.py` (SCRUB,
Bad Teacher, SSD); both register here and are loaded on first lookup.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
from constants import UserError
from datasets import Batch
from models import last_k_blocks
from saliency import mask_constraint
from training import PreparedData, make_loader
from views import TrainingView

# ============================================================================ the setup

# The official SalUn unlearning optimiser: the defaults of every unlearning run, written once.
UNLEARN_DEFAULTS = engine.TrainConfig(epochs=10, lr=0.01, batch_size=256, optimizer="sgd",
                                      momentum=0.9, weight_decay=5e-4, schedule="constant",
                                      warmup=0.0, augment=True)


@dataclass
class Setup:
    """What an unlearning method gets besides the model."""

    data: PreparedData
    model_name: str
    device: torch.device | str = "cpu"
    seed: int = 0
    train: engine.TrainConfig = field(default_factory=lambda: dataclasses.replace(UNLEARN_DEFAULTS))
    # what may move
    mask: dict[str, torch.Tensor] | None = None  # name -> bool (True = may change)
    params: dict = field(default_factory=dict)  # the method's hyper-parameters
    # retrain (k = -1): the base model's recipe and what names its cached result
    base: engine.TrainConfig | None = None
    cache_key: dict | None = None
    # the training set as the model saw it (manipulated labels, stamps, replaced images)
    view: TrainingView | None = None
    eval_batch_size: int = 1024
    log: Callable[[str], None] = print
    # where the run's training state is kept after every epoch and resumed from (engine.fit),
    # so a run killed or requeued mid-way goes on from its last epoch; None: not kept
    resume_path: Path | None = None

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def train_config(self, **overrides) -> engine.TrainConfig:
        return dataclasses.replace(self.train, **overrides)


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


METHOD_MODULES = ("methods", "corrective")  # where the registered methods are defined


def _load_methods() -> None:
    for module in METHOD_MODULES:  # registration happens on import
        importlib.import_module(module)


def resolve(name: str) -> tuple[Method, dict]:
    """(method, fixed hyper-parameters) for a name or alias.

    Exact names and aliases win (`rl` is DeepDive's RL, `RL` the official one = rl_split;
    `ga` / `GA` likewise); otherwise the match is case-insensitive, and a spelling that
    could mean two methods is refused."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("method must be a non-empty string")
    _load_methods()
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
    _load_methods()
    return sorted(METHODS)


def method_help() -> str:
    _load_methods()
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
    `setup.params` may hold only the method's own hyper-parameters. engine.Diverged when the
    result holds NaN or infinite weights (one-shot methods included)."""
    method, _ = resolve(name)
    setup.params = method_params(name, setup.params)
    if method.needs_forget and len(setup.data.forget_idx) == 0:
        raise UserError(f"{method.name} needs a non-empty forget set")
    if method.forces_mask and setup.mask is None:
        raise UserError(f"{method.name} needs a saliency mask: compute one with saliency_mask()")
    model = method.fn(model, setup)
    engine.check_finite(model, f"{method.name}: the unlearned model diverged")
    return model


# ============================================================================ data streams

def train_loader(s: Setup, indices: torch.Tensor, salt: int, *, batch_size: int | None = None,
                 shuffle: bool = True, augment: bool | None = None):
    """A training stream over `indices` of the train split (shuffled, augmented per setup),
    through the setup's view of the training set (manipulated labels, stamps)."""
    on = s.train.augment if augment is None else augment
    loader = make_loader(s.data, "train", indices, model_name=s.model_name,
                         batch_size=batch_size or s.train.batch_size, device=s.device, train=True,
                         seed=s.seed * 1000 + salt, augment=dataclasses.replace(s.train, augment=on).augmentation(),
                         view=s.view)
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
                       batch_size=s.eval_batch_size, device=s.device, view=s.view)


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

    # the generator's position: a resumed run draws the labels the uninterrupted one would
    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


class Relabelled:
    """A stream whose batches carry fresh random labels (RandomLabels), drawn as each batch
    is handed out, in the order the loss drew them before: the step itself stays the plain
    cross-entropy step, which fit can replay as one CUDA graph. `only`: a boolean membership
    over the training set; then only its members are relabelled (DeepDive's RL)."""

    def __init__(self, stream, relabel: RandomLabels, only: torch.Tensor | None = None):
        self.stream, self.relabel, self.only = stream, relabel, only

    def __len__(self):
        return len(self.stream)

    def set_epoch(self, epoch):
        self.stream.set_epoch(epoch)

    def __iter__(self):
        for batch in self.stream:
            y = self.relabel(len(batch.y))
            if self.only is not None:
                y = torch.where(self.only[batch.idx], y, batch.y)
            yield batch._replace(y=y)


class StepCount:
    """Optimizer steps a method counts itself (salun_soft's decaying share), kept in the
    resume state."""

    def __init__(self):
        self.n = 0

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["n"])


class Carried:
    """What a method's training depends on besides the model and the optimizer: parameters
    outside the model (Boundary Expanding's shadow neuron) and stateful parts of its loss,
    hooks or stream (`state_dict` / `load_state_dict`); engine.fit's `extra_state`."""

    def __init__(self, params, parts):
        self.params, self.parts = list(params), list(parts)

    def state_dict(self) -> dict:
        return {"params": [p.detach().cpu() for p in self.params],
                "parts": [part.state_dict() for part in self.parts]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if len(state["params"]) != len(self.params) or len(state["parts"]) != len(self.parts):
            raise ValueError("the saved state is of another method")
        for p, saved in zip(self.params, state["params"]):
            p.copy_(saved)
        for part, saved in zip(self.parts, state["parts"]):
            part.load_state_dict(saved)


# ============================================================================ the loop

def trainable(model: nn.Module, k: int):
    """(parameters to optimise, modules to keep frozen in eval mode) for the last k layers."""
    if k == -1:
        return [p for p in model.parameters() if p.requires_grad], []
    units = last_k_blocks(model, k)
    chosen = {id(m) for _, m in units}
    frozen = [m for _, m in model.blocks() if id(m) not in chosen]
    params = [p for _, m in units for p in m.parameters()]
    return params, frozen


def train(model: nn.Module, s: Setup, stream, loss_fn, *, extra_params=(), state=(),
          after_step: Callable | None = None, desc: str = "unlearn", **cfg_overrides) -> list[dict]:
    """Every iterative method trains here: the setup's optimiser on `stream` with `loss_fn`,
    only the last k layers when `k` is set, under the saliency mask when one is given.
    `state`: the objects the loss, hooks or stream keep from step to step (random-label
    generators, counters), saved with `extra_params` in the run's resume state
    (`Setup.resume_path`) so that a resumed run gives the uninterrupted run's numbers."""
    cfg = s.train_config(**cfg_overrides)
    params, frozen = trainable(model, int(s.params.get("k", -1)))
    if loss_fn is cross_entropy and not frozen:
        # the engine's default loss without smoothing is this one, and lets fit replay the
        # step as one CUDA graph (engine.GraphedStep)
        loss_fn, cfg = None, dataclasses.replace(cfg, label_smoothing=0.0)
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
            after_backward, step_hook = None, after_step
            if constraint is not None:  # device work only: a CUDA graph may hold it
                after_backward = engine.graph_safe(constraint.mask_grads)
                step_hook = restore_after(after_step, constraint)
            return engine.fit(model, stream, cfg, loss_fn=loss_fn, params=list(params) + list(extra_params),
                              after_backward=after_backward, after_step=step_hook, resume_path=s.resume_path,
                              extra_state=Carried(extra_params, state), desc=desc)
    finally:
        for p in still:
            p.requires_grad_(True)


def restore_after(after_step: Callable | None, constraint) -> Callable:
    """The step hook under a saliency mask: the method's own hook, then the restore (last:
    the hard constraint wins)."""
    if after_step is None:
        return engine.graph_safe(constraint.restore)

    def step_hook(m):
        after_step(m)
        constraint.restore(m)
    return step_hook


def frozen_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with no gradients (the original model as a teacher / attacker)."""
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


# ============================================================================ losses

def cross_entropy(model, batch: Batch):
    logits = model(batch.x)
    return F.cross_entropy(logits, batch.y), logits, batch.y

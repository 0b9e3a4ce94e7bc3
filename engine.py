"""The one training loop, evaluation, and checkpoints.

Methods differ in their data stream, their loss and which parameters move; all of them
train through `fit`. A stream is anything with `__len__`, `set_epoch(e)` and `__iter__`
(a `datasets.BatchLoader`, or a `Chain` / `Concat` of them); `loss_fn(model, item)` turns
one item into `(loss, logits, labels)` (logits/labels may be None when accuracy means
nothing). On CUDA the default-loss step, with hooks marked `graph_safe`, is replayed as one
CUDA graph (`GraphedStep`), which is why a method whose loss is plain cross-entropy passes
none (unlearning.train does that for it).
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from constants import DATASETS, UserError, canonical_dataset_name
from datasets import Augment
from models import canonical_model_name
from storage import read_plain, save_torch


@dataclass
class TrainConfig:
    """How to train: the one description every script, method and cache key uses."""

    epochs: int = 10
    steps: int | None = None  # an iteration budget; overrides epochs when set
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # cosine | multistep | linear | constant
    milestones: tuple[int, ...] = ()  # epochs, for multistep
    gamma: float = 0.1
    warmup: float = 0.0  # linear warm-up, as a fraction of all steps
    final_lr_frac: float = 0.0  # where `linear` decays to
    augment: bool = True  # random crop + horizontal flip of the training stream
    label_smoothing: float = 0.0  # of the default cross-entropy loss
    grad_clip: float | None = None
    train_mode: bool = True  # False keeps BatchNorm/dropout in eval mode while training
    # how to run it, not what is trained: left out of experiment files and cache keys
    amp: bool | None = None  # bf16 autocast; None = on for CUDA, off for CPU
    channels_last: bool | None = None  # None = on for CUDA
    compile: bool = False
    cuda_graph: bool = True  # replay the step as one CUDA graph where it allows it (GraphedStep)
    log_every: int = 50

    RUNTIME: ClassVar[tuple[str, ...]] = ("amp", "channels_last", "compile", "cuda_graph", "log_every")
    SCHEDULES: ClassVar[tuple[str, ...]] = ("cosine", "multistep", "linear", "constant")
    OPTIMIZERS: ClassVar[tuple[str, ...]] = ("sgd", "adam")

    def plain(self) -> dict:
        d = asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    @classmethod
    def recipe_fields(cls) -> list[str]:
        """The fields that say what is trained (everything but RUNTIME)."""
        return [f.name for f in fields(cls) if f.name not in cls.RUNTIME]

    def augmentation(self) -> Augment:
        """The stream's augmentation: crop + flip, or none."""
        return Augment() if self.augment else Augment(crop=0, flip=False)


def make_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD or Adam over the parameters that require a gradient; torch's default (foreach)
    implementation, or with `fused` its one-kernel update, which a CUDA graph needs (it reads
    a tensor learning rate without a sync). Alone it bought nothing on an H200 (a bare
    ResNet-18 step 10.52 ms fused, 10.20 ms foreach; docs/gpu.md), so only the graph uses it."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter requires a gradient")
    kind = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, **kind)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kind)
    raise UserError(f"unknown optimizer '{cfg.optimizer}': choose sgd or adam")


def lr_multiplier(cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Per-step multiplier of the base learning rate (warm-up, then the schedule)."""
    warm = int(cfg.warmup * total_steps)

    def at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.schedule == "linear":
            return 1 - (1 - cfg.final_lr_frac) * t
        if cfg.schedule == "multistep":
            epoch = step // max(1, steps_per_epoch)
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.schedule == "constant":
            return 1.0
        raise UserError(f"unknown schedule '{cfg.schedule}': choose cosine, multistep, linear or constant")

    at(0)  # validate the name before training starts
    return at


def cross_entropy_loss(model: nn.Module, batch, label_smoothing: float = 0.0):
    logits = model(batch.x)
    return F.cross_entropy(logits, batch.y, label_smoothing=label_smoothing), logits, batch.y


class Chain:
    """Several streams one after the other each epoch, items tagged: (tag, batch)."""

    def __init__(self, **streams):
        self.streams = streams

    def __len__(self):
        return sum(len(s) for s in self.streams.values())

    def set_epoch(self, epoch):
        for s in self.streams.values():
            s.set_epoch(epoch)

    def __iter__(self):
        for tag, stream in self.streams.items():
            for batch in stream:
                yield tag, batch


class Concat(Chain):
    """Several streams one after the other each epoch, untagged: for a loss that does not
    ask where a batch came from (then fit may graph the step)."""

    def __iter__(self):
        for _tag, batch in super().__iter__():
            yield batch


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, enabled: bool, cache: bool = True):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache)


def resolve_amp(cfg_amp: bool | None, device: torch.device) -> bool:
    return device.type == "cuda" if cfg_amp is None else cfg_amp


def fit(model: nn.Module, stream, cfg: TrainConfig, *, loss_fn: Callable | None = None,
        params=None, after_backward: Callable | None = None, after_step: Callable | None = None,
        evaluate: Callable[[nn.Module, int], dict] | None = None,
        resume_path: str | Path | None = None, extra_state=None,
        on_epoch_end: Callable[[int, dict], None] | None = None, desc: str = "train") -> list[dict]:
    """Train `model` in place. Returns the per-epoch history.

    `loss_fn(model, item) -> (loss, logits, labels)`; default: cross-entropy with the config's
    label smoothing. `after_backward(model)` runs after backward (gradient masks), `after_step(model)` after
    each optimizer step (projections, restoring frozen weights). With `resume_path`, the
    full training state is saved there after every epoch and picked up on the next call;
    the loader replays epochs by seed, so a resumed run ends bit-identical on CPU.
    `extra_state` (anything with `state_dict()` / `load_state_dict()`) is what else the run
    depends on that the model and optimizer do not hold (a random-label generator, a step
    counter, parameters outside the model): saved and restored with the resume state.
    A NaN or infinite loss or weight raises `Diverged`, checked where the loop waits for
    the device anyway (every `log_every` steps, and at the end of each epoch before the
    weights are evaluated or saved): no extra sync per step. On CUDA the default-loss step
    (with no hooks, or `graph_safe` ones) is replayed as one CUDA graph (GraphedStep;
    `cfg.cuda_graph=False` keeps it eager); the numbers are the eager loop's.
    """
    given_loss = loss_fn
    if loss_fn is None:
        loss_fn = functools.partial(cross_entropy_loss, label_smoothing=cfg.label_smoothing)
    device = _device_of(model)
    amp = resolve_amp(cfg.amp, device)
    channels_last = device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    if channels_last:
        model.to(memory_format=torch.channels_last)
    forward_model = model
    if distributed.world_size() > 1:  # gradients averaged across ranks by DDP
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    graphs = graph_allowed(cfg, device, loss_fn=given_loss, hooks=(after_backward, after_step))
    optimizer = make_optimizer(model.parameters() if params is None else params, cfg, fused=graphs)
    steps_per_epoch = len(stream)
    if steps_per_epoch == 0:
        raise UserError("the training set is empty: check the subset and forget options")
    total_steps = cfg.steps if cfg.steps else cfg.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg, steps_per_epoch, total_steps))
    history, start_epoch, step = [], 0, 0
    if resume_path is not None and Path(resume_path).is_file():
        state = load_resume_state(resume_path, model, optimizer, scheduler, extra_state)
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    graphed = GraphedStep(forward_model, optimizer, loss_fn, amp, trainable, cfg.grad_clip,
                          channels_last, hooks=(model, after_backward, after_step)) if graphs else None

    for epoch in range(start_epoch, epochs):
        model.train(cfg.train_mode)
        stream.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = torch.zeros((), device=device, dtype=torch.long)
        n_items = 0
        t0 = time.perf_counter()
        bar = tqdm(stream, total=min(steps_per_epoch, total_steps - step),
                   desc=f"{desc} {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for item in bar:
            if graphed is not None and graphed.fits(item):
                loss, logits, labels = graphed(item)  # after_step is in the graph
                scheduler.step()
            else:
                if channels_last:
                    item = _to_channels_last(item)
                with graphed.warming() if graphed is not None else contextlib.nullcontext():
                    # the graph's autocast keeps no cast cache; so do its warm-up steps, lest
                    # torch.compile meet a new autocast state, and recompile, while capturing
                    with autocast(device, amp, cache=graphed is None):
                        loss, logits, labels = loss_fn(forward_model, item)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if after_backward is not None:
                        after_backward(model)
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    optimizer.step()
                scheduler.step()
                if after_step is not None:
                    after_step(model)
            loss_sum += loss.detach().float()
            n_items += 1
            if logits is not None:
                correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
            step += 1
            if step % cfg.log_every == 0:  # the only host-device sync inside the epoch
                running = loss_sum.item() / n_items
                _check_loss(running, f"{desc}: training diverged at step {step} (epoch {epoch + 1})")
                bar.set_postfix(loss=f"{running:.3f}")
            if step >= total_steps:
                break
        sync(device)
        distributed.sync_buffers(model)
        train_loss = loss_sum.item() / max(1, n_items)
        where = f"{desc}: training diverged in epoch {epoch + 1}"
        _check_loss(train_loss, where)  # the sum holds every step's loss: one NaN is enough
        check_finite(model, where)  # before the weights are evaluated or saved to resume from
        record = {"epoch": epoch + 1, "step": step, "lr": float(scheduler.get_last_lr()[0]),
                  "train_loss": train_loss, "epoch_seconds": time.perf_counter() - t0}
        if seen.item():
            record["train_acc"] = 100.0 * correct.item() / seen.item()
        if evaluate is not None:
            record.update(evaluate(model, epoch + 1))
        history.append(record)
        tqdm.write(f"{desc} epoch {epoch + 1}/{epochs}: " +
                   ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                             if isinstance(v, float) and k != "lr"))
        if resume_path is not None and distributed.is_main():
            save_resume_state(resume_path, model, optimizer, scheduler, epoch + 1, step, history, extra_state)
        distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if step >= total_steps:
            break
    model.eval()
    return history


def graph_allowed(cfg: TrainConfig, device: torch.device, *, loss_fn, hooks) -> bool:
    """Whether fit may replay its step as a CUDA graph: on CUDA, one process, for the default
    loss with fused SGD, and hooks only where marked `graph_safe`. Under `compile` the graph
    holds the compiled kernels (compiled during the eager warm-up steps). A method's own
    loss or other hooks may draw random labels, count steps in Python or wait for the
    device, none of which a graph replays."""
    return (cfg.cuda_graph and device.type == "cuda" and loss_fn is None
            and all(h is None or getattr(h, "graph_safe", False) for h in hooks)
            and cfg.optimizer == "sgd" and distributed.world_size() == 1)


def graph_safe(hook: Callable) -> Callable:
    """`hook`, marked as one a CUDA graph may capture and replay: it launches device work
    only, the same every step (no host sync, no Python state that changes from step to step,
    no new tensors kept across steps). SalUn's mask hooks are (saliency.MaskConstraint)."""
    @functools.wraps(hook)
    def marked(model):
        return hook(model)
    marked.graph_safe = True
    return marked


class GraphedStep:
    """Forward, loss, backward, gradient clipping and the optimizer step (with fit's hooks
    where they are `graph_safe`: SalUn's mask), captured once in a CUDA graph and replayed
    for every batch of the captured shape (a smaller last batch runs eagerly). A model this
    small can leave a GPU waiting for the host: ResNet-18 at batch 512 on an H200 launched
    457 kernels from ~1,300 host-side calls a step, and the GPU was busy 69 % of it on one
    host (docs/gpu.md); one replay instead takes the step to its kernels' time whatever the
    host (91 % busy; on a faster host the eager step had matched it).

    The first WARMUP steps run eagerly (cuDNN picks its kernels, the momentum buffers come
    to exist); then the step is captured. The learning rate becomes a device tensor that the
    captured (fused) SGD step reads and the schedule fills in place. Should the capture fail,
    training goes on eagerly, saying so once.
    """

    WARMUP = 3

    def __init__(self, model, optimizer, loss_fn, amp: bool, params, grad_clip: float | None,
                 channels_last: bool, hooks=(None, None, None)):
        self.model, self.optimizer, self.loss_fn, self.amp = model, optimizer, loss_fn, amp
        self.owner, self.after_backward, self.after_step = hooks  # graph_safe hooks, on the bare model
        self.params, self.grad_clip, self.channels_last = params, grad_clip, channels_last
        self.graph, self.failed, self.eager_steps, self.side, self.shape = None, False, 0, None, None

    def fits(self, item) -> bool:
        """Whether `item` is replayed (the step is captured when its time has come)."""
        if self.failed or not all(hasattr(item, a) for a in ("x", "y", "_replace")):
            return False
        if self.graph is None:  # captured on a batch of the first one's (the full) size
            self.shape = self.shape or (item.x.shape, item.y.shape)
            return (self.eager_steps >= self.WARMUP and (item.x.shape, item.y.shape) == self.shape
                    and self._capture(item))
        return item.x.shape == self.x.shape and item.y.shape == self.y.shape

    @contextlib.contextmanager
    def warming(self):
        """An eager step: before the capture on a side stream, as CUDA graphs want their
        warm-up (the default stream waits for it after)."""
        if self.graph is not None or self.failed:
            yield
            return
        self.eager_steps += 1
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def __call__(self, item):
        self.x.copy_(item.x)
        self.y.copy_(item.y)
        self.graph.replay()
        return self.out

    def step(self):
        """What the graph holds: one training step on the static batch."""
        with autocast(self.x.device, self.amp, cache=False):
            out = self.loss_fn(self.model, self.item)
        out[0].backward()
        if self.after_backward is not None:
            self.after_backward(self.owner)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.owner)
        return out

    def _capture(self, item) -> bool:
        memory = torch.channels_last if self.channels_last and item.x.dim() == 4 else torch.contiguous_format
        self.x = item.x.clone(memory_format=memory)
        self.y = item.y.clone()
        device = self.x.device
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.item = item._replace(x=self.x, y=self.y)
        torch.cuda.synchronize(device)
        self.optimizer.zero_grad(set_to_none=True)  # the gradients live in the graph's memory
        graph = torch.cuda.CUDAGraph()
        try:
            out = capture(graph, self.step)
        except Exception as e:  # training must go on: eagerly, as without a GPU graph
            self.failed = True
            for group in self.optimizer.param_groups:
                group["lr"] = float(group["lr"])
            self.optimizer.zero_grad(set_to_none=True)
            tqdm.write(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       "the step runs eagerly")
            return False
        self.graph, self.out = graph, out
        return True


def capture(graph, step: Callable):
    """Record what `step()` launches into `graph` (recorded, not run) and return its outputs,
    the tensors every replay writes to."""
    # thread_local: a DataLoader's pin-memory thread may call CUDA meanwhile, harmlessly
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        return step()


class Diverged(UserError):
    """A loss or the weights became NaN or infinite. A single run stops with one error line
    (and saves nothing as finished); in an experiment list the run is recorded as diverged
    and the list goes on (runner.py)."""


def _check_loss(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise Diverged(f"{where}: the loss became {loss}; lower the learning rate")


def nonfinite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or inf, or None (one sync)."""
    named = [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
    if not named:
        return None
    bad = torch.nonzero(~torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()).flatten()
    return named[int(bad[0])][0] if len(bad) else None


def check_finite(model: nn.Module, where: str) -> None:
    """Raise Diverged when any weight or buffer of `model` is NaN or infinite."""
    name = nonfinite_tensor(model)
    if name is not None:
        raise Diverged(f"{where}: {name} holds NaN or infinite values; lower the learning rate")


def _to_channels_last(item):
    if hasattr(item, "_replace") and hasattr(item, "x"):
        return item._replace(x=item.x.contiguous(memory_format=torch.channels_last))
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], _to_channels_last(item[1])
    return item


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict(model: nn.Module, loader, amp: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits float32, labels) on the CPU for every sample of the loader, in loader order."""
    device = _device_of(model)
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with autocast(device, resolve_amp(amp, device)):
        for batch in loader:
            logits.append(model(batch.x).float())
            labels.append(batch.y)
    model.train(was_training)
    if not logits:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def accuracy_on(model: nn.Module, loader, amp: bool | None = None) -> float:
    logits, labels = predict(model, loader, amp)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")


# --- Checkpoints: state_dict + plain metadata, loaded with weights_only=True ---------------

def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_torch({"state_dict": state, "meta": meta}, Path(path))


def load_checkpoint(path: str | Path, *, dataset: str | None = None,
                    model: str | None = None) -> tuple[dict, dict]:
    """(state_dict, meta): the one checkpoint reader. Accepts our format, `{"net": ...}`
    (I-BAU release), `{"state_dict": ...}`/`{"model": ...}` (SalUn code) and bare
    state_dicts. With `dataset` / `model`: refused when its meta names another (check_meta)."""
    path = Path(path)
    blob = read_plain(path, "checkpoint")
    if not isinstance(blob, dict):
        raise UserError(f"checkpoint {path} does not hold a state_dict")
    for key in ("state_dict", "net", "model"):
        if isinstance(blob.get(key), dict):
            meta = blob.get("meta") or {k: v for k, v in blob.items()
                                        if k != key and isinstance(v, (int, float, str, dict))}
            return _strip_prefix(blob[key]), check_meta(meta, path, dataset, model)
    if all(isinstance(v, torch.Tensor) for v in blob.values()):
        return _strip_prefix(blob), {}
    raise UserError(f"checkpoint {path} holds no state_dict (keys: {', '.join(list(blob)[:6])})")


def check_meta(meta, path: Path, dataset: str | None = None, model: str | None = None) -> dict:
    """The checkpoint's meta, refused where it contradicts the dataset or model it is used
    with (a CIFAR-100 or SVHN model is no CIFAR-10 model, whatever its head's size)."""
    if not isinstance(meta, dict):
        raise UserError(f"checkpoint {path}: its meta is a {type(meta).__name__}, not a dict")
    said = meta.get("dataset")
    if dataset and said and canonical_dataset_name(str(said)) != canonical_dataset_name(dataset):
        raise UserError(f"checkpoint {path} was trained on {said}, not {dataset}: use a {dataset} "
                        f"checkpoint, or set the dataset to {said}")
    said = meta.get("model")
    if model and said and canonical_model_name(str(said)) != canonical_model_name(model):
        raise UserError(f"checkpoint {path} holds a {said}, not a {model}: set the model to "
                        f"{said}, or use a {model} checkpoint")
    info = DATASETS.get(canonical_dataset_name(dataset)) if dataset else None
    if info and meta.get("num_classes") not in (None, info.num_classes):
        raise UserError(f"checkpoint {path} has {meta['num_classes']} classes, {dataset} "
                        f"{info.num_classes}: use a {dataset} checkpoint")
    return meta


def _strip_prefix(sd: dict) -> dict:
    # torch.compile and DataParallel prefix parameter names; checkpoints must not care.
    for prefix in ("_orig_mod.", "module."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, state_dict: dict, path: str | Path = "checkpoint") -> None:
    """load_state_dict with a one-line error naming what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch at {wrong[0]} ({tuple(state_dict[wrong[0]].shape)} "
                         f"in file, {tuple(own[wrong[0]].shape)} in model)")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise UserError(f"{path} does not fit this model: {'; '.join(parts)}; "
                        "check --model, --dataset and the number of classes")
    model.load_state_dict(state_dict)


def save_resume_state(path, model, optimizer, scheduler, epoch, step, history, extra=None) -> None:
    save_torch({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step,
                 "history": history, "rng": torch.get_rng_state(),
                 "extra": None if extra is None else extra.state_dict()}, Path(path))


def load_resume_state(path, model, optimizer, scheduler, extra=None) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # saved from a CUDA graph's step: a tensor
            group["lr"] = float(group["lr"])
        scheduler.load_state_dict(state["scheduler"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
    except Exception as e:
        raise UserError(f"cannot resume from {path} ({str(e).splitlines()[0][:160]}); "
                        "delete it to start over") from None
    torch.set_rng_state(state["rng"])
    tqdm.write(f"resuming from {path} after epoch {state['epoch']}")
    return state

"""Backdoor defences of a poisoned model with a small clean set: I-BAU's driver over rounds
(the algorithm itself is ibau.py), fine-tuning, and fine-pruning; and what they run on and
are measured by: the poisoned model (our checkpoints or the I-BAU release's files), the
clean and evaluation images, and the Evaluator. defense.py is the command line over it.

Every function takes its settings as parameters: IBAUConfig for I-BAU, an engine.TrainConfig
(FineTuneConfig.recipe) for fine-tuning. The dataclasses' field defaults are defense.py's.
"""
from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn

import engine
import ibau
import plotting
from attacks import ATTACKS, BackdoorEval, BadNets, load_release_trigger, make_trigger
from constants import UserError, canonical_dataset_name
from datasets import (Augment, BatchLoader, Split, balanced_subset, dataset_info, load_split,
                      read_index_json)
from metrics import defense_effectiveness_rate
from models import canonical_model_name, expects_normalized, get_model

RELEASE_NAME = re.compile(r"(?:^|_)(badnets|trojan_sq|trojan_wm|l0_inv|l2_inv)_(\d+)_")


@dataclass(frozen=True)
class IBAUConfig:
    """I-BAU's settings. The outer optimiser, its learning rate and the batch size are also
    the baselines' (FineTuneConfig.recipe)."""

    rounds: int = 5
    K: int = 5  # fixed-point iterations of the hypergradient
    optimizer: str = "adam"  # outer, over the weights: adam | sgd (momentum 0.9)
    lr: float = 0.001
    # the outer learning rate halves after every lr_half_life outer steps (0: constant, the
    # release). 50 steps is one round at the defaults (5,000 images in batches of 100), so all
    # later rounds together move the weights at most as far as the first, and more rounds do
    # not drift the backdoor back (at a constant rate they did, docs/ibau.md)
    lr_half_life: int = 50
    batch_size: int = 100
    # share of each outer batch that gets δ: the release's 0.01 (one image in 100) makes the
    # outer step's unlearning signal one image's, and the round's outcome a coin toss
    perturb_frac: float = 0.05
    min_perturbed: int = 1  # the release: 0, so batches under 100 images get no δ
    delta_lr: float = 10.0
    delta_optimizer: str = "sgd"  # sgd (the release) | adam (its GTSRB notebook)
    # L2 bound on δ in [0, 1] pixels (0 = unbounded, the release's defense.py); the
    # release's notebooks, which produced its published numbers, use 10
    radius: float = 10.0
    # end: fit δ unbounded, scale it onto the ball once; step: project after every step;
    # auto: whichever works for the model it is given (resolve_projection)
    projection: str = "auto"
    clamp: bool = False  # keep x+δ in the valid pixel range
    delta_space: str = "pixel"  # pixel: [0, 1] pixels for every model; input: the model's input


@dataclass(frozen=True)
class FineTuneConfig:
    """The fine-tuning and fine-pruning baselines' own settings."""

    epochs: int = 10
    augment: bool = True  # random crop (4 px) and flip (no flip on GTSRB)
    prune_acc_drop: float = 5.0  # fine-pruning: clean-set accuracy points the pruning may cost
    prune_max: float = 0.95  # fine-pruning: largest pruned share of the last conv's channels

    def recipe(self, optimizer: str, lr: float, batch_size: int,
               amp: bool | None = None) -> engine.TrainConfig:
        """engine.fit's recipe: a constant learning rate; SGD with momentum 0.9 and weight
        decay 5e-4, Adam without decay."""
        return engine.TrainConfig(epochs=self.epochs, batch_size=batch_size, optimizer=optimizer,
                                  lr=lr, momentum=0.9,
                                  weight_decay=5e-4 if optimizer == "sgd" else 0.0,
                                  schedule="constant", augment=self.augment, amp=amp,
                                  log_every=10 ** 9)  # no step lines: rows are per epoch


# --- The poisoned model ---------------------------------------------------------------

class Poisoned(NamedTuple):
    model: nn.Module  # on the device, in eval() mode
    model_name: str
    dataset: str
    meta: dict  # the checkpoint's
    attack: dict  # trigger meta, target, mode, num_classes


def infer_num_classes(state_dict: dict) -> int:
    """Rows of the last 2-D weight: the classifier head of every model in models.py."""
    heads = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not heads:
        raise UserError("cannot tell the number of classes: the checkpoint has no linear layer")
    return int(heads[-1].shape[0])


def infer_model_name(state_dict: dict, meta: dict, requested: str | None) -> str:
    if requested:
        return canonical_model_name(requested)
    if meta.get("model"):
        return canonical_model_name(meta["model"])
    if "features.0.weight" in state_dict and "classifier.weight" in state_dict:
        return "small_vgg"  # the I-BAU release layout
    raise UserError("the checkpoint does not say which model it is: pass --model")


def release_attack(path: Path, num_classes: int, *, attack: str | None = None,
                   trigger_file: str | None = None, target: int | None = None) -> dict:
    """Trigger of a checkpoint without attack metadata: the trigger file / the regenerated
    `attack` / `target` given, else the release file name (<attack>_<target>_...), else
    BadNets 4×4, target 8 (the release's defense.py)."""
    m = RELEASE_NAME.search(path.name)
    kind, release_target, source = "badnets", 8, "default of the release's defense.py"
    if m:
        kind, release_target, source = m.group(1), int(m.group(2)), f"release file name {path.name}"
    if attack:
        kind, source = attack.strip().lower().replace("-", "_"), "--attack"
    target = release_target if target is None else target
    if trigger_file:
        trigger, source = load_release_trigger(trigger_file), f"--trigger-file {trigger_file}"
    elif kind == "badnets":
        trigger = BadNets()
    else:
        if kind not in ATTACKS[:-1]:
            raise UserError(f"unknown --attack '{kind}': choose one of {', '.join(ATTACKS[:-1])}")
        trigger = make_trigger(kind)
        print(f"note: {kind} is a regeneration with the release's geometry, not its bytes; "
              "pass --trigger-file triggers/<name>.png for the original", file=sys.stderr)
    if not 0 <= target < num_classes:
        raise UserError(f"target {target} is outside the model's {num_classes} classes: pass --target")
    return {"trigger": trigger.to_meta(), "target": target, "mode": "all2one",
            "num_classes": num_classes, "source": source}


def load_poisoned(path: Path, device, *, model_name: str | None = None, dataset: str | None = None,
                  attack: str | None = None, trigger_file: str | None = None,
                  target: int | None = None) -> Poisoned:
    """The model of a checkpoint of ours (train.py --attack: its meta names model, dataset
    and attack) or of a release file {'net': state_dict, 'acc', 'epoch'}. The keywords
    override what the checkpoint says; `attack`/`trigger_file` replace its trigger."""
    state_dict, meta = engine.load_checkpoint(path)
    meta = dict(meta or {})
    model_name = infer_model_name(state_dict, meta, model_name)
    num_classes = infer_num_classes(state_dict)
    dataset = canonical_dataset_name(dataset or meta.get("dataset") or "cifar10")
    if meta.get("dataset") and canonical_dataset_name(meta["dataset"]) != dataset:
        raise UserError(f"{path} was trained on {meta['dataset']}, not {dataset}: drop --dataset")
    model = get_model(model_name, num_classes)
    engine.load_weights(model, state_dict, path)
    model.to(device).eval()
    recorded = meta.get("attack")
    if recorded is None or attack or trigger_file:
        recorded = release_attack(path, num_classes, attack=attack, trigger_file=trigger_file,
                                  target=target)
    elif target is not None:
        if recorded.get("mode") == "all2all":
            raise UserError("--target does not apply to an all2all attack")
        recorded = {**recorded, "target": target}
    return Poisoned(model, model_name, dataset, meta, recorded)


# --- Clean and evaluation data --------------------------------------------------------

class DefenceData(NamedTuple):
    split: Split  # where the clean images come from: the test or the train split
    clean_idx: torch.Tensor
    test: Split
    eval_idx: torch.Tensor  # held-out test images


def choose_data(dataset: str, num_classes: int, *, source: str = "test", n_clean: int,
                seed: int, n_eval: int | None = None) -> DefenceData:
    """The clean set, from `source`: `test` or `train` (n_clean images drawn class-balanced
    with `seed`), or a JSON index file ({'split': 'test'|'train', 'indices': [...]} or a
    list of test indices). Evaluation: the test images not in the clean set (at most n_eval
    of them, drawn with `seed`)."""
    test = load_split(dataset, False)
    if test.num_classes != num_classes:
        raise UserError(f"{dataset} has {test.num_classes} classes but the model has "
                        f"{num_classes}: pass the right --dataset")
    if source in ("test", "train"):
        split, clean_idx = drawn_clean_set(dataset, test, source, n_clean, seed)
    else:
        split, clean_idx = listed_clean_set(dataset, test, Path(source))
    eval_idx = held_out(test, None if split.train else clean_idx, n_eval, seed)
    return DefenceData(split, clean_idx, test, eval_idx)


def drawn_clean_set(dataset: str, test: Split, which: str, n: int, seed: int):
    split = test if which == "test" else load_split(dataset, True)
    if n > len(split):
        raise UserError(f"--n_clean {n} exceeds the {len(split)} {which} images")
    return split, balanced_subset(split.y, n, seed=seed)


def listed_clean_set(dataset: str, test: Split, path: Path):
    try:
        which = json.loads(path.read_text()).get("split", "test") if path.is_file() else "test"
    except (ValueError, AttributeError):  # a bare list of indices: test images
        which = "test"
    if which not in ("test", "train"):
        raise UserError(f"{path}: 'split' must be test or train, got {which}")
    split = test if which == "test" else load_split(dataset, True)
    clean_idx = read_index_json(path, len(split))
    if not len(clean_idx):
        raise UserError(f"{path} lists no clean images")
    return split, clean_idx


def held_out(test: Split, clean_test_idx: torch.Tensor | None, n_eval: int | None, seed: int):
    """Test indices minus the clean ones, at most n_eval of them (sorted)."""
    eval_idx = torch.arange(len(test))
    if clean_test_idx is not None:
        eval_idx = eval_idx[~torch.isin(eval_idx, clean_test_idx)]
    if n_eval is not None and n_eval < len(eval_idx):
        g = torch.Generator().manual_seed(10_000 + seed)
        eval_idx = eval_idx[torch.randperm(len(eval_idx), generator=g)[:n_eval]].sort().values
    if not len(eval_idx):
        raise UserError("no test images are left for evaluation: lower --n_clean or use --unl_set train")
    return eval_idx


def clean_loader(split, clean_idx, *, batch_size: int, seed: int, device, normalize: bool,
                 augment: Augment | None = None) -> BatchLoader:
    """The clean images in batches, shuffled by `seed`."""
    return BatchLoader(split, clean_idx, batch_size=batch_size, shuffle=True, seed=seed,
                       device=device, normalize=normalize, augment=augment)


# --- Measurements ---------------------------------------------------------------------

class Evaluator:
    """Clean accuracy, ASR and R-Acc on the held-out test images, and beside them the
    release's ASR (`release_asr`): triggered copies of the unlearning images themselves,
    target class included. Keeps the time spent (not counted as defence time)."""

    def __init__(self, test, eval_idx, split, clean_idx, attack, *, normalize, device):
        self.held_out = BackdoorEval(test, eval_idx, attack, normalize=normalize, device=device)
        self.release = BackdoorEval(split, clean_idx, attack, normalize=normalize, device=device)
        self.seconds = 0.0

    def __call__(self, model) -> dict:
        t0 = time.perf_counter()
        out = self.held_out(model)
        out = {k: out[k] for k in ("acc", "asr", "asr_incl_target", "racc")}
        out["release_asr"] = self.release.attack_metrics(model)["asr_incl_target"]
        self.seconds += time.perf_counter() - t0
        return out


class RoundLog:
    """The rows of a defence run, one per evaluation (after every `every`-th round / epoch
    and the last): round, stage, defence seconds so far, the Evaluator's metrics, DER against
    the first row (the poisoned model) and any extras. Each row is printed and its numbers
    handed to `on_row` (the wandb logger)."""

    def __init__(self, evaluate: Evaluator, every: int = 1,
                 on_row: Callable[[dict], None] | None = None):
        self.evaluate, self.every, self.on_row = evaluate, every, on_row
        self.rows: list[dict] = []

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def record(self, step: int, stage: str, seconds: float, model, **extra) -> None:
        row = {"round": step, "stage": stage, "seconds": round(seconds, 3), **self.evaluate(model)}
        base = self.rows[0] if self.rows else row
        row["der"] = defense_effectiveness_rate(base["acc"], row["acc"], base["asr"], row["asr"])
        row.update(extra)
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row({k: v for k, v in row.items() if isinstance(v, (int, float))})
        norm = f"  |δ| {row['delta_l2']:.2f}" if "delta_l2" in row else ""
        print(f"[{stage} {step}] acc {row['acc']:.2f}  asr {row['asr']:.2f} (release's asr "
              f"{row['release_asr']:.2f})  racc {row['racc']:.2f}  der {row['der']:.2f}{norm}  "
              f"time {seconds:.1f}s", flush=True)


# --- I-BAU ----------------------------------------------------------------------------

class PixelSpace(nn.Module):
    """A normalising model seen from [0, 1] pixels: forward(x) = model((x − mean) / std).
    Its parameters are the model's own, so I-BAU's outer step trains the model."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        dev = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(mean, device=dev).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1 / torch.tensor(std, device=dev).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) * self.inv_std)


def ibau_view(model, model_name: str, split, delta_space: str, clamp: bool):
    """(module I-BAU runs on, whether its batches are normalised, clamp range of x+δ) for δ
    in `delta_space`: pixel ([0, 1] pixels; a normalising model gets its normalisation
    inside) or input (the model's input space)."""
    info = dataset_info(split)
    device = next(model.parameters()).device
    if not expects_normalized(model_name) or delta_space == "pixel":
        net = model if not expects_normalized(model_name) else PixelSpace(model, info.mean, info.std)
        return net, False, ((0.0, 1.0) if clamp else None)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return model, True, (((0 - mean) / std, (1 - mean) / std) if clamp else None)


def resolve_projection(projection: str, model_name: str) -> str:
    """I-BAU's δ projection for `model_name`: `auto` is `end` for models on raw [0, 1] pixels
    (the release's small VGG, as its notebooks) and `step` for normalising models (this
    repository's). Each fails on the other (2-core CPU, docs/ibau.md): projected every step,
    δ stops finding the release CIFAR-10 model's trigger (seed 2: ASR 98 → 96 %); scaled once
    at the end, our BadNets SmallCNN keeps 11.5 % (seed 1; every step: 4.8 %)."""
    if projection != "auto":
        return projection
    return "step" if expects_normalized(model_name) else "end"


def sync(model):
    engine.sync(next(model.parameters()).device)


def make_outer_optimizer(params, optimizer: str, lr: float) -> torch.optim.Optimizer:
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


@contextmanager
def full_float32():
    """TF32 off (cuDNN turns it on for convolutions by default): I-BAU's inner maximisation and
    fixed-point hypergradient compute what the CPU computes, in float32. On an H200 with TF32
    the release CIFAR-10 model kept ~90 % ASR where the CPU reaches 0.1 %; TF32 emulated on
    the CPU (bench/ibau_precision.py) does not reproduce that (docs/ibau.md), so this keeps the
    arithmetic alike rather than being the known fix."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class IBAUSetup(NamedTuple):
    """What I-BAU's rounds run on: the module, its batches (drawn once, as the release), the
    outer optimiser and its schedule, the generator of the perturbed images, and the rest of
    ibau_round's keywords."""
    net: nn.Module
    batches: list
    outer_opt: torch.optim.Optimizer
    schedule: object
    generator: torch.Generator
    options: dict


def ibau_setup(model, model_name: str, split, clean_idx, cfg: IBAUConfig, *, seed: int) -> IBAUSetup:
    """I-BAU on `model` (on its device) with the clean images `clean_idx` of `split`; `seed`
    orders the batches and picks the perturbed images."""
    net, normalized, clamp = ibau_view(model, model_name, split, cfg.delta_space, cfg.clamp)
    device = next(model.parameters()).device
    batches = list(clean_loader(split, clean_idx, batch_size=cfg.batch_size, seed=seed,
                                device=device, normalize=normalized))
    outer_opt = make_outer_optimizer(model.parameters(), cfg.optimizer, cfg.lr)
    schedule = (torch.optim.lr_scheduler.StepLR(outer_opt, cfg.lr_half_life, gamma=0.5)
                if cfg.lr_half_life else None)
    options = dict(K=cfg.K, perturb_frac=cfg.perturb_frac, delta_lr=cfg.delta_lr,
                   delta_optimizer=cfg.delta_optimizer, radius=cfg.radius or None,
                   projection=resolve_projection(cfg.projection, model_name), clamp=clamp,
                   min_perturbed=cfg.min_perturbed)
    return IBAUSetup(net, batches, outer_opt, schedule, torch.Generator().manual_seed(seed), options)


def ibau_round(run: IBAUSetup, **extra) -> dict:
    """One round of `run` (ibau.ibau_round, TF32 off); `extra`: ibau_round's hooks."""
    with full_float32():
        return ibau.ibau_round(run.net, run.batches, run.outer_opt, generator=run.generator,
                               schedule=run.schedule, **run.options, **extra)


def run_ibau(model, model_name: str, split, clean_idx, cfg: IBAUConfig, *, seed: int,
             log: RoundLog) -> float:
    """cfg.rounds I-BAU rounds (ibau_setup), all on the same batches. Returns the defence
    seconds, evaluation left out."""
    run = ibau_setup(model, model_name, split, clean_idx, cfg, seed=seed)
    seconds = 0.0
    for r in range(1, cfg.rounds + 1):
        sync(model)
        t0 = time.perf_counter()
        out = ibau_round(run)
        sync(model)
        seconds += time.perf_counter() - t0
        if log.due(r, cfg.rounds):  # the model itself is evaluated, not its pixel-space view
            log.record(r, "ibau", seconds, model, delta_l2=float(out["delta"].norm()),
                       outer_loss=float(np.mean(out["outer_losses"])))
    return seconds


# --- Fine-tuning and fine-pruning -----------------------------------------------------

def finetune_stream(split, clean_idx, recipe: engine.TrainConfig, *, dataset: str, seed: int,
                    device, normalize: bool) -> BatchLoader:
    flip = dataset != "gtsrb"  # traffic signs are not mirror-symmetric
    augment = Augment(crop=4, flip=flip) if recipe.augment else None
    return clean_loader(split, clean_idx, batch_size=recipe.batch_size, seed=seed, device=device,
                        normalize=normalize, augment=augment)


def finetune(model, stream, recipe: engine.TrainConfig, log: RoundLog, *, seconds0: float = 0.0,
             after_step: Callable | None = None, stage: str = "finetune") -> float:
    """Fine-tuning on the clean stream through engine.fit, evaluated after the epochs the
    log asks for. Returns seconds0 plus the seconds spent here, evaluation left out."""
    if recipe.epochs == 0:
        return seconds0
    t_start, eval_before = time.perf_counter(), log.evaluate.seconds

    def elapsed():
        return time.perf_counter() - t_start - (log.evaluate.seconds - eval_before)

    def on_eval(m, epoch):
        if log.due(epoch, recipe.epochs):
            log.record(epoch, stage, seconds0 + elapsed(), m)
        return {}

    engine.fit(model, stream, recipe, after_step=after_step, evaluate=on_eval, desc=stage)
    model.eval()
    return seconds0 + elapsed()


def run_finetune(model, split, clean_idx, recipe: engine.TrainConfig, *, dataset: str,
                 seed: int, normalize: bool, log: RoundLog) -> float:
    stream = finetune_stream(split, clean_idx, recipe, dataset=dataset, seed=seed,
                             device=next(model.parameters()).device, normalize=normalize)
    return finetune(model, stream, recipe, log)


def last_conv_channels(model) -> int:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError("fine-pruning needs a convolutional model")
    return convs[-1].out_channels


@torch.no_grad()
def clean_features(model, loader):
    feats, labels = [], []
    model.eval()
    for batch in loader:
        feats.append(model.features(batch.x).float())
        labels.append(batch.y)
    return torch.cat(feats), torch.cat(labels)


def channel_groups(feat_dim: int, channels: int) -> torch.Tensor:
    """Channel of each penultimate feature: pooled features map 1:1 onto the last conv's
    channels; flattened C×H×W features (SmallVGG) come channel-major in blocks of H·W."""
    if feat_dim % channels:
        raise UserError(f"cannot map {feat_dim} penultimate features onto {channels} last-conv "
                        "channels for fine-pruning")
    return torch.arange(feat_dim) // (feat_dim // channels)


def prune_last_conv(model, loader, acc_drop: float, max_share: float) -> tuple[torch.Tensor, dict]:
    """Fine-pruning's pruning step (Liu et al., 2018) on the last conv layer: channels in
    ascending order of mean activation on the clean images of `loader`, as many as keep
    their accuracy within `acc_drop` points (at most `max_share` of the channels).

    Pruning a channel = zeroing the head's input columns that carry it: every model here
    reaches the head only through pooling/flattening of the last conv's activations, so
    this removes the channel exactly and keeps the architecture (and checkpoint) as is.
    Returns the keep-mask over head inputs and a report."""
    feats, labels = clean_features(model, loader)
    channels = last_conv_channels(model)
    groups = channel_groups(feats.shape[1], channels).to(feats.device)
    score = torch.zeros(channels, device=feats.device).index_add_(0, groups, feats.mean(0))
    order = score.argsort()  # dormant channels first
    head = model.head
    w, bias = head.weight.detach().float(), head.bias.detach().float() if head.bias is not None else 0

    def acc_with(k):
        keep = (~torch.isin(groups, order[:k])).float()
        return 100.0 * ((feats * keep) @ w.T + bias).argmax(1).eq(labels).float().mean().item()

    base = acc_with(0)
    best, limit = 0, int(max_share * channels)
    for k in range(1, limit + 1):
        if acc_with(k) < base - acc_drop:
            break
        best = k
    keep = ~torch.isin(groups, order[:best])
    zero_pruned(head, keep)
    return keep, {"channels": channels, "pruned": best, "clean_set_acc_before": base,
                  "clean_set_acc_after": acc_with(best)}


@torch.no_grad()
def zero_pruned(head: nn.Linear, keep: torch.Tensor) -> None:
    head.weight[:, ~keep] = 0


def run_fineprune(model, split, clean_idx, recipe: engine.TrainConfig, *, acc_drop: float,
                  max_share: float, dataset: str, seed: int, normalize: bool,
                  log: RoundLog) -> tuple[float, dict]:
    """Prune the last conv's channels (prune_last_conv), then fine-tune with them held at
    zero. Returns the defence seconds and the pruning report."""
    device = next(model.parameters()).device
    unaugmented = clean_loader(split, clean_idx, batch_size=recipe.batch_size, seed=seed,
                               device=device, normalize=normalize)
    stream = finetune_stream(split, clean_idx, recipe, dataset=dataset, seed=seed, device=device,
                             normalize=normalize)
    t0 = time.perf_counter()
    keep, report = prune_last_conv(model, unaugmented, acc_drop, max_share)
    seconds = time.perf_counter() - t0
    print(f"pruned {report['pruned']}/{report['channels']} last-conv channels "
          f"(clean-set acc {report['clean_set_acc_before']:.2f} -> {report['clean_set_acc_after']:.2f})")
    log.record(0, "pruned", seconds, model, **report)
    head = model.head
    seconds = finetune(model, stream, recipe, log, seconds0=seconds,
                       after_step=lambda m: zero_pruned(head, keep), stage="fineprune")
    return seconds, report


# --- Plot -----------------------------------------------------------------------------

@plotting.drawn
def plot_rounds(path: Path, rows: list[dict], title: str, xlabel: str = "round") -> None:
    """ACC, ASR and R-Acc of a RoundLog's rows, one point per row, as a PNG (atomic)."""
    x = list(range(len(rows)))
    labels = [f"{r['round']}" if r["stage"] not in ("before", "pruned") else r["stage"] for r in rows]
    fig = plotting.figure(6, 3.6)
    ax = fig.subplots()
    ax.plot(x, [r["acc"] for r in rows], "o-", label="clean ACC")
    ax.plot(x, [r["asr"] for r in rows], "s-", label="ASR (non-target)")
    ax.plot(x, [r["racc"] for r in rows], "^--", label="R-Acc", alpha=0.6)
    crowded = len(x) > 12 or "pruned" in labels
    ax.set_xticks(x, labels, rotation=45 if crowded else 0, fontsize=8)
    if len(x) > 25:  # label every k-th round only
        k = -(-len(x) // 25)
        for i, t in enumerate(ax.get_xticklabels()):
            t.set_visible(i % k == 0 or i == len(x) - 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    plotting.save_png(fig, path, dpi=120)

"""Remove a backdoor from a poisoned model with a small clean set: I-BAU (Zeng et al.,
ICLR 2022) as released, or the fine-tuning / fine-pruning baselines on the same data.

    python defense.py --dataset cifar10 --poi_path ./checkpoint/badnets_8_02_ckpt.pth \\
        --optim Adam --lr 0.001 --n_rounds 3 --K 5          # the release's README example
    python defense.py --poi_path checkpoints/smallcnn_cifar10_badnets-all2one-t0-p0.1_seed0.pt
    python defense.py --poi_path ... --n_clean 100 --n_rounds 50 --radius 0   # unbounded δ (the CLI)
    python defense.py --poi_path ... --method fineprune --epochs 10

The checkpoint is one of ours (train.py --attack: its meta gives model, dataset and trigger)
or a release file {'net': state_dict, 'acc', 'epoch'} (SmallVGG; the number of classes is
read from the weights; trigger: --trigger-file, else the <attack>_<target>_ file name, else
BadNets 4×4 target 8 as the release's defense.py).

Clean data (`--unl_set`): `test` (default, as the release), `train`, or a JSON index file.
`--n_clean` images are drawn class-balanced with --seed (filled up from the other classes
where a class is short, e.g. GTSRB). Clean accuracy and ASR are measured on the test images
NOT in the clean set; ASR counts non-target-class images only (BackdoorBench). Beside it,
`release_asr` is the release's own figure: triggered copies of the unlearning images
themselves, target class included.

Differences from the release (all switchable):
  * at least --min-perturbed (default 1) images of every outer batch get δ; the release's
    int(0.01·B) is 0 for batches under 100 (a small last batch, --batch_size < 100), which
    silently turns those steps into plain fine-tuning. --min-perturbed 0 restores it.
  * the clean set is a seeded class-balanced draw, not test[:5000] in file order (our
    CIFAR-10 files are sorted by class, so the first 5000 would be five classes).
  * δ is fitted unbounded and then scaled once onto the L2 ball of radius 10
    (δ·min(1, 10/‖δ‖)), as in the release's notebooks, which made its published results;
    its defense.py leaves δ unbounded (--radius 0), which diverged on our SmallCNN
    (L2 ≈ 6000 after one round, clean accuracy 70 → 27 %). --projection step projects after
    every step instead (this repository's default before): it fails on the release's own
    models (ASR 98 → 66 % after one round), see the README's ablation.
  * δ lives on [0, 1] pixels for every model (the release's SmallVGG takes raw pixels, so
    its step size 10, radius 10 and clamp mean the same for our normalising models);
    --delta-space input puts it in the model's normalised input space as BackdoorBench does
    (a step there is std² ≈ 1/16 as large in pixels).
  * --clamp keeps x+δ inside [0, 1] (the GTSRB notebook, with --delta-optim adam
    --delta-lr 1); off by default, as the CIFAR notebook since March 2022.

Writes per round <out>/<tag>.json, .csv and .png (ACC/ASR vs round) and the defended model
(engine.save_checkpoint; its meta keeps the attack, so it can be defended or evaluated again).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import ibau
from attacks import ATTACKS, BackdoorEval, BadNets, load_release_trigger, make_trigger
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name, checkpoint_dir, results_dir
from datasets import Augment, BatchLoader, balanced_subset, dataset_info, load_split, read_index_json
from metrics import defense_effectiveness_rate
from models import canonical_model_name, expects_normalized, get_model
from reporting import write_json, write_text_atomic

METHODS = ("ibau", "finetune", "fineprune")
RELEASE_NAME = re.compile(r"(?:^|_)(badnets|trojan_sq|trojan_wm|l0_inv|l2_inv)_(\d+)_")


class OneLineParser(argparse.ArgumentParser):
    """Bad flags become a UserError: one line 'error: ...' and exit 2 through run_main."""

    def error(self, message):
        raise UserError(f"{message} (see python defense.py --help)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--poi_path", "--poi-path", required=True, help="poisoned model checkpoint")
    p.add_argument("--dataset", default=None,
                   help="cifar10, gtsrb, ... (default: the checkpoint's, else cifar10)")
    p.add_argument("--model", default=None,
                   help="architecture (default: the checkpoint's; small_vgg for release files)")
    p.add_argument("--method", default="ibau", help="ibau (default), finetune or fineprune")
    p.add_argument("--seed", type=int, default=0,
                   help="batch order and I-BAU's perturbed images (and the clean draw, unless "
                        "--data-seed is given)")
    p.add_argument("--data-seed", "--data_seed", type=int, default=None,
                   help="seed of the class-balanced clean-set draw alone (default: --seed)")
    c = p.add_argument_group("clean data")
    c.add_argument("--unl_set", "--unl-set", default="test",
                   help="test (default), train, or a JSON index file ({'split': 'test'|'train', "
                        "'indices': [...]} or a list of test indices)")
    c.add_argument("--n_clean", "--n-clean", type=int, default=5000,
                   help="clean images drawn class-balanced from --unl_set (default 5000)")
    c.add_argument("--batch_size", "--batch-size", type=int, default=100)
    c.add_argument("--n-eval", "--n_eval", type=int, default=None,
                   help="evaluate on at most N held-out test images (default: all)")
    c.add_argument("--eval-every", "--eval_every", type=int, default=1,
                   help="evaluate after every N-th round / epoch (and the last; default 1)")
    o = p.add_argument_group("outer optimiser (I-BAU: over the weights; baselines: fine-tuning)")
    o.add_argument("--optim", default="Adam", help="Adam (default) or SGD")
    o.add_argument("--lr", type=float, default=0.001)
    i = p.add_argument_group("I-BAU")
    i.add_argument("--n_rounds", "--n-rounds", type=int, default=5)
    i.add_argument("--K", type=int, default=5, help="fixed-point iterations of the hypergradient")
    i.add_argument("--radius", type=float, default=10.0,
                   help="L2 bound on δ in [0, 1] pixels, for every model (default 10, the "
                        "release's notebooks, which produced its published numbers; 0 = "
                        "unbounded, the release's defense.py)")
    i.add_argument("--projection", default="end",
                   help="end (default, the notebooks): fit δ unbounded, scale it onto the ball "
                        "once; step: project after every step")
    i.add_argument("--clamp", action="store_true", help="clamp x+δ to the valid pixel range")
    i.add_argument("--delta-space", "--delta_space", default="pixel",
                   help="pixel (default): δ on [0, 1] pixels as the release, for every model "
                        "(normalising models get the normalisation inside); input: the model's "
                        "input space, normalised for most models (BackdoorBench)")
    i.add_argument("--delta-optim", "--delta_optim", default="sgd", help="sgd (release) or adam")
    i.add_argument("--delta-lr", "--delta_lr", type=float, default=10.0)
    i.add_argument("--perturb-frac", "--perturb_frac", type=float, default=0.01,
                   help="share of each outer batch that gets δ (release: 0.01)")
    i.add_argument("--min-perturbed", "--min_perturbed", type=int, default=1,
                   help="at least this many perturbed images per outer batch (release: 0)")
    b = p.add_argument_group("baselines (finetune, fineprune)")
    b.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs over the clean set")
    b.add_argument("--no-augment", action="store_true", help="fine-tune without crop/flip")
    b.add_argument("--prune-acc-drop", type=float, default=5.0,
                   help="fineprune: prune last-conv channels (lowest clean activation first) "
                        "while clean-set accuracy stays within this many points")
    b.add_argument("--prune-max", type=float, default=0.95, help="fineprune: largest pruned share")
    t = p.add_argument_group("trigger (only for checkpoints without attack metadata, or to override it)")
    t.add_argument("--attack", default=None, help=f"regenerated trigger: {', '.join(ATTACKS[:-1])}")
    t.add_argument("--trigger-file", "--trigger_file", default=None,
                   help="a release trigger PNG (triggers/*.png; mask.npy is picked up for l0_inv)")
    t.add_argument("--target", type=int, default=None, help="target class")
    s = p.add_argument_group("output")
    s.add_argument("--out", default=None, help="results folder (default RESULTS_DIR/defense)")
    s.add_argument("--save", default=None,
                   help="defended checkpoint (default CHECKPOINT_DIR/defense/<tag>.pt)")
    s.add_argument("--tag", default=None, help="file stem of the outputs")
    add_runtime_args(p)
    return p


def check_args(args) -> None:
    args.method = args.method.strip().lower().replace("-", "").replace("_", "")
    if args.method not in METHODS:
        raise UserError(f"unknown --method '{args.method}': choose {', '.join(METHODS)}")
    args.optim = args.optim.strip().lower()
    if args.unl_set.strip().lower() in ("test", "train"):
        args.unl_set = args.unl_set.strip().lower()
    if args.optim not in ("adam", "sgd"):
        raise UserError(f"unknown --optim '{args.optim}': choose Adam or SGD")
    args.delta_optim = args.delta_optim.strip().lower()
    args.delta_space = args.delta_space.strip().lower()
    if args.delta_space not in ("pixel", "input"):
        raise UserError(f"unknown --delta-space '{args.delta_space}': choose pixel or input")
    args.projection = args.projection.strip().lower()
    if args.projection not in ibau.PROJECTIONS:
        raise UserError(f"unknown --projection '{args.projection}': choose end or step")
    if args.delta_optim not in ("adam", "sgd"):
        raise UserError(f"unknown --delta-optim '{args.delta_optim}': choose sgd or adam")
    positive = {"--n_clean": args.n_clean, "--batch_size": args.batch_size, "--K": args.K,
                "--lr": args.lr, "--delta-lr": args.delta_lr}
    for flag, v in positive.items():
        if v is None or v <= 0:
            raise UserError(f"{flag} must be positive, got {v}")
    if args.n_rounds < 0 or args.epochs < 0:
        raise UserError("--n_rounds and --epochs must be >= 0")
    if args.radius < 0:
        raise UserError(f"--radius must be >= 0 (0 = unbounded), got {args.radius}")
    if not 0 <= args.perturb_frac <= 1 or args.min_perturbed < 0:
        raise UserError("--perturb-frac must be in [0, 1] and --min-perturbed >= 0")
    if not 0 <= args.prune_max < 1 or args.prune_acc_drop < 0:
        raise UserError("--prune-max must be in [0, 1) and --prune-acc-drop >= 0")
    if args.eval_every < 1:
        raise UserError(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.n_eval is not None and args.n_eval <= 0:
        raise UserError(f"--n-eval must be positive, got {args.n_eval}")


# --- The poisoned model ---------------------------------------------------------------

def infer_num_classes(state_dict: dict) -> int:
    """Rows of the last 2-D weight: the classifier head of every model in models.py."""
    heads = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not heads:
        raise UserError("cannot tell the number of classes: the checkpoint has no linear layer")
    return int(heads[-1].shape[0])


def infer_model_name(state_dict: dict, meta: dict, flag: str | None) -> str:
    if flag:
        return canonical_model_name(flag)
    if meta.get("model"):
        return canonical_model_name(meta["model"])
    if "features.0.weight" in state_dict and "classifier.weight" in state_dict:
        return "small_vgg"  # the I-BAU release layout
    raise UserError("the checkpoint does not say which model it is: pass --model")


def release_attack(path: Path, args, num_classes: int) -> dict:
    """Trigger of a checkpoint without attack metadata: --trigger-file / --attack / --target,
    else the release file name (<attack>_<target>_...), else BadNets 4×4, target 8."""
    m = RELEASE_NAME.search(path.name)
    kind, target, source = "badnets", 8, "default of the release's defense.py"
    if m:
        kind, target, source = m.group(1), int(m.group(2)), f"release file name {path.name}"
    if args.attack:
        kind, source = args.attack.strip().lower().replace("-", "_"), "--attack"
    if args.target is not None:
        target = args.target
    if args.trigger_file:
        trigger, source = load_release_trigger(args.trigger_file), f"--trigger-file {args.trigger_file}"
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


def load_poisoned(args, device):
    """(model, model_name, dataset, meta, attack) from --poi_path and the overrides."""
    path = Path(args.poi_path).expanduser()
    state_dict, meta = engine.load_checkpoint(path)
    meta = dict(meta or {})
    model_name = infer_model_name(state_dict, meta, args.model)
    num_classes = infer_num_classes(state_dict)
    dataset = canonical_dataset_name(args.dataset or meta.get("dataset") or "cifar10")
    if meta.get("dataset") and canonical_dataset_name(meta["dataset"]) != dataset:
        raise UserError(f"{path} was trained on {meta['dataset']}, not {dataset}: drop --dataset")
    model = get_model(model_name, num_classes)
    engine.load_weights(model, state_dict, path)
    model.to(device).eval()
    attack = meta.get("attack")
    if attack is None or args.attack or args.trigger_file:
        attack = release_attack(path, args, num_classes)
    elif args.target is not None:
        if attack.get("mode") == "all2all":
            raise UserError("--target does not apply to an all2all attack")
        attack = {**attack, "target": args.target}
    return model, model_name, dataset, meta, attack


# --- Clean and evaluation data --------------------------------------------------------

def data_seed(args) -> int:
    return args.seed if args.data_seed is None else args.data_seed


def choose_data(args, dataset: str, num_classes: int):
    """(clean split, clean indices, test split, held-out evaluation indices)."""
    test = load_split(dataset, False)
    if test.num_classes != num_classes:
        raise UserError(f"{dataset} has {test.num_classes} classes but the model has "
                        f"{num_classes}: pass the right --dataset")
    source = args.unl_set
    if source in ("test", "train"):
        split = test if source == "test" else load_split(dataset, True)
        if args.n_clean > len(split):
            raise UserError(f"--n_clean {args.n_clean} exceeds the {len(split)} {source} images")
        clean_idx = balanced_subset(split.y, args.n_clean, seed=data_seed(args))
    else:
        import json

        path = Path(source)
        try:
            which = json.loads(path.read_text()).get("split", "test") if path.is_file() else "test"
        except (ValueError, AttributeError):
            which = "test"
        if which not in ("test", "train"):
            raise UserError(f"{path}: 'split' must be test or train, got {which}")
        split = test if which == "test" else load_split(dataset, True)
        clean_idx = read_index_json(path, len(split))
        if not len(clean_idx):
            raise UserError(f"{path} lists no clean images")
        source = which
    eval_idx = torch.arange(len(test))
    if source == "test":
        eval_idx = eval_idx[~torch.isin(eval_idx, clean_idx)]
    if args.n_eval is not None and args.n_eval < len(eval_idx):
        g = torch.Generator().manual_seed(10_000 + data_seed(args))
        eval_idx = eval_idx[torch.randperm(len(eval_idx), generator=g)[:args.n_eval]].sort().values
    if not len(eval_idx):
        raise UserError("no test images are left for evaluation: lower --n_clean or use --unl_set train")
    return split, clean_idx, test, eval_idx


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


# --- Methods --------------------------------------------------------------------------

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


def ibau_view(model, model_name: str, split, args):
    """(module I-BAU runs on, whether its batches are normalised, clamp range of x+δ)."""
    info = dataset_info(split)
    device = next(model.parameters()).device
    if not expects_normalized(model_name) or args.delta_space == "pixel":
        net = model if not expects_normalized(model_name) else PixelSpace(model, info.mean, info.std)
        return net, False, ((0.0, 1.0) if args.clamp else None)
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return model, True, (((0 - mean) / std, (1 - mean) / std) if args.clamp else None)


def make_outer_optimizer(params, args):
    if args.optim == "adam":
        return torch.optim.Adam(params, lr=args.lr)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9)


def due(step: int, last: int, every: int) -> bool:
    """Evaluate after this round/epoch? Every `every`-th one, and always the last."""
    return step % every == 0 or step == last


def run_ibau(model, net, args, clean_loader, evaluate, record, clamp):
    """n_rounds I-BAU rounds of `net` (the model, or it in pixel space) on the same clean
    batches (drawn once, as the release); `evaluate` sees the model itself."""
    batches = list(clean_loader)
    outer_opt = make_outer_optimizer(model.parameters(), args)
    gen = torch.Generator().manual_seed(args.seed)
    seconds = 0.0
    for r in range(1, args.n_rounds + 1):
        sync(model)
        t0 = time.perf_counter()
        out = ibau.ibau_round(net, batches, outer_opt, K=args.K, perturb_frac=args.perturb_frac,
                              delta_lr=args.delta_lr, delta_optimizer=args.delta_optim,
                              radius=args.radius or None, projection=args.projection,
                              clamp=clamp, generator=gen,
                              min_perturbed=args.min_perturbed)
        sync(model)
        seconds += time.perf_counter() - t0
        if due(r, args.n_rounds, args.eval_every):
            record(r, "ibau", seconds, evaluate(model), delta_l2=float(out["delta"].norm()),
                   outer_loss=float(np.mean(out["outer_losses"])))
    return seconds


def finetune_config(args) -> engine.TrainConfig:
    return engine.TrainConfig(epochs=args.epochs, optimizer=args.optim, lr=args.lr,
                              momentum=0.9, weight_decay=5e-4 if args.optim == "sgd" else 0.0,
                              schedule="constant", amp=args.amp, log_every=10 ** 9)


def run_finetune(model, args, train_loader, evaluate, record, seconds0=0.0, params=None,
                 after_step=None, stage="finetune"):
    """Fine-tuning on the clean set through engine.fit, evaluated after every epoch."""
    if args.epochs == 0:
        return seconds0
    t_start, eval_before = time.perf_counter(), evaluate.seconds

    def on_eval(m, epoch):
        if due(epoch, args.epochs, args.eval_every):
            elapsed = time.perf_counter() - t_start - (evaluate.seconds - eval_before)
            record(epoch, stage, seconds0 + elapsed, evaluate(m))
        return {}

    engine.fit(model, train_loader, finetune_config(args), params=params,
               after_step=after_step, evaluate=on_eval, desc=stage)
    model.eval()
    return seconds0 + time.perf_counter() - t_start - (evaluate.seconds - eval_before)


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


def prune_last_conv(model, clean_loader, args) -> tuple[torch.Tensor, dict]:
    """Fine-pruning's pruning step (Liu et al., 2018) on the last conv layer: channels in
    ascending order of mean activation on the clean set, as many as keep clean-set accuracy
    within --prune-acc-drop points (at most --prune-max of them).

    Pruning a channel = zeroing the head's input columns that carry it: every model here
    reaches the head only through pooling/flattening of the last conv's activations, so
    this removes the channel exactly and keeps the architecture (and checkpoint) as is.
    Returns the keep-mask over head inputs and a report."""
    feats, labels = clean_features(model, clean_loader)
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
    best, limit = 0, int(args.prune_max * channels)
    for k in range(1, limit + 1):
        if acc_with(k) < base - args.prune_acc_drop:
            break
        best = k
    keep = ~torch.isin(groups, order[:best])
    with torch.no_grad():
        head.weight[:, ~keep] = 0
    return keep, {"channels": channels, "pruned": best, "clean_set_acc_before": base,
                  "clean_set_acc_after": acc_with(best)}


def run_fineprune(model, args, clean_loader, train_loader, evaluate, record):
    t0 = time.perf_counter()
    keep, report = prune_last_conv(model, clean_loader, args)
    seconds = time.perf_counter() - t0
    print(f"pruned {report['pruned']}/{report['channels']} last-conv channels "
          f"(clean-set acc {report['clean_set_acc_before']:.2f} -> {report['clean_set_acc_after']:.2f})")
    record(0, "pruned", seconds, evaluate(model), **report)
    head = model.head

    def keep_pruned(m):
        with torch.no_grad():
            head.weight[:, ~keep] = 0

    return run_finetune(model, args, train_loader, evaluate, record, seconds0=seconds,
                        after_step=keep_pruned, stage="fineprune"), report


def sync(model):
    engine.sync(next(model.parameters()).device)


# --- Output ---------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def plot_rounds(path: Path, rows: list[dict], title: str, xlabel: str = "round") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rows)))
    labels = [f"{r['round']}" if r["stage"] not in ("before", "pruned") else r["stage"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def default_tag(args, poi_path: Path) -> str:
    if args.unl_set in ("test", "train"):
        parts = [poi_path.stem, args.method, f"n{args.n_clean}", args.unl_set]
    else:
        parts = [poi_path.stem, args.method, f"idx-{Path(args.unl_set).stem}"]
    if args.method == "ibau":
        parts += [f"r{args.n_rounds}", f"K{args.K}", f"rad{args.radius:g}"]
        if args.radius and args.projection != "end":
            parts.append(f"proj-{args.projection}")
    else:
        parts.append(f"e{args.epochs}")
    parts.append(f"seed{args.seed}")
    if args.data_seed is not None:
        parts.append(f"data{args.data_seed}")
    return "_".join(parts)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    # Before torch starts its worker threads, which copy this thread's setting: I-BAU's
    # saturated softmax makes denormal gradients, on which CPU arithmetic is ~100× slower.
    torch.set_flush_denormal(True)
    device = setup_runtime(args)
    torch.manual_seed(args.seed)
    model, model_name, dataset, meta, attack = load_poisoned(args, device)
    num_classes = model.head.out_features
    split, clean_idx, test, eval_idx = choose_data(args, dataset, num_classes)
    normalize = expects_normalized(model_name)
    clean_loader = BatchLoader(split, clean_idx, batch_size=args.batch_size, shuffle=True,
                               seed=args.seed, device=device, normalize=normalize)
    evaluate = Evaluator(test, eval_idx, split, clean_idx, attack, normalize=normalize,
                         device=device)
    poi_path = Path(args.poi_path)
    tag = args.tag or default_tag(args, poi_path)
    out_dir = Path(args.out) if args.out else results_dir() / "defense"
    save = Path(args.save) if args.save else checkpoint_dir() / "defense" / f"{tag}.pt"
    trig = attack["trigger"]
    print(f"{model_name} on {dataset}: trigger {trig['kind']}, mode {attack.get('mode')}, target "
          f"{attack.get('target')}; {len(clean_idx)} clean {args.unl_set} images, "
          f"{len(eval_idx)} held-out test images")

    rows: list[dict] = []
    logger = RunLogger(not args.no_log, args.wandb_project, tag, {**vars(args), "attack": attack})

    def record(r, stage, seconds, m, **extra):
        row = {"round": r, "stage": stage, "seconds": round(seconds, 3), **m}
        base = rows[0] if rows else row
        row["der"] = defense_effectiveness_rate(base["acc"], row["acc"], base["asr"], row["asr"])
        row.update(extra)
        rows.append(row)
        logger.log({k: v for k, v in row.items() if isinstance(v, (int, float))})
        norm = f"  |δ| {row['delta_l2']:.2f}" if "delta_l2" in row else ""
        print(f"[{stage} {r}] acc {row['acc']:.2f}  asr {row['asr']:.2f} (release's asr "
              f"{row['release_asr']:.2f})  racc {row['racc']:.2f}  der {row['der']:.2f}{norm}  "
              f"time {seconds:.1f}s", flush=True)

    record(0, "before", 0.0, evaluate(model))
    extra = {}
    if args.method == "ibau":
        net, normalized, clamp = ibau_view(model, model_name, split, args)
        loader = BatchLoader(split, clean_idx, batch_size=args.batch_size, shuffle=True,
                             seed=args.seed, device=device, normalize=normalized)
        seconds = run_ibau(model, net, args, loader, evaluate, record, clamp)
    else:
        flip = dataset != "gtsrb"  # traffic signs are not mirror-symmetric
        augment = None if args.no_augment else Augment(crop=4, flip=flip)
        train_loader = BatchLoader(split, clean_idx, batch_size=args.batch_size, shuffle=True,
                                   seed=args.seed, device=device, normalize=normalize,
                                   augment=augment)
        if args.method == "finetune":
            seconds = run_finetune(model, args, train_loader, evaluate, record)
        else:
            seconds, extra["prune"] = run_fineprune(model, args, clean_loader, train_loader,
                                                    evaluate, record)

    logger.finish()
    final = rows[-1]
    config = {k: v for k, v in vars(args).items()}
    summary = {"method": args.method, "acc_before": rows[0]["acc"], "asr_before": rows[0]["asr"],
               "acc": final["acc"], "asr": final["asr"], "asr_incl_target": final["asr_incl_target"],
               "racc": final["racc"], "der": final["der"], "seconds": seconds,
               "eval_seconds": evaluate.seconds, "n_clean": len(clean_idx), "n_eval": len(eval_idx),
               "release_asr": final["release_asr"], **extra}
    defended_meta = {**{k: v for k, v in meta.items() if k not in ("defense",)},
                     "model": model_name, "num_classes": num_classes, "dataset": dataset,
                     "attack": attack, "defense": {"config": config, "summary": summary,
                                                   "source_checkpoint": str(poi_path)}}
    engine.save_checkpoint(save, model, defended_meta)
    out = {"summary": summary, "rounds": rows, "config": config, "checkpoint": str(save),
           "poisoned_checkpoint": str(poi_path), "model": model_name, "dataset": dataset,
           "attack": attack, "device": str(device), "torch": torch.__version__,
           "argv": sys.argv[1:] if argv is None else list(argv)}
    write_json(out_dir / f"{tag}.json", out)
    write_csv(out_dir / f"{tag}.csv", rows)
    plot_rounds(out_dir / f"{tag}.png", rows, f"{args.method} on {poi_path.name} ({len(clean_idx)} clean)",
                "round" if args.method == "ibau" else "epoch")
    print(f"{args.method}: acc {rows[0]['acc']:.2f} -> {final['acc']:.2f}, asr {rows[0]['asr']:.2f} -> "
          f"{final['asr']:.2f} in {seconds:.1f}s -> {save} (results: {out_dir / tag}.json/.csv/.png)")
    return 0


if __name__ == "__main__":
    run_main(main)

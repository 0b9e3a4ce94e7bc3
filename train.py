"""Train a classifier: a base model, a model retrained without a forget set, or one trained
on manipulated data (an availability poison, a backdoor, or both).

Measured (2-core x86-64 CPU, torch 2.14.1, 3 seeds): SmallCNN on the full CIFAR-10 training
set, 4 epochs (`--model smallcnn --epochs 4 --batch-size 256 --lr 0.1 --schedule linear
--warmup 0.05`): 74.50 ± 0.23 % test accuracy, about 36 s an epoch. Defaults reproduce the
official SalUn base model (ResNet-18, 182 epochs).

    python train.py --model resnet18 --dataset cifar10 --lr 0.1
    python train.py --model resnet18 --dataset cifar100 --cf 7        # without class 7
    python train.py --model resnet18 --dataset svhn --unlr 0.1        # without 10 % of train
    torchrun --nproc_per_node 4 train.py --model resnet18     # DDP, one shard per rank
    python train.py --model smallcnn --subset 5000 --poison lsp    # on an availability poison
    python train.py --model smallcnn --subset 5000 --poison-file <file from make_poison.py>
    python train.py --model smallcnn --poison ops --attack badnets     # a poison and a backdoor
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch

import distributed
import engine
from attacks import (ATTACKS, MODES, POSITIONS, TRIGGERS, Trigger, backdoor_metrics,
                     load_release_trigger, make_trigger, plan_poisoning)
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name, checkpoint_dir, results_dir
from datasets import write_index_json
from models import canonical_model_name, expects_normalized
from reporting import write_json
from training import DataSpec, prepare_data, train_classifier
from views import TrainingView


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="resnet18, preactresnet18, resnet9, wrn28_10, "
                   "small_vgg, smallcnn, or any timm model name")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, svhn, gtsrb, or an "
                   "ImageFolder tree DATA_ROOT/<name>/{train,test}")
    p.add_argument("--download", action="store_true", help="download CIFAR-10/100 or SVHN if missing")
    p.add_argument("--seed", type=int, default=0, help="model init, shuffling, augmentation, --unlr draw")
    g = p.add_argument_group("data")
    g.add_argument("--subset", type=int, default=None, help="train on a class-balanced subset of N images")
    g.add_argument("--val-frac", type=float, default=0.1, help="stratified validation split held out")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --subset and the validation split")
    f = g.add_mutually_exclusive_group()
    f.add_argument("--cf", type=int, default=None, help="exclude this class (class forgetting)")
    f.add_argument("--unlr", type=float, default=None, help="exclude this fraction of train (random forgetting)")
    f.add_argument("--itf", default=None, help="exclude the indices in this JSON file")
    g.add_argument("--no-augment", action="store_true", help="no crop/flip")
    o = p.add_argument_group("optimisation (default: the SalUn base-model recipe)")
    o.add_argument("--epochs", type=int, default=182)
    o.add_argument("--steps", type=int, default=None, help="iteration budget (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    o.add_argument("--lr", type=float, default=0.1)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum (SGD; the fast recipe's)")
    o.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    o.add_argument("--schedule", choices=["cosine", "multistep", "linear", "constant"], default="multistep")
    o.add_argument("--milestones", default=None,
                   help="comma-separated epochs for multistep (default: 50%% and 75%% of --epochs)")
    o.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, fraction of all steps")
    o.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy loss (default 0)")
    s = p.add_argument_group("output")
    s.add_argument("--out", default=None, help="checkpoint path (default: CHECKPOINT_DIR/<model>_<dataset>_<tag>.pt)")
    s.add_argument("--comment", default=None, help="tag in the default checkpoint name")
    s.add_argument("--no-resume", action="store_true", help="ignore and do not write resume state")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    a = p.add_argument_group("availability poison (train on a poisoned training set; --attack "
                             "adds a backdoor on top)")
    a.add_argument("--poison", default=None, metavar="KEY",
                   help="lsp, ops, ar, l2-ar, cwrandom, regions-4, regions-16, l2-regions-4, patches-4, "
                        "patches-8 (generated and cached when missing), error-min, error-min-CW, "
                        "error-max (make_poison.py first), clean, or an imported name")
    a.add_argument("--poison-seed", type=int, default=None,
                   help="generation seed of --poison (default 0)")
    a.add_argument("--poison-file", default=None,
                   help="a poison file from make_poison.py (e.g. a --subset/--recipe small variant)")
    add_attack_args(p)
    add_runtime_args(p)
    return p


def availability_poison(args, data):
    """(view of the poisoned training set, checkpoint-meta record, name tag) for --poison /
    --poison-file, or None. Only the images being trained on (data.retain_idx) are replaced."""
    if args.poison is None and args.poison_file is None:
        if args.poison_seed is not None:
            raise UserError("--poison-seed is the seed of --poison; the backdoor's index draw is "
                            "--attack-seed")
        return None
    import poisons
    from datasets import balanced_subset

    seed = 0 if args.poison_seed is None else args.poison_seed
    key = args.poison or "file"
    view, meta = poisons.poison_view(key, data, seed=seed, path=args.poison_file)
    if args.poison and args.poison_file and meta.get("key") != args.poison:
        raise UserError(f"--poison-file {args.poison_file} holds poison {meta.get('key')!r}, "
                        f"not {args.poison!r}; drop --poison or pass the right file")
    idx = data.retain_idx
    covered = 1.0
    if meta.get("subset"):  # generated on a --subset draw only
        pool = balanced_subset(data.train.y, int(meta["subset"]), int(meta.get("split_seed") or 0))
        covered = float(torch.isin(idx, pool).float().mean()) if len(idx) else 1.0
        if covered < 1:
            print(f"warning: the poison covers a --subset {meta['subset']} draw; only "
                  f"{100 * covered:.1f}% of the {len(idx)} training images are poisoned "
                  f"(train with the same --subset/--split-seed to poison all)")
    path = (Path(args.poison_file) if args.poison_file
            else poisons.poison_cache_path(key, data.train.name, len(data.train), seed))
    record = {"key": meta.get("key"), "seed": meta.get("seed"), "eps": meta.get("eps"),
              "norm": meta.get("norm"), "file": str(path), "recipe": meta.get("recipe"),
              "subset": meta.get("subset"), "poisoned_fraction": covered}
    tag = (f"{key}-pseed{seed}" if seed else key) if args.poison_file is None else f"pfile-{path.stem}"
    return view, record, tag


# --- The backdoor flags (--attack ...) ------------------------------------------------

# flag dest -> trigger parameter; which of them a trigger takes comes from its dataclass fields
_TRIGGER_FLAGS = {"trigger_size": "size", "trigger_position": "position",
                  "trigger_margin": "margin", "trigger_value": "value", "blend_alpha": "alpha",
                  "sig_delta": "delta", "sig_freq": "freq", "trigger_seed": "seed"}
_ATTACK_FLAGS = ("poison_rate", "target", "attack_mode", "attack_seed", "trigger_file",
                 "trigger_mask", *_TRIGGER_FLAGS)


def add_attack_args(p) -> None:
    """The `--attack` option group (train.py). Every flag defaults to None so that a flag
    given without --attack, or one the chosen trigger does not take, is an error."""
    g = p.add_argument_group("backdoor attack (poison the training set; default: no attack)")
    g.add_argument("--attack", default=None, metavar="KIND",
                   help=f"trigger: {', '.join(ATTACKS)} (release_file needs --trigger-file)")
    g.add_argument("--poison-rate", type=float, default=None,
                   help="poisoned share of the training images (default 0.1; the I-BAU release "
                        "used 0.2). clean_label draws them from the target class only")
    g.add_argument("--target", type=int, default=None,
                   help="target class (default 0; the I-BAU BadNets release used 8)")
    g.add_argument("--attack-mode", default=None, metavar="MODE",
                   help="all2one (default), all2all (y -> y+1 mod C) or clean_label (default for sig)")
    g.add_argument("--attack-seed", type=int, default=None,
                   help="seed of the poisoned-index draw (default: --seed)")
    g.add_argument("--trigger-size", type=int, default=None, help="badnets / trojan_sq square side (px)")
    g.add_argument("--trigger-position", default=None,
                   help=f"badnets / trojan_sq: {', '.join(POSITIONS)}")
    g.add_argument("--trigger-margin", type=int, default=None, help="px between patch and border")
    g.add_argument("--trigger-value", default=None,
                   help="badnets patch gray level, or R,G,B (0-255; default 255)")
    g.add_argument("--blend-alpha", type=float, default=None, help="blend ratio (default 0.2)")
    g.add_argument("--sig-delta", type=float, default=None, help="SIG amplitude (0-255 scale, default 40)")
    g.add_argument("--sig-freq", type=float, default=None, help="SIG frequency (default 6)")
    g.add_argument("--trigger-seed", type=int, default=None,
                   help="seed of the regenerated pattern (blend, trojan_*, l0_inv, l2_inv)")
    g.add_argument("--trigger-file", default=None,
                   help="a trigger PNG of the I-BAU release (triggers/*.png); --attack release_file")
    g.add_argument("--trigger-mask", default=None, help="mask.npy for --trigger-file (l0_inv)")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _parse_value(text):
    try:
        parts = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise UserError(f"--trigger-value must be a gray level or R,G,B integers, got '{text}'") from None
    if any(not 0 <= v <= 255 for v in parts):
        raise UserError(f"--trigger-value entries must be in 0-255, got '{text}'")
    return parts[0] if len(parts) == 1 else parts


def trigger_from_args(args) -> Trigger:
    """The trigger that `--attack` and the trigger flags describe."""
    kind = str(args.attack).strip().lower().replace("-", "_")
    if kind not in ATTACKS:
        raise UserError(f"unknown --attack '{args.attack}': choose one of {', '.join(ATTACKS)}")
    if kind == "release_file":
        if not getattr(args, "trigger_file", None):
            raise UserError("--attack release_file needs --trigger-file PATH.png")
        extra = [_flag(d) for d in _TRIGGER_FLAGS if getattr(args, d, None) is not None]
        if extra:
            raise UserError(f"{', '.join(extra)} do not apply to a release trigger file")
        return load_release_trigger(args.trigger_file, getattr(args, "trigger_mask", None))
    for d in ("trigger_file", "trigger_mask"):
        if getattr(args, d, None) is not None:
            raise UserError(f"{_flag(d)} needs --attack release_file")
    allowed = {f.name for f in fields(TRIGGERS[kind]) if f.init}
    params = {}
    for dest, name in _TRIGGER_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if name not in allowed:
            takes = sorted(_flag(d) for d, n in _TRIGGER_FLAGS.items() if n in allowed)
            raise UserError(f"{_flag(dest)} does not apply to --attack {kind} "
                            f"(it takes {', '.join(takes) or 'no trigger flags'})")
        params[name] = _parse_value(value) if dest == "trigger_value" else value
    return make_trigger(kind, **params)



def poison_from_args(args, split, pool: torch.Tensor, num_classes: int | None = None):
    """PoisonPlan from train.py's flags, or None without --attack. `split` is the training
    split as trained on (with an availability poison's images, when there is one)."""
    if getattr(args, "attack", None) is None:
        given = [_flag(d) for d in _ATTACK_FLAGS if getattr(args, d, None) is not None]
        if given:
            raise UserError(f"{', '.join(given)} need(s) --attack KIND")
        return None
    trigger = trigger_from_args(args)
    mode = args.attack_mode or ("clean_label" if trigger.kind == "sig" else "all2one")
    if mode not in MODES:
        raise UserError(f"unknown --attack-mode '{mode}': use one of {', '.join(MODES)}")
    if mode == "all2all" and args.target is not None:
        raise UserError("--target does not apply to --attack-mode all2all (labels become y+1 mod C)")
    target = None if mode == "all2all" else (0 if args.target is None else args.target)
    rate = 0.1 if args.poison_rate is None else args.poison_rate
    seed = args.attack_seed if args.attack_seed is not None else getattr(args, "seed", 0)
    return plan_poisoning(split, pool, trigger, target=target, rate=rate, seed=seed, mode=mode,
                          num_classes=num_classes)




def default_tag(args, poison=None, avail_tag: str | None = None) -> str:
    if args.comment:
        return args.comment
    parts = [poison.tag] if poison is not None else []
    if avail_tag:
        parts.append(avail_tag)
    if args.cf is not None:
        parts.append(f"cf{args.cf}")
    elif args.unlr is not None:
        parts.append(f"unlr{args.unlr:g}")
    elif args.itf is not None:
        parts.append(f"itf-{Path(args.itf).stem}")
    if args.subset:
        parts.append(f"sub{args.subset}")
    parts.append(f"seed{args.seed}")
    return "_".join(parts)


def train_config(args) -> engine.TrainConfig:
    if args.epochs <= 0 and not args.steps:
        raise UserError("--epochs must be positive")
    if args.lr <= 0:
        raise UserError("--lr must be positive")
    milestones = ()
    if args.schedule == "multistep":
        try:
            milestones = (tuple(int(m) for m in args.milestones.split(",")) if args.milestones
                          else (args.epochs // 2, args.epochs * 3 // 4))
        except ValueError:
            raise UserError(f"--milestones must be comma-separated integers, got '{args.milestones}'") from None
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum <= 0):
        raise UserError("--nesterov needs --optimizer sgd and a positive --momentum")
    return engine.TrainConfig(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                              optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                              nesterov=args.nesterov,
                              weight_decay=args.weight_decay, schedule=args.schedule,
                              milestones=milestones, warmup=args.warmup,
                              augment=not args.no_augment, label_smoothing=args.label_smoothing,
                              amp=args.amp, compile=args.compile)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = setup_runtime(args)
    cfg = train_config(args)
    spec = DataSpec(args.dataset, args.subset, args.val_frac, args.split_seed,
                    args.cf, args.unlr, args.itf, args.download)
    data = prepare_data(spec, seed=args.seed)
    avail = availability_poison(args, data)
    view = avail[0] if avail else None
    # a backdoor is planned on the images as trained on: on top of the poison, if any
    poison = poison_from_args(args, view.apply_to(data.train) if view else data.train,
                              data.retain_idx, data.num_classes)
    if poison is not None:
        view = (view or TrainingView()).then(poison.view)
    model_name, ds = canonical_model_name(args.model), canonical_dataset_name(args.dataset)
    ckpt = Path(args.out) if args.out else checkpoint_dir() / f"{model_name}_{ds}_{default_tag(args, poison, avail and avail[2])}.pt"
    if ckpt.exists() and not args.force:
        print(f"{ckpt} exists; pass --force to retrain")
        return 0
    main_rank = distributed.is_main()
    logger = RunLogger(not args.no_log and main_rank, args.wandb_project, ckpt.stem, {**vars(args)})
    if main_rank:
        write_index_json(ckpt.with_name(ckpt.stem + "_forget.json"), data.forget_idx,
                         dataset=ds, split="train", cf=args.cf, unlr=args.unlr)
    out = results_dir() / "train" / f"{ckpt.stem}.json"

    def finish(model, meta, history):  # all of it before the checkpoint, the commit point
        if poison is not None:  # clean accuracy and ASR on the full test split, into the meta
            meta["backdoor"] = backdoor_metrics(model, data.test, torch.arange(len(data.test)),
                                                poison.meta, normalize=expects_normalized(model_name),
                                                device=device)
            print("backdoor: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["backdoor"].items()
                                           if isinstance(v, float)))
        if main_rank:
            write_json(out, {"checkpoint": str(ckpt), "meta": meta, "history": history,
                             "device": str(device), "torch": torch.__version__})

    model, meta, history = train_classifier(
        model_name, data, cfg, device=device, seed=args.seed,
        ckpt_path=ckpt, logger=logger, resume=not args.no_resume,
        extra_meta={"argv": sys.argv[1:] if argv is None else list(argv),
                    **({"attack": poison.meta} if poison else {}),
                    **({"poison": avail[1]} if avail else {})},
        view=view, finish=finish)
    logger.finish()
    if main_rank:
        print(f"test accuracy {meta['test_acc']:.2f}% -> {ckpt} (results: {out})")
    return 0


if __name__ == "__main__":
    run_main(main)

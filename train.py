"""Train a classifier (a base model, or a model retrained without a forget set).

    python train.py --model resnet18 --dataset cifar10 --lr 0.1
    python train.py --model resnet18 --dataset cifar100 --cf 7        # without class 7
    python train.py --model resnet18 --dataset svhn --unlr 0.1        # without 10 % of train
    torchrun --nproc_per_node 4 train.py --model resnet18     # DDP, one shard per rank
    python train.py --model smallcnn --subset 5000 --poison lsp    # on an availability poison
    python train.py --model smallcnn --subset 5000 --poison-file <file from make_poison.py>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import distributed
import engine
from attacks import add_attack_args, backdoor_metrics, poison_from_args
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name, checkpoint_dir, results_dir
from datasets import Augment, write_index_json
from models import canonical_model_name, expects_normalized
from reporting import write_json
from training import DataSpec, prepare_data, train_classifier


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
    o.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=5e-4)
    o.add_argument("--schedule", choices=["cosine", "multistep", "linear", "constant"], default="multistep")
    o.add_argument("--milestones", default=None,
                   help="comma-separated epochs for multistep (default: 50%% and 75%% of --epochs)")
    o.add_argument("--warmup", type=float, default=0.0, help="linear warm-up, fraction of all steps")
    o.add_argument("--label-smoothing", type=float, default=0.0)
    s = p.add_argument_group("output")
    s.add_argument("--out", default=None, help="checkpoint path (default: CHECKPOINT_DIR/<model>_<dataset>_<tag>.pt)")
    s.add_argument("--comment", default=None, help="tag in the default checkpoint name")
    s.add_argument("--no-resume", action="store_true", help="ignore and do not write resume state")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    a = p.add_argument_group("availability poison (train on a poisoned training set; not with --attack)")
    a.add_argument("--poison", default=None, metavar="KEY",
                   help="lsp, ops, ar, l2-ar, cwrandom, regions-4, regions-16, l2-regions-4, patches-4, "
                        "patches-8 (generated and cached when missing), error-min, error-min-CW, "
                        "error-max (make_poison.py first), clean, or an imported name; "
                        "--poison-seed N picks the generation seed (default 0)")
    a.add_argument("--poison-file", default=None,
                   help="a poison file from make_poison.py (e.g. a --subset/--recipe small variant)")
    add_attack_args(p)
    add_runtime_args(p)
    return p


def availability_poison(args, data):
    """(loader overrides, checkpoint-meta record, name tag) for --poison/--poison-file, or None.
    Only the images being trained on (data.retain_idx) are replaced."""
    if args.poison is None and args.poison_file is None:
        return None
    import poisons
    from datasets import balanced_subset

    seed = 0 if args.poison_seed is None else args.poison_seed
    key = args.poison or "file"
    images, labels, meta = poisons.poisoned_train_set(key, data.spec.dataset, seed=seed,
                                                      path=args.poison_file, split=data.train)
    if args.poison and args.poison_file and meta.get("key") != args.poison:
        raise UserError(f"--poison-file {args.poison_file} holds poison {meta.get('key')!r}, "
                        f"not {args.poison!r}; drop --poison or pass the right file")
    idx = data.retain_idx
    overrides = {} if key == "clean" and args.poison_file is None else {"replace": (idx, images[idx])}
    if not torch.equal(labels, data.train.y):
        overrides["labels"] = labels  # a poison with its own labels (NTGA)
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
    return overrides, record, tag


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
    return engine.TrainConfig(epochs=args.epochs, steps=args.steps, optimizer=args.optimizer, lr=args.lr,
                              momentum=args.momentum, weight_decay=args.weight_decay,
                              schedule=args.schedule, milestones=milestones, warmup=args.warmup,
                              amp=args.amp, compile=args.compile)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = setup_runtime(args)
    cfg = train_config(args)
    spec = DataSpec(args.dataset, args.subset, args.val_frac, args.split_seed,
                    args.cf, args.unlr, args.itf, args.download)
    if (args.poison is not None or args.poison_file is not None) and args.attack is not None:
        raise UserError("--poison/--poison-file (availability poison) and --attack (backdoor) are "
                        "mutually exclusive; pick one")
    data = prepare_data(spec, seed=args.seed)
    avail = availability_poison(args, data)
    if avail is not None:
        args.poison_seed = None  # it named the availability poison's seed, not a backdoor's
    poison = poison_from_args(args, data.train, data.retain_idx, data.num_classes)
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
    augment = None if not args.no_augment else Augment(crop=0, flip=False)
    model, meta, history = train_classifier(
        model_name, data, cfg, device=device, batch_size=args.batch_size, seed=args.seed,
        ckpt_path=ckpt, augment=augment, logger=logger, resume=not args.no_resume,
        extra_meta={"argv": sys.argv[1:] if argv is None else list(argv),
                    **({"attack": poison.meta} if poison else {}),
                    **({"poison": avail[1]} if avail else {})},
        loader_overrides=poison.loader_overrides if poison else (avail[0] if avail else None))
    if poison is not None:  # clean accuracy and ASR on the full test split, into the meta
        meta["backdoor"] = backdoor_metrics(model, data.test, torch.arange(len(data.test)), poison.meta,
                                            normalize=expects_normalized(model_name), device=device)
        engine.save_checkpoint(ckpt, model, meta)
        print("backdoor: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["backdoor"].items()
                                       if isinstance(v, float)))
    logger.finish()
    if not main_rank:
        return 0
    out = results_dir() / "train" / f"{ckpt.stem}.json"
    write_json(out, {"checkpoint": str(ckpt), "meta": meta, "history": history,
                     "device": str(device), "torch": torch.__version__})
    print(f"test accuracy {meta['test_acc']:.2f}% -> {ckpt} (results: {out})")
    return 0


if __name__ == "__main__":
    run_main(main)

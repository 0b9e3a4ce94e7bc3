"""Reproduces the availability poisons of "What Can We Learn from Unlearnable Datasets?"
(Sandoval-Segura et al., NeurIPS 2023): LSP, OPS, autoregressive (AR) noise, unlearnable examples
(error-min) and TAP (error-max), generated or imported, each saved as one file of the poisoned
training split. Measured on a 2-core x86-64 CPU, no GPU, torch 2.14.1:

  generation time, all 50,000 CIFAR-10 training images (bash exp/poisons_cpu.sh gen, i.e.
  python make_poison.py KEY --force --device cpu):
      lsp 6.4 s, ops 6.2 s, l2-ar 25.1 s, cwrandom 4.2 s
  small recipes on a 5,000-image subset (bash exp/poisons_cpu.sh small):
      error-min 173 s, error-max 72 s
  SmallCNN trained on each poison (4,500 images, 15 epochs, 3 seeds; bash exp/poisons_cpu.sh
  train), clean test accuracy in %, mean ± std:
      clean 65.16 ± 0.55, lsp 37.57 ± 1.24, ops 12.58 ± 1.01, l2-ar 10.78 ± 0.11,
      error-min-small 21.62 ± 6.23, error-max-small 34.53 ± 3.19
  so every poison leaves the network far below what it learns from the clean images.

Generate (or import) an availability poison of a training split and save it as one file:

    python make_poison.py lsp                                    # seconds to minutes on a CPU
    python make_poison.py ops --dataset cifar100 --seed 1
    python make_poison.py l2-ar --eps 0.5
    python make_poison.py error-min --recipe small --subset 5000  # unlearnable examples, CPU-scale
    python make_poison.py error-max                              # the paper's settings (GPU-hours)
    python make_poison.py error-max --import-format tap --path ~/poisons/targeted_ResNet18_iter_250

Keys: lsp, ops, ar, l2-ar, cwrandom, regions-4, regions-16, l2-regions-4, patches-4, patches-8
(cheap; train.py --poison KEY also generates these when missing) and error-min, error-min-CW,
error-max (train a surrogate; only generated here; TAP or tap = error-max). Their definitions:
poison_generators.py (cheap) and poison_surrogate.py (surrogate); the formats:
poison_importers.py.

Output: CACHE_DIR/poisons/<dataset>-<N>_<key>_seed<seed>[_eps<eps>].pt (N = training images),
where `train.py --poison KEY` and the DFR / orthogonal-projection scripts look for KEY. A variant
(--subset, --recipe small, explicit surrogate options) gets a suffixed name
(..._sub5000_small.pt); pass it to those scripts with --poison-file. The file always covers the
whole training split (images outside --subset stay clean). A PNG (clean / perturbation /
poisoned, one image per class) goes to RESULTS_DIR/poisons/<file name>.png.

Recipes for the expensive keys (`poisons.RECIPES`):
  paper  the published settings: a ResNet-18 surrogate; error-min: 20 steps per round until the
         surrogate's error on the poison is <= 1 %; error-max: 40 clean epochs, then 250 PGD
         passes x 8 restarts.
  small  a CPU recipe: SmallCNN surrogate; error-min: 5 steps per round, at most 6 rounds;
         error-min-CW: at most 10 rounds on all the data; error-max: 5 clean epochs, 10 PGD
         passes of 2/255, 1 restart. Timed above with --subset 5000 (error-min-CW small:
         not timed).
Any single option can be overridden (--model, --steps, --max-rounds, --set name=value, ...).
"""
from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import torch

import poisons
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name, results_dir
from datasets import balanced_subset, load_split

FORMATS = tuple(poisons.IMPORTERS)
# Flags that become generator options (dest -> option name); None = not given.
OPTION_FLAGS = {"model": "model", "steps": "steps", "step_size": "step_size",
                "train_step": "train_step", "stop_error": "stop_error", "max_rounds": "max_rounds",
                "restarts": "restarts", "surrogate_epochs": "epochs", "batch_size": "batch_size",
                "fraction": "fraction"}


def number(text: str) -> float:
    """A float, or a fraction such as 8/255."""
    try:
        if "/" in text:
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number such as 0.0314 or 8/255, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("key", help="poison key (see above); with --import-format any name for the file")
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, svhn, gtsrb, or an "
                   "ImageFolder tree DATA_ROOT/<name>/{train,test}")
    p.add_argument("--download", action="store_true", help="download CIFAR-10/100 or SVHN if missing")
    p.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    p.add_argument("--eps", type=number, default=None,
                   help="budget on the [0,1] pixel scale, e.g. 8/255 (L∞) or 1.0 (L2); default: the key's")
    p.add_argument("--out", default=None, help="output file (default: see above)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--no-png", action="store_true", help="skip the picture")
    g = p.add_argument_group("generation on part of the data / surrogate options (error-min, error-max)")
    g.add_argument("--subset", type=int, default=None,
                   help="poison only a class-balanced subset of N images (the same draw as "
                        "train.py --subset N with the same --split-seed)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --subset (default 0)")
    g.add_argument("--recipe", choices=["paper", "small"], default=None,
                   help="paper (default) or small (CPU-scale); see above")
    g.add_argument("--model", default=None, help="surrogate: resnet18 (paper), smallcnn (small), ...")
    g.add_argument("--steps", type=int, default=None,
                   help="error-min: descent steps per round; error-max: PGD passes over the data")
    g.add_argument("--step-size", type=number, default=None, help="signed-gradient step, e.g. 0.8/255")
    g.add_argument("--train-step", type=int, default=None, help="error-min: surrogate batches per round")
    g.add_argument("--stop-error", type=float, default=None,
                   help="error-min: stop when the surrogate's error on the poison is <= this (0.01)")
    g.add_argument("--max-rounds", type=int, default=None, help="error-min: cap on the rounds")
    g.add_argument("--restarts", type=int, default=None, help="error-max: PGD restarts")
    g.add_argument("--surrogate-epochs", type=int, default=None, help="error-max: clean training epochs")
    g.add_argument("--batch-size", type=int, default=None, help="surrogate training batch size")
    g.add_argument("--fraction", type=float, default=None,
                   help="error-min-CW: share of the data the class noise is optimised on (0.2)")
    g.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="any other generator option, e.g. --set random_start=true (repeatable)")
    i = p.add_argument_group("import a published poison instead of generating one")
    i.add_argument("--import-format", choices=FORMATS, default=None,
                   help="tap (data/<idx>.png), ule (perturbation.pt), rem (.pkl), ntga (x/y .npy), "
                        "ops (perturbation.npy), lsp (simple_data.npy + simple_label.npy)")
    i.add_argument("--path", default=None, help="the published poison's folder or file")
    add_runtime_args(p)
    return p


def _literal(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return number(text)
    except argparse.ArgumentTypeError:
        return text


def generator_options(args) -> tuple[dict, dict]:
    """(all options: recipe + explicit, the explicit ones alone)."""
    explicit = {opt: getattr(args, dest) for dest, opt in OPTION_FLAGS.items()
                if getattr(args, dest) is not None}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise UserError(f"--set takes name=value with a lower-case option name, got {item!r}")
        explicit[name] = _literal(value)
    options = poisons.recipe_options(args.key, args.recipe) if args.recipe else {}
    options.update(explicit)
    return options, explicit


def _measured_bounds(clean: torch.Tensor, poisoned: torch.Tensor) -> dict:
    linf, l2 = 0.0, 0.0
    for s in range(0, len(clean), 4096):
        d = (poisoned[s:s + 4096].double() - clean[s:s + 4096].double()) / 255
        if len(d):
            linf = max(linf, float(d.abs().max()))
            l2 = max(l2, float(d.flatten(1).norm(dim=1).max()))
    return {"measured_linf": linf, "measured_l2_max": l2}


def check_args(args) -> None:
    importing = args.import_format is not None
    if importing != (args.path is not None):
        raise UserError("--import-format and --path go together")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.eps is not None and not (math.isfinite(args.eps) and args.eps > 0):
        raise UserError(f"--eps must be a positive number on the [0,1] pixel scale (e.g. 8/255), got {args.eps}")
    if importing:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.key):
            raise UserError(f"poison name {args.key!r} may hold only letters, digits, '_', '-' and '.'")
        given = [f for f, v in (("--eps", args.eps), ("--subset", args.subset), ("--recipe", args.recipe))
                 if v is not None]
        given += ["--" + d.replace("_", "-") for d in OPTION_FLAGS if getattr(args, d) is not None]
        if given or args.set:
            raise UserError(f"{', '.join(given) or '--set'}: only for generated poisons, not with --import-format")
    elif args.key not in poisons.GENERATORS:
        poisons.resolve_bound(args.key, None, (3, 32, 32))  # raises the unknown-key error
    if not importing and args.key not in poisons.RECIPES:
        extra = [f"--{d.replace('_', '-')}" for d in OPTION_FLAGS if getattr(args, d) is not None]
        if args.recipe is not None:
            extra.insert(0, "--recipe")
        if extra:
            raise UserError(f"{', '.join(extra)}: only for {', '.join(poisons.RECIPES)}; "
                            f"{args.key} trains no surrogate")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.import_format is None:  # a generator's other name (TAP) makes the key's file
        args.key = poisons.canonical_key(args.key)
    check_args(args)
    device = setup_runtime(args)
    options, explicit = ({}, {}) if args.import_format else generator_options(args)
    ds = canonical_dataset_name(args.dataset)
    split = load_split(args.dataset, True, download=args.download)
    num_classes = max(len(split.classes), int(split.y.max()) + 1)
    if args.import_format is None:
        poisons.resolve_bound(args.key, args.eps, split.x.shape)  # key and ε, before any work
    idx = balanced_subset(split.y, args.subset, args.split_seed) if args.subset else None
    out = Path(args.out) if args.out else poisons.poison_file_path(
        args.key, split.name, len(split), args.seed, args.eps, subset=args.subset,
        split_seed=args.split_seed, recipe=args.recipe, options=explicit)
    if out.exists() and not args.force:
        print(f"{out} exists; pass --force to regenerate")
        return 0
    if args.import_format is not None:
        t = time.perf_counter()
        images, labels = poisons.import_poison(args.import_format, args.path, split.x, split.y, num_classes)
        meta = {"key": args.key, "eps": None, "norm": None, "seed": args.seed, "dataset": split.name,
                "generation_seconds": round(time.perf_counter() - t, 3),
                "imported": {"format": args.import_format, "path": str(Path(args.path).resolve())},
                **_measured_bounds(split.x, images)}
        shown = torch.arange(len(split))
        what = f"imported {args.import_format} poison {args.path}"
    else:
        if args.key in poisons.EXPENSIVE:
            options.setdefault("device", str(device))
            if args.recipe in (None, "paper") and device.type == "cpu":
                print(f"note: {args.key} at the paper's settings on a CPU takes many hours; "
                      f"--recipe small --subset 5000 takes minutes")
        shown = torch.arange(len(split)) if idx is None else idx
        part, meta = poisons.timed_generate(args.key, split.x[shown], split.y[shown], num_classes,
                                            seed=args.seed, eps=args.eps, dataset=split.name, **options)
        images, labels = split.x, split.y.clone()
        if idx is None:
            images = part
        else:
            images = split.x.clone()
            images[idx] = part
        meta.update(recipe=args.recipe or ("paper" if args.key in poisons.RECIPES else None),
                    subset=args.subset, split_seed=args.split_seed if args.subset else None,
                    n_poisoned=len(shown))
        what = f"generated {args.key} on {len(shown)} {split.name} images"
    poisons.save_poison(out, images, labels, meta)
    print(f"{what} in {meta['generation_seconds']:.1f} s -> {out}")
    if "report" in meta:
        print("surrogate: " + ", ".join(f"{k} {v:.4g}" for k, v in meta["report"].items()
                                        if isinstance(v, float)))
    if not args.no_png:
        png = poisons.save_poison_grid(results_dir() / "poisons" / f"{out.stem}.png",
                                       split.x[shown], images[shown], split.y[shown])
        print(f"picture: {png}")
    default = poisons.poison_cache_path(args.key, split.name, len(split), args.seed, args.eps)
    if out.resolve() == default.resolve():
        seed = f" --poison-seed {args.seed}" if args.seed else ""
        print(f"train on it: python train.py --poison {args.key}{seed}"
              + ("" if ds == "cifar10" else f" --dataset {ds}"))
    else:
        sub = f" --subset {args.subset}" + (f" --split-seed {args.split_seed}" if args.split_seed else "") \
            if args.subset else ""
        print(f"train on it: python train.py --poison-file {out}{sub}"
              + ("" if ds == "cifar10" else f" --dataset {ds}"))
    return 0


if __name__ == "__main__":
    run_main(main)

"""orthogonal_projection_step_2.py: step 2 of orthogonal projection (Algorithm 1, lines 5-6, §4.4
of "What Can We Learn from Unlearnable Datasets?", Sandoval-Segura et al., NeurIPS 2023): project
every poisoned training image onto the orthogonal complement of the class weights that step 1
recovered (X_r = X - X Q Q^T, Q an orthonormal basis of the L2-normalised class weight vectors),
train a network on the projected images and test it on the clean, unprojected test set.

Measured with SmallCNN, 10 epochs, on a 5,000-image CIFAR-10 subset (step 1: 500 epochs on the
same subset), seeds 0, 1, 2 (2-core x86-64 CPU, no GPU, torch 2.14.1; `bash exp/lfu_cpu.sh op`):
clean test accuracy OPS 36.34 ± 2.21 % without projection -> 47.48 ± 2.04 % with it (clean
training 50.58 ± 1.60 %), 78 ± 4 % of the gap won back; LSP 42.83 ± 0.76 -> 48.53 ± 1.56 %, 73 ± 4 %.

    python orthogonal_projection_step_2.py KEY --model smallcnn --subset 5000 --epochs 10 --seed S \
        [--no-project] --device cpu -NL                  # KEY: ops, lsp; clean --no-project

Usage:

    python orthogonal_projection_step_2.py ops                # paper defaults (GPU)
    python orthogonal_projection_step_2.py ops --no-project   # baseline: the poison as is
    python orthogonal_projection_step_2.py clean --no-project # reference: clean training
    python orthogonal_projection_step_2.py lsp --model smallcnn --subset 20000 --epochs 15

Recipe (paper defaults): ResNet-18, 50 epochs, SGD lr 0.1 momentum 0.9 weight decay 1e-4,
batch 128, LR x0.1 at 50% and 75% of the epochs (25, 37), CutMix (beta 1, probability 0.5),
strong augmentation (rotation 10 deg, shear 10 deg, scale 0.8-1.2, colour jitter 0.2, crop,
flip; --no-strong-aug: crop + flip). The projection is the data loader's transform, applied to
the [0,1] images before augmentation; inputs are normalised the same way for training and test
in every mode (the official script skipped it under --no-strong-aug).

Saves CHECKPOINT_DIR/orthogonal_projection/<tag>.pt and RESULTS_DIR/orthogonal_projection/<tag>.json
(final clean test accuracy, per-epoch history). Interrupted runs resume.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

import distributed
import engine
import poisons
from augmentation import CutMixLoss, StrongAugment
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import UserError
from datasets import Augment
from models import canonical_model_name
from orthogonal_projection import OrthogonalProjection, load_class_weights, milestones_at
from reporting import write_json
from training import DataSpec, prepare_data, train_classifier
from unlearnable_cli import (add_model_args, add_poison_args, add_sgd_args, linear_model_path,
                             projection_checkpoint_path, projection_results_folder,
                             projection_run_name, refuse_unused, run_name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_poison_args(p)
    add_model_args(p, "model init, shuffling, augmentation, CutMix")
    m = p.add_argument_group("projection")
    m.add_argument("--no-project", action="store_true", help="train on the poison as it is (baseline)")
    m.add_argument("--linear-ckpt", default=None,
                   help="step 1's linear model (default: where orthogonal_projection_step_1.py "
                        "puts it for this poison/--dataset/--subset)")
    m.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", default=None,
                   help="step 1's --checkpoint_dir, and the root of this step's checkpoint")
    o = add_sgd_args(p, "optimisation (default: the paper's)", epochs=50, batch_size=128)
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    o.add_argument("--weight_decay", "--wd", dest="weight_decay", type=float, default=1e-4,
                   help="weight decay (default 1e-4)")
    o.add_argument("--milestones", default=None,
                   help="comma-separated epochs of LR x0.1 (default: int(50%%), int(75%%) of --epochs)")
    o.add_argument("--beta", type=float, default=1.0, help="CutMix beta; 0 disables CutMix")
    o.add_argument("--cutmix_prob", "--cutmix-prob", dest="cutmix_prob", type=float, default=0.5,
                   help="probability that a batch is CutMixed (default 0.5)")
    o.add_argument("--no-strong-aug", action="store_true", help="crop + flip only")
    s = p.add_argument_group("output")
    s.add_argument("--out", default=None, help="checkpoint path (default: see above)")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    add_runtime_args(p)
    return p


def check_args(parser, args) -> None:
    if args.no_project:
        refuse_unused(parser, args, ("linear_ckpt",), "with --no-project (no linear model is used)")
    if args.out and (args.no_project or args.linear_ckpt):
        refuse_unused(parser, args, ("checkpoint_dir",),
                      "with --out and no step-1 linear model to look up")


def train_config(args) -> engine.TrainConfig:
    if args.epochs <= 0 or args.lr <= 0 or args.batch_size <= 0:
        raise UserError("--epochs, --lr and --batch_size must be positive")
    try:
        milestones = (tuple(int(m) for m in args.milestones.split(",")) if args.milestones
                      else milestones_at(args.epochs))
    except ValueError:
        raise UserError(f"--milestones must be comma-separated integers, got {args.milestones!r}") from None
    return engine.TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay, schedule="multistep",
                              milestones=milestones, amp=args.amp, compile=args.compile)


def tag(args, model_name) -> str:
    """This run's name: the checkpoint's and the results file's stem."""
    return projection_run_name(args.poison, run_name(model_name, args.dataset, args.subset, args.seed),
                               project=not args.no_project, strong_aug=not args.no_strong_aug,
                               cutmix=args.beta > 0 and args.cutmix_prob > 0, epochs=args.epochs)


def find_linear_model(args) -> Path | None:
    """Step 1's linear model (None with --no-project); an error when it is missing."""
    if args.no_project:
        return None
    linear = Path(args.linear_ckpt) if args.linear_ckpt else linear_model_path(
        args.poison, args.dataset, args.subset, args.checkpoint_dir)
    if not linear.is_file():
        raise UserError(f"linear model {linear} not found; run orthogonal_projection_step_1.py "
                        f"{args.poison} with the same --dataset/--subset first, or pass --linear-ckpt")
    return linear


def file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    cfg = train_config(args)
    loss_fn = CutMixLoss(args.beta, args.cutmix_prob)
    model_name = canonical_model_name(args.model)
    name = tag(args, model_name)
    ckpt = Path(args.out) if args.out else projection_checkpoint_path(name, args.checkpoint_dir)
    linear = find_linear_model(args)
    linear_digest = file_digest(linear) if linear else None
    if ckpt.exists() and not args.force:
        # The name does not encode step 1's model: a rerun of step 1 must not be silently ignored.
        if engine.load_checkpoint(ckpt)[1].get("linear_sha1") == linear_digest:
            print(f"{ckpt} exists; pass --force to retrain")
            return 0
        print(f"{ckpt} was trained with another linear model than {linear}; retraining")
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, args.subset, args.val_frac, args.split_seed), seed=args.seed)
    view, poison_meta = poisons.poison_view(args.poison, data, seed=args.poison_seed, path=args.poison_file)
    transform = None
    if linear:
        weight = load_class_weights(linear, data.num_classes, data.train.x.shape[1:])
        transform = OrthogonalProjection(weight)
    augment = Augment() if args.no_strong_aug else StrongAugment()
    extra = {"poison": args.poison, "poison_meta": poison_meta, "project": not args.no_project,
             "linear_ckpt": str(linear) if linear else None, "linear_sha1": linear_digest,
             "strong_aug": not args.no_strong_aug,
             "cutmix": {"beta": args.beta, "prob": args.cutmix_prob}}
    out = projection_results_folder() / f"{ckpt.stem}.json"

    def write_results(model, final, history):  # before the checkpoint, the commit point
        if distributed.is_main():
            write_json(out, {"checkpoint": str(ckpt), "argv": sys.argv[1:] if argv is None else list(argv),
                             "test_acc": final["test_acc"], "meta": final, "history": history,
                             "device": str(device), "torch": torch.__version__})

    logger = RunLogger(not args.no_log and distributed.is_main(), args.wandb_project, f"op2-{name}",
                       vars(args))
    _, meta, history = train_classifier(
        model_name, data, cfg, device=device, batch_size=args.batch_size, seed=args.seed,
        ckpt_path=ckpt, extra_meta=extra, augment=augment, logger=logger, loss_fn=loss_fn,
        view=view, transform=transform, finish=write_results)
    logger.finish()
    if not distributed.is_main():
        return 0
    what = "without projection" if args.no_project else "after orthogonal projection"
    print(f"clean test accuracy {what} ({args.poison}): {meta['test_acc']:.2f}% -> {ckpt} "
          f"(results: {out})")
    return 0


if __name__ == "__main__":
    run_main(main)

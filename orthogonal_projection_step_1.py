"""Orthogonal Projection, step 1 (Algorithm 1, lines 1-4, §4.4): train a bias-free linear model
on the poisoned images (raw [0,1] pixels, flattened; no normalisation, no augmentation, no
shuffling; plain SGD lr 0.1, batch 1024, 20 epochs, LR x0.1 at epochs 10 and 15). Its class
weight vectors are the recovered class-wise perturbations, which step 2 projects out.

    python orthogonal_projection_step_1.py ops
    python orthogonal_projection_step_1.py lsp --subset 20000

Saves CHECKPOINT_DIR/logistic-regression/<poison>[-<dataset>][-sub<N>].pt (state_dict key
fc.weight, K x C*H*W, as the official checkpoints) and, under RESULTS_DIR/orthogonal_projection/,
<same>_weights.png (one image per class, each min-max scaled, any number of classes) and
<same>_linear.json (train accuracy on the poison, clean test accuracy of the linear model).
"""
from __future__ import annotations

import argparse
import sys

import torch

import engine
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name, results_dir
from datasets import BatchLoader
from reporting import write_json
from training import DataSpec, prepare_data
from unlearnable import (add_poison_args, add_sgd_args, fit_class_weights, linear_model_path, poison_overrides,
                         save_weight_grid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_poison_args(p, what="recover")
    o = add_sgd_args(p, "optimisation (default: the paper's)", epochs=20, batch_size=1024,
                     epochs_help="milestones at 50%% and 75%%")
    o.add_argument("--seed", type=int, default=0, help="initialisation of the linear model")
    s = p.add_argument_group("output")
    s.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", default=None,
                   help="root instead of CHECKPOINT_DIR (the logistic-regression/ layout is kept)")
    add_runtime_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.epochs <= 0 or args.lr <= 0 or args.batch_size <= 0:
        raise UserError("--epochs, --lr and --batch_size must be positive")
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, args.subset, 0.0, args.split_seed))
    overrides, poison_meta = poison_overrides(args.poison, data, args.poison_seed, args.poison_file)
    loader = BatchLoader(data.train, data.retain_idx, batch_size=args.batch_size, shuffle=False,
                         device=device, augment=None, normalize=False, **overrides)
    model, history = fit_class_weights(loader, data.num_classes, args.epochs, args.lr, args.seed,
                                       device, desc=f"linear model on {args.poison}")
    test = BatchLoader(data.test, None, batch_size=4096, device=device, normalize=False)
    test_acc = engine.accuracy_on(model, test, amp=False)
    train_acc = history[-1].get("train_acc")

    path = linear_model_path(args.poison, args.dataset, args.subset, args.checkpoint_dir)
    meta = {"poison": args.poison, "poison_meta": poison_meta, "dataset": data.train.name,
            "num_classes": data.num_classes, "image_shape": list(data.train.x.shape[1:]),
            "subset": args.subset, "split_seed": args.split_seed, "epochs": args.epochs,
            "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
            "train_acc": train_acc, "clean_test_acc": test_acc}
    engine.save_checkpoint(path, model, meta)
    out = results_dir() / "orthogonal_projection"
    png = save_weight_grid(model.fc.weight, data.train.x.shape[1:], out / f"{path.stem}_weights.png",
                           data.train.classes)
    write_json(out / f"{path.stem}_linear.json",
               {**meta, "checkpoint": str(path), "history": history, "device": str(device),
                "argv": sys.argv[1:] if argv is None else list(argv), "torch": torch.__version__,
                "dataset_key": canonical_dataset_name(args.dataset)})
    print(f"linear model on {args.poison}: train accuracy {train_acc:.2f}% (poisoned), clean test "
          f"accuracy {test_acc:.2f}% -> {path}; recovered perturbations: {png}")
    return 0


if __name__ == "__main__":
    run_main(main)

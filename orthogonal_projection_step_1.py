"""orthogonal_projection_step_1.py: step 1 of orthogonal projection (Algorithm 1, lines 1-4, §4.4
of "What Can We Learn from Unlearnable Datasets?", Sandoval-Segura et al., NeurIPS 2023): train a
bias-free linear model on the poisoned images (raw [0,1] pixels, flattened; no normalisation, no
augmentation, no shuffling; plain SGD lr 0.1, batch 1024, 20 epochs, LR x0.1 at epochs 10 and
15). Its class weight vectors are the recovered class-wise perturbations, which step 2 projects out.

Measured with step 2 on a 5,000-image CIFAR-10 subset, 500 epochs here (the paper's 20 epochs are
only 100 SGD steps on 5,000 images; 500 fit 93 % of OPS, 82 % of LSP), SmallCNN for 10 epochs in
step 2, seeds 0, 1, 2 (2-core
x86-64 CPU, no GPU, torch 2.14.1; `bash exp/lfu_cpu.sh op`): clean test accuracy OPS 36.34 ± 2.21 %
without projection -> 47.48 ± 2.04 % with it (clean training 50.58 ± 1.60 %), 78 ± 4 % of the gap
won back; LSP 42.83 ± 0.76 -> 48.53 ± 1.56 %, 73 ± 4 %.

    python orthogonal_projection_step_1.py KEY --subset 5000 --epochs 500 --device cpu -NL   # ops, lsp

Usage:

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
import poisons
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name
from datasets import BatchLoader
from orthogonal_projection import fit_class_weights
from plotting import save_weight_grid
from reporting import write_json
from training import DataSpec, prepare_data
from unlearnable_cli import (add_poison_args, add_sgd_args, linear_model_path,
                             projection_results_folder, refuse_unused)


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


def check_args(parser, args) -> None:
    if args.epochs <= 0 or args.lr <= 0 or args.batch_size <= 0:
        raise UserError("--epochs, --lr and --batch_size must be positive")
    refuse_unused(parser, args, ("amp", "compile", "wandb_project"),
                  "here (the linear model trains in float32, uncompiled, and logs no wandb run)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, args.subset, 0.0, args.split_seed))
    view, poison_meta = poisons.poison_view(args.poison, data, seed=args.poison_seed, path=args.poison_file)
    loader = BatchLoader(data.train, data.retain_idx, batch_size=args.batch_size, shuffle=False,
                         device=device, augment=None, normalize=False, view=view)
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
    out = projection_results_folder()
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

"""dfr_step_2.py: deep feature reweighting (DFR, §4.2 of "What Can We Learn from Unlearnable
Datasets?", Sandoval-Segura et al., NeurIPS 2023) of dfr_step_1.py's checkpoints. Only the last
layer is refit, on a fixed clean subset of the training set; the clean test accuracy before and
after is reported (the paper: features learned on unlearnable data are still useful).

Measured on OPS, SmallCNN, a 20,000-image subset, 10 epochs, seeds 0, 1, 2 (2-core x86-64 CPU,
no GPU, torch 2.14.1; `bash exp/lfu_cpu.sh dfr`, at commit e3cee9d): clean test accuracy of the
final checkpoint 24.92 ± 0.23 % before DFR, 52.19 ± 0.78 % after DFR on 5,000 clean images;
DFR on a random network 40.68 ± 0.75 %.

    python dfr_step_2.py ops --model smallcnn --subset 20000 --seed S --epoch all --random_init \\
        --num_dfr_train 5000 --device cpu -NL

Usage:

    python dfr_step_2.py error-max --epoch 9
    python dfr_step_2.py ops --epoch all                   # every checkpoint, plus a plot
    python dfr_step_2.py ops --epoch all --random_init     # also: the random-network baseline
    python dfr_step_2.py ops --model smallcnn --subset 10000 --epoch all --num_dfr_train 5000

Default (fast): the subset's and the test set's features are computed once with the network in
eval mode (no augmentation), and the head is refit by full-batch L-BFGS on the cached features,
starting from the checkpoint's head (steps x iterations as the official 15 epochs x 5 batches x 20).
`--dfr-augment` reproduces the official procedure instead: augmented clean batches through the
training loop with the network in train mode, so BatchNorm running statistics are re-estimated
on the clean subset; every parameter but the head is frozen (first-order optimiser: the loop has
no L-BFGS). The flags of the other mode are refused.

The subset (`--num_dfr_train`, class-balanced, `--dfr-seed`) is drawn once and saved to
CHECKPOINT_DIR/dfr_indices/<dataset>/train_<N>samples_seed<S>.json; every later run reuses it.
Results: RESULTS_DIR/dfr/<poison>/<run>/num_dfr=<N>/<cached|augment>/epoch=<E>.json (skipped
when present, unless --force), random-init.json, and with --epoch all, summary.json and
dfr_vs_epoch.png. Keys: test_acc/test_loss (before), dfr_test_acc/dfr_test_loss (after), and
subset_acc/dfr_subset_acc on the DFR subset itself.
"""
from __future__ import annotations

import argparse
import json

import torch

import engine
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, canonical_dataset_name
from dfr import dfr_augment, dfr_cached, dfr_indices
from models import canonical_model_name
from plotting import plot_lines
from reporting import write_json
from training import DataSpec, build_model, make_loader, prepare_data
from unlearnable_cli import (dfr_checkpoint_folder, dfr_indices_path, dfr_results_folder,
                             epoch_checkpoints, refuse_unused, require_positive)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("poison", help="the poison key dfr_step_1.py trained on")
    p.add_argument("--epoch", default=None,
                   help="checkpoint epoch (0-based, as the files; -1 = the last) or 'all' "
                        "(required unless --random_init)")
    f = p.add_argument_group("which step-1 run (the same flags as dfr_step_1.py)")
    f.add_argument("--model", "--model_name", dest="model", default="resnet18",
                   help="step 1's --model (default resnet18)")
    f.add_argument("--dataset", "--clean_data_name", dest="dataset", default="cifar10",
                   help="the clean data of the poison (default cifar10)")
    f.add_argument("--subset", type=int, default=None, help="step 1's --subset")
    f.add_argument("--seed", type=int, default=0, help="step 1's --seed (also seeds --random_init)")
    f.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", default=None,
                   help="step 1's --checkpoint_dir")
    d = p.add_argument_group("DFR")
    d.add_argument("--num_dfr_train", "--num-dfr-train", dest="num_dfr_train", type=int, default=5000,
                   help="size of the clean subset (default 5000, 10%% of CIFAR-10)")
    d.add_argument("--dfr-seed", type=int, default=0, help="seed of the subset (drawn once, saved)")
    d.add_argument("--random_init", "--random-init", dest="random_init", action="store_true",
                   help="DFR on a randomly initialised network (the baseline); with --epoch all "
                        "it is added to the plot")
    d.add_argument("--dfr-steps", type=int, default=75, help="L-BFGS steps (default 75)")
    d.add_argument("--dfr-iters", type=int, default=20, help="L-BFGS iterations per step (default 20)")
    d.add_argument("--dfr-lr", type=float, default=0.5, help="L-BFGS learning rate (default 0.5)")
    d.add_argument("--dfr-wd", type=float, default=0.0, help="L2 penalty on the head (default 0)")
    d.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=128,
                   help="batches of 8x this (1024), as the original")
    a = p.add_argument_group("--dfr-augment (the official procedure)")
    a.add_argument("--dfr-augment", action="store_true",
                   help="augmented batches through the loop, BatchNorm statistics re-estimated")
    a.add_argument("--augment-epochs", type=int, default=15,
                   help="epochs over the subset (default 15, as the original)")
    a.add_argument("--augment-optimizer", choices=["sgd", "adam"], default="adam",
                   help="optimiser of the head (default adam; momentum 0.9 for sgd)")
    a.add_argument("--augment-lr", type=float, default=0.05,
                   help="its constant learning rate (default 0.05)")
    p.add_argument("--force", action="store_true", help="recompute existing results")
    add_runtime_args(p)
    return p


def parse_epochs(value, available: dict, folder) -> list[int]:
    have = sorted(available)
    span = f"{have[0]}..{have[-1]}" if have else "none"
    if value == "all":
        return have
    try:
        e = int(value)
    except ValueError:
        raise UserError(f"--epoch must be an integer or 'all', got {value!r}") from None
    if e < 0 and len(have) >= -e:
        e = have[e]  # -1: the last checkpoint
    if e not in available:
        raise UserError(f"no checkpoint for epoch {e} in {folder} (available: {span})")
    return [e]


def check_args(parser, args) -> None:
    require_positive(parser, args, ("num_dfr_train", "dfr_steps", "dfr_iters", "batch_size",
                                    "augment_epochs"))
    refuse_unused(parser, args, ("compile", "wandb_project"),
                  "here (DFR runs the network uncompiled and logs no wandb run)")
    if args.dfr_augment:
        refuse_unused(parser, args, ("dfr_steps", "dfr_iters", "dfr_lr"),
                      "with --dfr-augment (they set the default mode's L-BFGS fit)")
    else:
        refuse_unused(parser, args, ("augment_epochs", "augment_optimizer", "augment_lr"),
                      "without --dfr-augment")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    model_name = canonical_model_name(args.model)
    folder = dfr_checkpoint_folder(args.poison, model_name, args.dataset, args.subset, args.seed,
                                   args.checkpoint_dir)
    available = epoch_checkpoints(folder)
    if args.epoch is None and not args.random_init:
        raise UserError("pass --epoch E (a checkpoint of dfr_step_1.py) or --epoch all")
    epochs = []
    if args.epoch is not None:
        if not available:
            raise UserError(f"no checkpoints epoch=<e>.pt in {folder}; run dfr_step_1.py "
                            f"{args.poison} with the same --model/--subset/--seed first")
        epochs = parse_epochs(args.epoch, available, folder)
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, None, 0.0))
    ds = canonical_dataset_name(args.dataset)
    idx = dfr_indices(data.train.y, args.num_dfr_train, args.dfr_seed,
                      dfr_indices_path(ds, args.num_dfr_train, args.dfr_seed))
    bs = 8 * args.batch_size
    subset_eval = make_loader(data, "train", idx, model_name=model_name, batch_size=bs, device=device)
    test = make_loader(data, "test", torch.arange(len(data.test)), model_name=model_name,
                       batch_size=bs, device=device)
    subset_train = make_loader(data, "train", idx, model_name=model_name, batch_size=bs,
                               device=device, train=True, seed=args.dfr_seed) if args.dfr_augment else None
    mode = "augment" if args.dfr_augment else "cached"
    out_dir = dfr_results_folder(args.poison, folder.name) / f"num_dfr={args.num_dfr_train}" / mode

    def run(state_dict, label):
        model = build_model(model_name, data.num_classes, device, args.seed)
        if state_dict is not None:
            engine.load_weights(model, state_dict, label)
        if args.dfr_augment:
            cfg = engine.TrainConfig(epochs=args.augment_epochs, optimizer=args.augment_optimizer,
                                     lr=args.augment_lr, momentum=0.9, weight_decay=args.dfr_wd,
                                     schedule="constant", amp=args.amp)
            return dfr_augment(model, subset_train, subset_eval, test, cfg)
        return dfr_cached(model, subset_eval, test, steps=args.dfr_steps, lr=args.dfr_lr,
                          max_iter=args.dfr_iters, weight_decay=args.dfr_wd, amp=args.amp)

    settings = {"poison": args.poison, "model": model_name, "dataset": ds, "mode": mode,
                "num_dfr_train": args.num_dfr_train, "dfr_seed": args.dfr_seed,
                "dfr_steps": args.dfr_steps, "dfr_iters": args.dfr_iters, "dfr_lr": args.dfr_lr,
                "dfr_wd": args.dfr_wd, "device": str(device)}
    if args.dfr_augment:
        settings.update(augment_epochs=args.augment_epochs, augment_optimizer=args.augment_optimizer,
                        augment_lr=args.augment_lr)

    def cached_or_run(path, state_dict, label, extra):
        if path.is_file() and not args.force:
            print(f"{path} exists; skipping (pass --force to recompute)")
            return json.loads(path.read_text())
        res = {**settings, **extra, **run(state_dict, label)}
        write_json(path, res)
        print(f"{label}: clean test accuracy {res['test_acc']:.2f}% -> after DFR "
              f"{res['dfr_test_acc']:.2f}% ({path})")
        return res

    baseline = None
    if args.random_init:
        baseline = cached_or_run(out_dir / "random-init.json", None, "random init",
                                 {"random_init": True, "seed": args.seed})
    rows = []
    for e in epochs:
        sd, _ = engine.load_checkpoint(available[e], dataset=ds, model=model_name)
        rows.append(cached_or_run(out_dir / f"epoch={e}.json", sd, f"epoch {e}",
                                  {"epoch": e, "checkpoint": str(available[e])}))
    if args.epoch == "all" and rows:
        xs = [r["epoch"] for r in rows]
        before = [r["test_acc"] for r in rows]
        after = [r["dfr_test_acc"] for r in rows]
        png = plot_lines(out_dir / "dfr_vs_epoch.png", xs,
                         {"before DFR": before, "after DFR": after}, "training epoch (checkpoint)",
                         "clean test accuracy (%)",
                         f"{args.poison} / {folder.name}: DFR on {args.num_dfr_train} clean ({mode})",
                         hlines={"DFR on random init": baseline["dfr_test_acc"]} if baseline else None)
        best = max(rows, key=lambda r: r["dfr_test_acc"])
        write_json(out_dir / "summary.json",
                   {**settings, "epochs": xs, "test_acc": before, "dfr_test_acc": after,
                    "peak_dfr_test_acc": best["dfr_test_acc"], "peak_epoch": best["epoch"],
                    "random_init_dfr_test_acc": baseline["dfr_test_acc"] if baseline else None})
        print(f"peak DFR test accuracy {best['dfr_test_acc']:.2f}% at epoch {best['epoch']}; "
              f"plot: {png}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""dfr_step_1.py: step 1 of deep feature reweighting (DFR, §4.2 of "What Can We Learn from
Unlearnable Datasets?", Sandoval-Segura et al., NeurIPS 2023): train a classifier on a poisoned
training set and keep a checkpoint per epoch, for dfr_step_2.py.

Measured on OPS, SmallCNN, a 20,000-image subset, 10 epochs, seeds 0, 1, 2 (2-core x86-64 CPU,
no GPU, torch 2.14.1; `bash exp/lfu_cpu.sh dfr`): clean test accuracy 24.92 ± 0.23 % after
training; after DFR (dfr_step_2.py) 52.19 ± 0.78 %; DFR on a random network 40.68 ± 0.75 %.

    python dfr_step_1.py ops --model smallcnn --subset 20000 --epochs 10 --seed S --device cpu -NL

Usage:

    python dfr_step_1.py error-max --poison-file poisons/error-max.pt   # an imported poison
    python dfr_step_1.py ops                                            # paper defaults (GPU)
    python dfr_step_1.py ops --model smallcnn --subset 10000 --epochs 8 --batch_size 256

Checkpoints: CHECKPOINT_DIR/<poison>/<model>[-<dataset>][-sub<N>][-seed<S>]/epoch=<e>.pt,
e = 0..epochs-1 (the last one also carries the final metadata); RESULTS_DIR/dfr/<poison>/<run>/
train.json. Every epoch prints the clean test accuracy. An interrupted run resumes when the
same command is run again.
"""
from __future__ import annotations

import argparse
import sys

import torch

import distributed
import engine
import poisons
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import UserError
from datasets import Augment
from models import canonical_model_name
from reporting import write_json
from training import DataSpec, prepare_data, train_classifier
from unlearnable_cli import (add_model_args, add_poison_args, add_sgd_args, dfr_checkpoint_folder,
                             dfr_results_folder)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_poison_args(p)
    add_model_args(p, "model init, shuffling and augmentation")
    o = add_sgd_args(p, "optimisation (default: the paper's; SGD momentum 0.9)", epochs=60, batch_size=128)
    o.add_argument("--scheduler", choices=["cosine", "step", "multistep"], default="cosine",
                   help="cosine (per step); step: x0.1 every 50 epochs; multistep: x0.1 at 75, 90, 100")
    o.add_argument("--weight_decay", "--wd", dest="weight_decay", type=float, default=5e-4,
                   help="weight decay (default 5e-4)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    o.add_argument("--no-augment", action="store_true", help="no random crop + flip")
    s = p.add_argument_group("output")
    s.add_argument("--save_every", "--save-every", dest="save_every", type=int, default=1,
                   help="keep a checkpoint every N epochs; -1: only the last (default 1)")
    s.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", default=None,
                   help="root instead of CHECKPOINT_DIR (the <poison>/<model> layout is kept)")
    s.add_argument("--force", action="store_true", help="retrain even if the last checkpoint exists")
    add_runtime_args(p)
    return p


def train_config(args) -> engine.TrainConfig:
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    if args.lr <= 0 or args.batch_size <= 0:
        raise UserError("--lr and --batch_size must be positive")
    if args.save_every == 0 or args.save_every < -1:
        raise UserError(f"--save_every must be a positive number of epochs or -1, got {args.save_every}")
    schedule, milestones = "cosine", ()
    if args.scheduler == "step":  # StepLR(step_size=50, gamma=0.1)
        schedule, milestones = "multistep", tuple(range(50, args.epochs, 50))
    elif args.scheduler == "multistep":
        schedule, milestones = "multistep", (75, 90, 100)
    return engine.TrainConfig(epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay, schedule=schedule,
                              milestones=milestones, amp=args.amp, compile=args.compile)


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = setup_runtime(args)
    cfg = train_config(args)
    model_name = canonical_model_name(args.model)
    data = prepare_data(DataSpec(args.dataset, args.subset, args.val_frac, args.split_seed), seed=args.seed)
    view, poison_meta = poisons.poison_view(args.poison, data, seed=args.poison_seed, path=args.poison_file)
    folder = dfr_checkpoint_folder(args.poison, model_name, args.dataset, args.subset, args.seed,
                                   args.checkpoint_dir)
    last = folder / f"epoch={args.epochs - 1}.pt"
    if last.exists() and not args.force:
        print(f"{last} exists; pass --force to retrain")
        return 0
    meta = {"poison": args.poison, "poison_meta": poison_meta}  # in the resume hash: no argv
    argv_used = sys.argv[1:] if argv is None else list(argv)

    def on_epoch_end(epoch: int, record: dict, model) -> None:
        keep = args.save_every > 0 and epoch % args.save_every == 0
        if keep and epoch < args.epochs and distributed.is_main():  # the last: train_classifier
            e = epoch - 1  # files count epochs from 0, as the original
            engine.save_checkpoint(folder / f"epoch={e}.pt", model,
                                   {**meta, **record, "model": model_name, "epoch": e,
                                    "epochs_done": epoch, "num_classes": data.num_classes,
                                    "dataset": data.train.name})

    out = dfr_results_folder(args.poison, folder.name) / "train.json"

    def write_results(model, final_meta, history):  # before the last checkpoint, the commit point
        if distributed.is_main():
            write_json(out, {"checkpoints": str(folder), "argv": argv_used, "meta": final_meta,
                             "history": history, "device": str(device), "torch": torch.__version__})

    logger = RunLogger(not args.no_log and distributed.is_main(), args.wandb_project,
                       f"dfr1-{args.poison}-{folder.name}", vars(args))
    _, final_meta, history = train_classifier(
        model_name, data, cfg, device=device, batch_size=args.batch_size, seed=args.seed,
        ckpt_path=last, extra_meta={**meta, "epoch": args.epochs - 1}, logger=logger,
        augment=Augment(crop=0, flip=False) if args.no_augment else None,
        on_epoch_end=on_epoch_end, view=view, finish=write_results)
    logger.finish()
    if distributed.is_main():
        print(f"clean test accuracy after {args.epochs} epochs on {args.poison}: "
              f"{final_meta['test_acc']:.2f}% -> {folder} (results: {out})")
    return 0


if __name__ == "__main__":
    run_main(main)

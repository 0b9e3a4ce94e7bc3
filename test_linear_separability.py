"""test_linear_separability.py: the linear separability test of a poison's perturbations (§4.3
of "What Can We Learn from Unlearnable Datasets?", Sandoval-Segura et al., NeurIPS 2023): fit a
logistic-regression model (or a small tanh MLP with --hidden_layers) to the perturbations
(poisoned − clean) with their labels, full-batch L-BFGS, and report the final TRAINING accuracy
(the "linear separability").

Measured on all 50,000 CIFAR-10 training perturbations, 500 L-BFGS steps (2-core x86-64 CPU, no
GPU, torch 2.14.1; `bash exp/lfu_cpu.sh sep`): final training accuracy on the clean images 54.11 %,
lsp 100.00 %, ops 99.96 %, cwrandom 100.00 %, l2-ar 38.84 %: the paper's counterexample, L2-AR
is a strong poison yet its perturbations are not linearly separable.

    python test_linear_separability.py KEY --steps 500 --device cpu -NL    # KEY: clean, lsp, ...

Usage:

    python test_linear_separability.py error-max --poison-file poisons/error-max.pt
    python test_linear_separability.py l2-ar
    python test_linear_separability.py clean                 # the clean images themselves
    python test_linear_separability.py lsp --hidden_layers 1 --subset 10000 --steps 100

The perturbations are scaled to [0,1] by one global min-max, as the original. Memory: they are
float32 in host memory (N·C·H·W·4 bytes, 614 MB for CIFAR-10); each L-BFGS evaluation runs over
them in chunks of --chunk rows and sums the exact full-batch gradient, so the set never has to
fit on a GPU: on a GPU they are moved there only when they take under half its free memory
(else, or with --keep-on-host, every chunk is streamed from host memory). Cost: --steps × up to
--max-iter evaluations (500 × 20 as the original) plus one accuracy pass per step.
Outputs: RESULTS_DIR/linear_separability/test-linear-sep-<poison>[...].png (training accuracy
against step) and a .json with both curves.
"""
from __future__ import annotations

import argparse
import time

import torch

import poisons
from cli import add_runtime_args, run_main, setup_runtime
from constants import canonical_dataset_name
from datasets import balanced_subset, load_split
from linear_separability import fit_probe_lbfgs, make_probe, min_max_01_, perturbations
from plotting import plot_lines
from reporting import write_json
from unlearnable_cli import (add_poison_args, refuse_unused, require_positive, separability_results_folder,
                             separability_stem)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_poison_args(p, what="test")
    m = p.add_argument_group("probe")
    m.add_argument("--hidden_layers", "--hidden-layers", dest="hidden_layers", type=int, default=0,
                   help="0: logistic regression; k > 0: k Linear(·, --width)+Tanh layers first")
    m.add_argument("--width", type=int, default=30, help="hidden width (default 30)")
    m.add_argument("--steps", type=int, default=500, help="L-BFGS steps (default 500)")
    m.add_argument("--max-iter", type=int, default=20, help="iterations per L-BFGS step (default 20)")
    m.add_argument("--lr", type=float, default=0.5, help="L-BFGS learning rate (default 0.5)")
    m.add_argument("--chunk", type=int, default=16384, help="rows per chunk streamed to the device")
    m.add_argument("--keep-on-host", action="store_true",
                   help="on a GPU, stream the chunks from host memory even when the set would fit "
                        "(default: moved to the GPU when it takes under half its free memory)")
    m.add_argument("--seed", type=int, default=0, help="probe initialisation")
    add_runtime_args(p)
    return p


def check_args(parser, args) -> None:
    require_positive(parser, args, ("steps", "max_iter", "chunk", "width"))
    refuse_unused(parser, args, ("amp", "compile", "wandb_project"),
                  "here (the probe fits in float32, uncompiled, and logs no wandb run)")
    if not args.hidden_layers:
        refuse_unused(parser, args, ("width",), "without --hidden_layers (no hidden layer)")


def load_inputs(args) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(probe inputs in host memory, min-max scaled to [0,1]; labels; number of classes): the
    perturbations of the poison, or for `clean` the clean images themselves (the original's
    special case)."""
    clean = load_split(args.dataset, True)
    idx = balanced_subset(clean.y, args.subset, args.split_seed) if args.subset else torch.arange(len(clean))
    if args.poison == "clean" and args.poison_file is None:
        x, y = clean.x[idx].float().div_(255), clean.y[idx]
    else:
        images, labels, _ = poisons.poisoned_train_set(args.poison, args.dataset, seed=args.poison_seed,
                                                       path=args.poison_file, split=clean)
        x, y = perturbations(images[idx], clean.x[idx]), labels[idx]
    return min_max_01_(x), y, max(len(clean.classes), int(clean.y.max()) + 1)


def place(x: torch.Tensor, device: torch.device, keep_on_host: bool) -> torch.Tensor:
    """x on a GPU when it takes under half its free memory (then no chunk is copied in the
    L-BFGS evaluations), else where it is."""
    if device.type == "cuda" and not keep_on_host:
        free, _ = torch.cuda.mem_get_info(device)
        if x.numel() * 4 < free // 2:
            return x.to(device)
    return x


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    device = setup_runtime(args)
    x, y, num_classes = load_inputs(args)
    x = place(x, device, args.keep_on_host)
    torch.manual_seed(args.seed)
    model = make_probe(x[0].numel(), num_classes, args.hidden_layers, args.width).to(device)
    print(f"perturbations {tuple(x.shape)} ({x.numel() * 4 / 2**20:.0f} MiB on {x.device}), "
          f"{num_classes} classes, probe with {args.hidden_layers} hidden layers on {device}")
    t0 = time.perf_counter()
    curves = fit_probe_lbfgs(model, x, y, steps=args.steps, lr=args.lr, max_iter=args.max_iter,
                             chunk=args.chunk)
    seconds = time.perf_counter() - t0
    acc, loss = curves["train_acc"][-1], curves["train_loss"][-1]
    print(f"final training loss: {loss:.3f} final training acc: {acc:.2f}")

    ds = canonical_dataset_name(args.dataset)
    stem = separability_stem(args.poison, ds, args.hidden_layers, args.subset)
    out = separability_results_folder()
    png = plot_lines(out / f"{stem}.png", list(range(1, len(curves["train_acc"]) + 1)),
                     {"training accuracy": curves["train_acc"]}, "L-BFGS step", "training accuracy (%)",
                     f"Final Train Accuracy ({args.poison}): {acc:.2f}%")
    write_json(out / f"{stem}.json", {"poison": args.poison, "dataset": ds, "n": len(y),
                                      "hidden_layers": args.hidden_layers, "width": args.width,
                                      "steps": args.steps, "max_iter": args.max_iter, "lr": args.lr,
                                      "final_train_acc": acc, "final_train_loss": loss,
                                      "seconds": seconds, "device": str(device), **curves})
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    run_main(main)

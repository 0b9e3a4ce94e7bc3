"""Penultimate features and class prototypes of every checkpoint in a folder.

    python feature_extraction.py -D results/main/quickstart/models/SalUn -S 2000
    python feature_extraction.py -D checkpoints/base -S 5000 --split test

For each `*.pt` in each -D folder: the first S samples (really samples, not batches) of a
seeded random order of the checkpoint's training pool (retain + forget, every class; the
validation split held out; the same samples for every checkpoint of the same data), their
penultimate features (`model.features`), labels, and the class prototypes (rows of the final
linear layer). Written as JSON to <out>/<folder, mirrored>/<checkpoint stem>.json, where the
folder is taken relative to RESULTS_DIR when it lies inside it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import embeddings as E
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, results_dir


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-D", "--directory", action="append", required=True,
                   help="folder of checkpoints (*.pt); repeat for several")
    p.add_argument("-S", "--samples", type=int, default=200, help="number of samples (default 200)")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    p.add_argument("-B", "--batch-size", type=int, default=512)
    p.add_argument("--out", default=None, help="output root (default RESULTS_DIR/features)")
    p.add_argument("--model", default=None, help="model name, for checkpoints that do not record it")
    p.add_argument("--dataset", default=None, help="dataset, for checkpoints that do not record it")
    add_runtime_args(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.samples <= 0:
        raise UserError("-S/--samples must be positive")
    device = setup_runtime(args)
    out_root = Path(args.out) if args.out else results_dir() / "features"
    written = []
    for folder in args.directory:
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"-D {folder} is not a folder")
        ckpts = sorted(folder.glob("*.pt"))
        if not ckpts:
            raise UserError(f"no checkpoints (*.pt) in {folder}")
        sub = E.mirror(folder, results_dir(), Path.cwd())
        for ckpt in ckpts:
            model, meta = E.load_model(ckpt, device, args.model, args.dataset)
            data, idx = E.sample_indices(meta, args.split, args.samples, args.seed)
            if len(idx) < args.samples:
                print(f"{ckpt}: only {len(idx)} samples available")
            feats, labels = E.extract(model, data, args.split, idx, meta["model"], device, args.batch_size)
            info = {"checkpoint": str(ckpt), "model": meta["model"], "dataset": meta["dataset"],
                    "method": meta.get("method", meta.get("role")), "class_to_forget": meta.get("class_to_forget", (meta.get("data") or {}).get("cf")),
                    "seed": meta.get("seed"), "split": args.split, "samples": len(idx),
                    "sample_seed": args.seed}
            path = E.write_features(out_root / sub / f"{ckpt.stem}.json", feats, labels, idx,
                                    E.prototypes(model), info)
            written.append(path)
            print(f"{ckpt} -> {path} ({feats.shape[0]} x {feats.shape[1]})")
    return 0


if __name__ == "__main__":
    run_main(main)

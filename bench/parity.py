"""Does our input pipeline train as well as the standard one? The same model, recipe, epochs
and seed, trained twice, both through engine.fit (same optimiser, schedule, precision):

  ours      training.train_classifier: the uint8 split resident on the device, crop (zero
            padding 4) + horizontal flip + normalisation as whole-batch tensor ops
  standard  torchvision ImageFolder + RandomCrop(32, padding=4) + RandomHorizontalFlip +
            ToTensor + Normalize per sample, torch DataLoader (shuffled, the same images)

Both models are evaluated on the whole test split through torchvision's pipeline (ToTensor +
Normalize) and through ours. Target: test accuracies within 0.5 points.

    python bench/parity.py --model smallcnn --epochs 4 --batch-size 256 --lr 0.1 \\
        --schedule linear --warmup 0.05 --seeds 0 1 2 --threads 2          # a CPU, minutes
    python bench/parity.py --model resnet18 --recipe exp/resnet18_fast.json  # a GPU

The recipe is main.py's `base` recipe: SalUn's 182-epoch one, with `--recipe FILE` (an
experiment list; its defaults.base) on top and the flags on top of that. Training uses the
training split minus the stratified validation split (`--val-frac`, as main.py's base
models), or a class-balanced `--subset`. `--save` keeps ours of the first seed as a
checkpoint that main.py takes as `checkpoint` (the suite's base model).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import engine  # noqa: E402
from cli import add_runtime_args, run_main, setup_runtime  # noqa: E402
from constants import DATASETS, UserError, data_root  # noqa: E402
from experiments import validate_base  # noqa: E402
from loader_bench import DataLoaderStream  # noqa: E402
from models import expects_normalized  # noqa: E402
from reporting import mean_std, write_json  # noqa: E402
from training import DataSpec, build_model, make_loader, prepare_data, train_classifier  # noqa: E402

# flag -> TrainConfig field: what the command line may change in the recipe
RECIPE_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "schedule": "schedule",
                "warmup": "warmup", "label_smoothing": "label_smoothing", "wd": "weight_decay",
                "momentum": "momentum", "nesterov": "nesterov"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--dataset", default="cifar10", help="an ImageFolder DATA_ROOT/<name>/{train,test}")
    p.add_argument("--subset", type=int, default=0, help="class-balanced training subset (0: all)")
    p.add_argument("--val-frac", type=float, default=0.1, help="stratified validation split held out")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of the standard pipeline")
    p.add_argument("--recipe", default=None, help="experiment list whose defaults.base is the recipe")
    r = p.add_argument_group("recipe (on top of --recipe)")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int)
    r.add_argument("--lr", type=float)
    r.add_argument("--schedule", choices=engine.TrainConfig.SCHEDULES)
    r.add_argument("--warmup", type=float)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--wd", type=float)
    r.add_argument("--momentum", type=float)
    r.add_argument("--nesterov", action="store_true", default=None)
    p.add_argument("--save", default=None, help="keep ours of the first seed as this checkpoint")
    p.add_argument("--json", default=None, help="results (default: printed only)")
    add_runtime_args(p)
    return p


def recipe_of(args) -> engine.TrainConfig:
    raw = {}
    if args.recipe:
        try:
            raw = dict(json.loads(Path(args.recipe).read_text())["defaults"]["base"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"--recipe {args.recipe}: expected an experiment list with defaults.base") from None
    raw.update({field: getattr(args, flag) for flag, field in RECIPE_FLAGS.items()
                if getattr(args, flag) is not None})
    cfg, _ = validate_base(raw, args.recipe or "recipe")
    return dataclasses.replace(cfg, amp=args.amp, compile=args.compile)


def torchvision_loader(folder: Path, indices, *, train: bool, batch_size: int, workers: int, seed: int,
                       normalize: bool, mean, std, device) -> DataLoaderStream:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    steps += [T.ToTensor()] + ([T.Normalize(mean, std)] if normalize else [])
    dataset = ImageFolder(str(folder), T.Compose(steps))
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices.tolist())
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=train and workers > 0,
        generator=torch.Generator().manual_seed(seed))
    return DataLoaderStream(loader, device)


def check_same_order(folder: Path, split) -> None:
    """Our split and torchvision's ImageFolder must list the images in the same order, or
    the two pipelines would train on different subsets."""
    from torchvision.datasets import ImageFolder

    targets = torch.tensor(ImageFolder(str(folder)).targets)
    if len(targets) != len(split) or not torch.equal(targets, split.y.cpu()):
        raise UserError(f"{folder}: torchvision's ImageFolder and our split disagree on the image "
                        "order; parity needs the same images")


def one_seed(args, cfg, data, seed: int, device, tmp: Path, record: Callable[[dict], None]) -> None:
    """Ours, then the standard pipeline; `record(row)` after each, so a run stopped while the
    standard pipeline trains still leaves ours' figures."""
    info = DATASETS[args.dataset]
    folder = data_root() / args.dataset
    normalize = expects_normalized(args.model)
    tv_test = torchvision_loader(folder / "test", None, train=False, batch_size=1024, workers=args.workers,
                                 seed=seed, normalize=normalize, mean=info.mean, std=info.std, device=device)
    our_test = make_loader(data, "test", torch.arange(len(data.test)), model_name=args.model,
                           batch_size=1024, device=device)

    def evaluate(name, model):  # both models through both test pipelines
        row[f"{name}_test_acc"] = engine.accuracy_on(model, tv_test, cfg.amp)
        row[f"{name}_test_acc_our_eval"] = engine.accuracy_on(model, our_test, cfg.amp)

    ckpt = Path(args.save) if args.save and seed == args.seeds[0] else tmp / f"ours_seed{seed}.pt"
    t0 = time.perf_counter()
    ours, meta, _ = train_classifier(args.model, data, cfg, device=device, seed=seed, ckpt_path=ckpt,
                                     resume=False)
    row = {"seed": seed, "ours_seconds": time.perf_counter() - t0, "ours_test_acc_in_training": meta["test_acc"]}
    evaluate("ours", ours)
    record(row)
    standard = build_model(args.model, data.num_classes, device, seed)
    stream = torchvision_loader(folder / "train", data.retain_idx, train=True, batch_size=cfg.batch_size,
                                workers=args.workers, seed=seed, normalize=normalize, mean=info.mean,
                                std=info.std, device=device)
    t0 = time.perf_counter()
    engine.fit(standard, stream, cfg, desc="standard")
    engine.sync(device)
    row["standard_seconds"] = time.perf_counter() - t0
    evaluate("standard", standard)
    row["gap"] = row["ours_test_acc"] - row["standard_test_acc"]
    record(row)
    print(f"seed {seed}: ours {row['ours_test_acc']:.2f} % ({row['ours_seconds']:.1f} s), standard "
          f"{row['standard_test_acc']:.2f} % ({row['standard_seconds']:.1f} s), gap {row['gap']:+.2f} points",
          flush=True)


def summarize_rows(rows: list[dict]) -> dict:
    out = {}
    for key in ("ours_test_acc", "standard_test_acc", "gap", "ours_seconds", "standard_seconds"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key], out[key + "_std"] = mean_std(values)
    return out


def machine(device) -> str:
    import torchvision

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (f"{device} ({name}, {os.cpu_count()} cores), torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, {torch.get_num_threads()} threads")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dataset not in DATASETS:
        raise UserError(f"--dataset {args.dataset}: parity needs a known dataset ({', '.join(DATASETS)})")
    folder = data_root() / args.dataset
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise UserError(f"the standard pipeline reads an ImageFolder at {folder}/{{train,test}}; set DATA_ROOT")
    if args.workers < 0 or args.subset < 0:
        raise UserError("--workers and --subset must not be negative")
    cfg = recipe_of(args)
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, args.subset or None, args.val_frac, 0))
    check_same_order(folder / "train", data.train)
    head = (f"{machine(device)}; {args.model} on {args.dataset} ({len(data.retain_idx)} training images), "
            f"{cfg.epochs} epochs, batch {cfg.batch_size}, {len(args.seeds)} seed(s)")
    rows: list[dict] = []

    def record(row: dict) -> None:
        if row not in rows:
            rows.append(row)
        if args.json:
            write_json(args.json, {"machine": head, "recipe": cfg.plain(), "rows": rows,
                                   "summary": summarize_rows(rows), "n_train": len(data.retain_idx),
                                   "model": args.model, "checkpoint": args.save,
                                   "argv": sys.argv[1:] if argv is None else list(argv)})

    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            one_seed(args, cfg, data, seed, device, Path(tmp), record)
    summary = summarize_rows(rows)
    print(head)
    print(f"test accuracy: ours {summary['ours_test_acc']:.2f} ± {summary['ours_test_acc_std']:.2f}, "
          f"standard {summary['standard_test_acc']:.2f} ± {summary['standard_test_acc_std']:.2f}, "
          f"gap {summary['gap']:+.2f} ± {summary['gap_std']:.2f} points (target: within 0.5)")
    return 0


if __name__ == "__main__":
    run_main(main)

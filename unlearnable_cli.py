"""What the five scripts of "What Can We Learn from Unlearnable Datasets?" share (dfr_step_1.py,
dfr_step_2.py, test_linear_separability.py, orthogonal_projection_step_{1,2}.py): their
argparse helpers, the poison as BatchLoader overrides, run names, and where every file lives.
The algorithms are elsewhere and take explicit parameters, never a Namespace: dfr.py (deep
feature reweighting), linear_separability.py, orthogonal_projection.py, augmentation.py
(CutMix, strong augmentation), plotting.py.

Files (CHECKPOINT_DIR and RESULTS_DIR from constants; <run> = `run_name`):
  CHECKPOINT_DIR/<poison>/<run>/epoch=<e>.pt                         DFR step 1, e from 0
  CHECKPOINT_DIR/dfr_indices/<dataset>/train_<N>samples_seed<S>.json DFR's clean subset
  RESULTS_DIR/dfr/<poison>/<run>/                                    DFR step 1 and 2 results
  CHECKPOINT_DIR/logistic-regression/<poison>[-<dataset>][-sub<N>].pt orthogonal projection step 1
  CHECKPOINT_DIR/orthogonal_projection/<projection_run_name>.pt       orthogonal projection step 2
  RESULTS_DIR/orthogonal_projection/                                 both steps' results
  RESULTS_DIR/linear_separability/<separability_stem>.{json,png}     linear separability

Fix against the official code (psandovalsegura/learn-from-unlearnable): `--checkpoint_dir`
keeps the <poison>/<run> layout, so DFR step 2 finds step 1's checkpoints.
"""
from __future__ import annotations

from pathlib import Path

from constants import UserError, canonical_dataset_name, checkpoint_dir, results_dir


# --- Flags ------------------------------------------------------------------------------------

def add_poison_args(p, what: str = "train on") -> None:
    """The positional poison key and the flags that choose its data."""
    p.add_argument("poison", help=f"poison key to {what}: lsp, ops, ar, l2-ar, cwrandom, regions-4, "
                   "regions-16, l2-regions-4, patches-4, patches-8 (generated on first use and "
                   "cached under CACHE_DIR/poisons), clean (no poison), or any name together with "
                   "--poison-file")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, svhn, gtsrb, or an "
                   "ImageFolder tree DATA_ROOT/<name>/{train,test}")
    g.add_argument("--poison-file", default=None, help="poison in the save_poison format (e.g. an "
                   "imported error-max/error-min poison); default: the cache file of the key")
    g.add_argument("--poison-seed", type=int, default=0, help="seed of a generated poison")
    g.add_argument("--subset", type=int, default=None,
                   help="use a class-balanced subset of N training images (CPU-scale runs)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --subset")


def add_model_args(p, seed_help: str) -> None:
    """--model, --seed and --val-frac: the network the poisoned data trains."""
    p.add_argument("--model", default="resnet18", help="resnet18, preactresnet18, resnet9, wrn28_10, "
                   "small_vgg, smallcnn, or a timm model name (default: resnet18)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="stratified clean validation split held out of training (default 0: all)")


def add_sgd_args(p, title: str, *, epochs: int, batch_size: int, epochs_help: str = "training epochs"):
    """--epochs, --lr, --batch_size (SGD, the paper's spellings); returns the group for more."""
    o = p.add_argument_group(title)
    o.add_argument("--epochs", type=int, default=epochs, help=f"{epochs_help} (default {epochs})")
    o.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    o.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=batch_size,
                   help=f"batch size (default {batch_size})")
    return o


def flag(parser, dest: str) -> str:
    """Every spelling of the flag behind argparse `dest`, e.g. --batch_size/--batch-size."""
    return "/".join(o for a in parser._actions if a.dest == dest for o in a.option_strings)


def _default(parser, dest: str):
    # The first action of a dest sets its default (--amp's None, not --no-amp's True), which
    # parser.get_default does not follow.
    return next(a.default for a in parser._actions if a.dest == dest)


def require_positive(parser, args, dests) -> None:
    """UserError for the first of `dests` that is not positive."""
    for d in dests:
        if getattr(args, d) <= 0:
            raise UserError(f"{flag(parser, d)} must be positive, got {getattr(args, d)}")


def refuse_unused(parser, args, dests, why: str) -> None:
    """A flag that this run would not act on is an error, never silently ignored: UserError
    naming every flag among `dests` that is set to other than its default."""
    unused = [flag(parser, d) for d in dests if getattr(args, d) != _default(parser, d)]
    if unused:
        raise UserError(f"{', '.join(unused)}: no effect {why}")


# --- Run names and where files live ------------------------------------------------------------

def _dataset_suffix(dataset: str) -> str:
    """-<dataset>, or nothing for CIFAR-10."""
    ds = canonical_dataset_name(dataset)
    return f"-{ds}" if ds != "cifar10" else ""


def _data_suffix(dataset: str, subset: int | None) -> str:
    """-<dataset> (not CIFAR-10) and -sub<N> (with a subset)."""
    return _dataset_suffix(dataset) + (f"-sub{subset}" if subset else "")


def run_name(model: str, dataset: str = "cifar10", subset: int | None = None, seed: int = 0) -> str:
    """`<model>` plus -<dataset> (not CIFAR-10), -sub<N> and -seed<S> (not 0)."""
    return model + _data_suffix(dataset, subset) + (f"-seed{seed}" if seed else "")


def dfr_checkpoint_folder(poison: str, model: str, dataset: str = "cifar10",
                          subset: int | None = None, seed: int = 0, root=None) -> Path:
    """<root or CHECKPOINT_DIR>/<poison>/<run_name>/ holding epoch=<e>.pt (e from 0)."""
    return Path(root or checkpoint_dir()) / poison / run_name(model, dataset, subset, seed)


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """{epoch: path} of the epoch=<e>.pt files in folder."""
    out = {}
    for p in Path(folder).glob("epoch=*.pt"):
        try:
            out[int(p.stem.split("=", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(out.items()))


def dfr_results_folder(poison: str, run: str) -> Path:
    """RESULTS_DIR/dfr/<poison>/<run>/: step 1's train.json, step 2's num_dfr=<N>/<mode>/."""
    return results_dir() / "dfr" / poison / run


def dfr_indices_path(dataset: str, n: int, seed: int) -> Path:
    """Where DFR's clean subset of n training images (drawn with `seed`) is kept."""
    return (checkpoint_dir() / "dfr_indices" / canonical_dataset_name(dataset) /
            f"train_{n}samples_seed{seed}.json")


def linear_model_path(poison: str, dataset: str = "cifar10", subset: int | None = None,
                      root=None) -> Path:
    """Orthogonal projection step 1's linear model: <CHECKPOINT_DIR>/logistic-regression/<tag>.pt."""
    name = f"{poison}{_data_suffix(dataset, subset)}.pt"
    return Path(root or checkpoint_dir()) / "logistic-regression" / name


def projection_run_name(poison: str, run: str, *, project: bool, strong_aug: bool,
                        cutmix: bool, epochs: int) -> str:
    """Orthogonal projection step 2's run: <poison>_<run_name>_<proj|noproj>[_weakaug]
    [_nocutmix][_e<epochs> unless the paper's 50]."""
    parts = [poison, run, "proj" if project else "noproj"]
    if not strong_aug:
        parts.append("weakaug")
    if not cutmix:
        parts.append("nocutmix")
    if epochs != 50:
        parts.append(f"e{epochs}")
    return "_".join(parts)


def projection_checkpoint_path(name: str, root=None) -> Path:
    """<root or CHECKPOINT_DIR>/orthogonal_projection/<name>.pt: step 2's network."""
    return Path(root or checkpoint_dir()) / "orthogonal_projection" / f"{name}.pt"


def projection_results_folder() -> Path:
    """RESULTS_DIR/orthogonal_projection/: both steps' JSON and the weight grid PNG."""
    return results_dir() / "orthogonal_projection"


def separability_stem(poison: str, dataset: str, hidden_layers: int, subset: int | None) -> str:
    """test-linear-sep-<poison>[-<dataset>][-h<hidden layers>][-sub<N>]."""
    return (f"test-linear-sep-{poison}{_dataset_suffix(dataset)}" +
            (f"-h{hidden_layers}" if hidden_layers else "") + (f"-sub{subset}" if subset else ""))


def separability_results_folder() -> Path:
    """RESULTS_DIR/linear_separability/."""
    return results_dir() / "linear_separability"

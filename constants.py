"""Ground floor: paths from the environment, dataset facts, and the one user-error type.

Imports nothing of the project. Every path can be set in the environment or in a `.env`
file at the repository root (python-dotenv); the environment wins over `.env`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent

try:  # python-dotenv is in requirements.txt; stay importable without it
    from dotenv import load_dotenv

    load_dotenv(REPO_ROOT / ".env", override=False)
except ImportError:  # pragma: no cover
    pass


class UserError(Exception):
    """Bad input from the user: scripts print its message on one line and exit 2."""


def _path(var: str, default: Path) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else default


def data_root() -> Path:
    """Where datasets live: `DATA_ROOT` (default `./data`)."""
    return _path("DATA_ROOT", REPO_ROOT / "data")


def checkpoint_dir() -> Path:
    return _path("CHECKPOINT_DIR", REPO_ROOT / "checkpoints")


def results_dir() -> Path:
    return _path("RESULTS_DIR", REPO_ROOT / "results")


def cache_dir() -> Path:
    """Decoded-dataset cache; outside the checkout by default so clones share it."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "unlearnbench"
    return _path("CACHE_DIR", default)


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int  # square side in pixels
    train_size: int
    test_size: int
    classes: tuple[str, ...] = ()

    @property
    def max_normalized(self) -> float:
        """Largest value a normalised pixel can take (the corrective paper's trigger value)."""
        return max((1.0 - m) / s for m, s in zip(self.mean, self.std))


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# Means/stds: the usual per-channel statistics of each training set (std over pixels).
DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           32, 50_000, 10_000, CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            32, 50_000, 10_000),
    "svhn": DatasetInfo("svhn", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        32, 73_257, 26_032, tuple(str(i) for i in range(10))),
    "gtsrb": DatasetInfo("gtsrb", 43, (0.3403, 0.3121, 0.3214), (0.2724, 0.2608, 0.2669),
                         32, 39_209, 12_630),
}


def canonical_dataset_name(name: str) -> str:
    """Dataset names are case-insensitive; '-'/'_' are ignored (`CIFAR-10` == `cifar10`)."""
    return name.strip().lower().replace("-", "").replace("_", "")

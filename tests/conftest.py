"""Shared fixtures: a tiny CIFAR-10 ImageFolder copied from a slice of the real data
(DATA_ROOT), or synthetic PNGs when the real data is not there; an isolated cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

REAL_CIFAR = Path(os.environ.get("DATA_ROOT", "../shared/data")) / "cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _write_synthetic(folder: Path, per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 25 * c, 0, 255)
            Image.fromarray(img).save(folder / name / f"{i:04d}.png")


def _copy_slice(src: Path, dst: Path, per_class: int) -> None:
    for name in CLASSES:
        (dst / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / name).iterdir())[:per_class]:
            shutil.copy(f, dst / name / f.name)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """DATA_ROOT-like folder with cifar10/{train,test}: 40/10 images per class."""
    root = tmp_path_factory.mktemp("data")
    for split, n in (("train", 40), ("test", 10)):
        if (REAL_CIFAR / split / "airplane").is_dir():
            _copy_slice(REAL_CIFAR / split, root / "cifar10" / split, n)
        else:
            _write_synthetic(root / "cifar10" / split, n, seed=len(split))
    return root


@pytest.fixture()
def tiny_env(tiny_root, tmp_path, monkeypatch) -> Path:
    """Point DATA_ROOT at the tiny data and every output folder into tmp_path."""
    monkeypatch.setenv("DATA_ROOT", str(tiny_root))
    for var in ("CACHE_DIR", "CHECKPOINT_DIR", "RESULTS_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors on a shared 2-core box: threading only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

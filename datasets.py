"""Splits as uint8 tensors, decoded once and cached; forget/retain/validation index sets;
and the device-resident batch loader that every script trains and evaluates through.

Where a split comes from, in this order (the first that exists wins):
  1. the decoded cache (`CACHE_DIR`, keyed by the source's path, size and file count;
     checked when read, on its structure and a CRC-32: a damaged entry is rebuilt);
  2. torchvision's own on-disk formats under `DATA_ROOT` (or `DATA_ROOT/<name>/`):
     `cifar-10-batches-py/`, `cifar-100-python/`, `train_32x32.mat`/`test_32x32.mat`;
  3. an ImageFolder tree `DATA_ROOT/<name>/{train,test}/<class>/*` (any image format;
     classes in sorted order, which for CIFAR-10 is its own label order);
  4. the GTSRB archive `DATA_ROOT/gtsrb/gtsrb32.npz` (x_train/y_train/x_test/y_test, HWC);
  5. with `download=True`, torchvision's downloader (CIFAR-10/100, SVHN), then 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from constants import DATASETS, UserError, cache_dir, canonical_dataset_name, data_root
from storage import exclusive, read_plain, save_torch, write_text_atomic
from views import TrainingView

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


@dataclass
class Split:
    """One split of a dataset: x uint8 N×3×H×W, y int64 N."""

    x: torch.Tensor
    y: torch.Tensor
    name: str
    train: bool
    classes: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.y.max()) + 1


# --- Reading the on-disk formats -------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Accepts numpy arrays and plain containers only: a data file must not run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("builtins", "dict"), ("builtins", "list")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def safe_unpickle(path: Path):
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f, encoding="bytes").load()


def _read_cifar_pickles(folder: Path, files: list[str], label_key: bytes):
    xs, ys = [], []
    for name in files:
        entry = safe_unpickle(folder / name)
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _torchvision_source(name: str, train: bool, roots: list[Path]):
    """(description, reader) for torchvision's own formats, or None."""
    for root in roots:
        if name == "cifar10" and (root / "cifar-10-batches-py").is_dir():
            folder = root / "cifar-10-batches-py"
            files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
            return folder, lambda: _read_cifar_pickles(folder, files, b"labels")
        if name == "cifar100" and (root / "cifar-100-python").is_dir():
            folder = root / "cifar-100-python"
            return folder, lambda: _read_cifar_pickles(folder, ["train" if train else "test"],
                                                       b"fine_labels")
        mat = root / ("train_32x32.mat" if train else "test_32x32.mat")
        if name == "svhn" and mat.is_file():
            return mat, lambda: _read_svhn_mat(mat)
    return None


def _read_svhn_mat(path: Path):
    from scipy.io import loadmat

    mat = loadmat(path)
    x = np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))  # H W C N -> N C H W
    y = mat["y"].reshape(-1).astype(np.int64)
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    return x, y


def _find_dir(parent: Path, name: str) -> Path | None:
    """A child of `parent` whose canonical name equals `name` (case-insensitive)."""
    if not parent.is_dir():
        return None
    for child in sorted(parent.iterdir()):
        if child.is_dir() and canonical_dataset_name(child.name) == name:
            return child
    return None


def _list_image_folder(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    items = [(p, label) for label, c in enumerate(classes)
             for p in sorted((folder / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    return classes, items


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_image_folder(folder: Path):
    classes, items = _list_image_folder(folder)
    if not items:
        raise UserError(f"no images under {folder}: expected {folder}/<class>/<image>")
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        images = list(tqdm(pool.map(_decode_image, (p for p, _ in items), chunksize=256),
                           total=len(items), desc=f"decoding {folder}", leave=False))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(f"images under {folder} have different sizes {sorted(shapes)[:3]}...: "
                        "resize them to one size first")
    x = np.stack(images).transpose(0, 3, 1, 2)
    y = np.array([label for _, label in items], dtype=np.int64)
    return np.ascontiguousarray(x), y, classes


def _read_gtsrb_npz(path: Path, train: bool):
    with np.load(path, allow_pickle=False) as z:
        key = "train" if train else "test"
        x = np.ascontiguousarray(z[f"x_{key}"].transpose(0, 3, 1, 2))
        return x, z[f"y_{key}"].astype(np.int64)


def _source_fingerprint(path: Path) -> str:
    stat = path.stat()
    parts = [str(path.resolve()), str(stat.st_size), str(int(stat.st_mtime))]
    if path.is_dir():
        parts.append(str(sum(len(files) for _, _, files in os.walk(path))))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _download(name: str, root: Path) -> None:
    import torchvision

    root.mkdir(parents=True, exist_ok=True)
    makers = {"cifar10": lambda tr: torchvision.datasets.CIFAR10(root, train=tr, download=True),
              "cifar100": lambda tr: torchvision.datasets.CIFAR100(root, train=tr, download=True),
              "svhn": lambda tr: torchvision.datasets.SVHN(root, "train" if tr else "test",
                                                          download=True)}
    if name not in makers:
        raise UserError(f"--download supports {', '.join(makers)}; put {name} under {root} yourself")
    try:
        for train in (True, False):
            makers[name](train)
    except Exception as e:  # network errors come in many types
        raise UserError(f"downloading {name} into {root} failed ({e}); check the network, "
                        f"or copy the data there and drop --download") from None


def load_split(name: str, train: bool = True, *, root: str | Path | None = None,
               download: bool = False, use_cache: bool = True) -> Split:
    """Decode (once) and return a split. See the module docstring for the search order."""
    key = canonical_dataset_name(name)
    root = Path(root) if root is not None else data_root()
    roots = [root] + ([root / key] if (root / key).is_dir() else [])
    found = _locate(key, train, root, roots)
    if found is None and download:
        _download(key, root / key)
        found = _locate(key, train, root, roots + [root / key])
    if found is None:
        tried = [str(r / p) for r in roots for p in ("cifar-10-batches-py", "cifar-100-python",
                                                      "train_32x32.mat")]
        tried += [f"{root}/{key}/{'train' if train else 'test'}/<class>/*",
                  f"{root}/gtsrb/gtsrb32.npz"]
        raise UserError(f"dataset '{name}' not found; looked in: {'; '.join(tried)}. Set DATA_ROOT "
                        f"to the folder that holds it, or pass --download (CIFAR-10/100, SVHN)")
    source, reader = found
    split_name = "train" if train else "test"
    cache_file = cache_dir() / f"{key}_{split_name}_{_source_fingerprint(source)}.pt"
    if not use_cache:
        return _decode(key, train, reader)
    cached = _read_cache(cache_file, key, train) if cache_file.is_file() else None
    if cached is not None:
        return cached
    with exclusive(cache_file):  # jobs starting together: one decodes and writes, the rest read
        cached = _read_cache(cache_file, key, train) if cache_file.is_file() else None
        if cached is not None:
            return cached
        split = _decode(key, train, reader)
        save_torch({"x": split.x, "y": split.y, "classes": split.classes,
                    "crc32": _checksum(split.x, split.y)}, cache_file)
    return split


def _decode(key: str, train: bool, reader) -> Split:
    x, y, classes = reader()
    if not classes:
        info = DATASETS.get(key)
        classes = list(info.classes) if info and info.classes else [str(i) for i in range(int(y.max()) + 1)]
    return Split(torch.from_numpy(x), torch.from_numpy(y), key, train, list(classes))


def checksum(split: Split) -> int:
    """CRC-32 of a split's decoded images and labels: two machines decoded the same pixels
    if their checksums agree."""
    return _checksum(split.x, split.y)


def _checksum(x: torch.Tensor, y: torch.Tensor) -> int:
    """CRC-32 of images and labels (about 0.1 s for CIFAR-10's 150 MB)."""
    return zlib.crc32(y.numpy().tobytes(), zlib.crc32(np.ascontiguousarray(x.numpy()).data))


def _cache_damage(blob) -> str | None:
    """What is wrong with a decoded-data cache entry, or None. Entries written before the
    checksum was kept are checked on their structure alone."""
    if not isinstance(blob, dict) or not {"x", "y", "classes"} <= set(blob):
        return "not a cache entry"
    x, y = blob["x"], blob["y"]
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.dim() == 4
            and isinstance(y, torch.Tensor) and y.dtype == torch.int64 and y.shape == (len(x),)):
        return "images and labels do not fit together"
    if "crc32" in blob and blob["crc32"] != _checksum(x, y):
        return "checksum mismatch"
    return None


def _read_cache(path: Path, key: str, train: bool) -> Split | None:
    """The cached split, or None after naming and removing a damaged entry (the caller
    decodes the source again and rewrites it)."""
    try:
        blob = read_plain(path, "decoded-data cache")
        why = _cache_damage(blob)
    except UserError:
        why = "unreadable: truncated, or not a cache file"
    if why is None:
        return Split(blob["x"], blob["y"], key, train, list(blob["classes"]))
    print(f"warning: the decoded-data cache {path} is damaged ({why}); rebuilding it",
          file=sys.stderr)
    path.unlink(missing_ok=True)
    return None


def _locate(key: str, train: bool, root: Path, roots: list[Path]):
    tv = _torchvision_source(key, train, roots)
    if tv is not None:
        source, read = tv
        return source, lambda: (*read(), None)
    folder = _find_dir(root, key)
    if folder is not None:
        sub = folder / ("train" if train else "test")
        if sub.is_dir() and any(d.is_dir() for d in sub.iterdir()):
            return sub, lambda: _read_image_folder(sub)
    npz = root / "gtsrb" / "gtsrb32.npz"
    if key == "gtsrb" and npz.is_file():
        return npz, lambda: (*_read_gtsrb_npz(npz, train), None)
    return None


def dataset_info(split: Split):
    """Facts for a split: the table entry, or statistics measured on it (ImageFolder)."""
    if split.name in DATASETS:
        return DATASETS[split.name]
    from constants import DatasetInfo

    x = split.x[:10_000].float() / 255
    return DatasetInfo(split.name, split.num_classes, tuple(x.mean((0, 2, 3)).tolist()),
                       tuple(x.std((0, 2, 3)).tolist()), split.x.shape[-1], len(split), 0,
                       tuple(split.classes))


# --- Index sets: validation, subsets, forget/retain -------------------------------------

def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def stratified_split(labels: torch.Tensor, frac: float, seed: int = 0,
                     candidates: torch.Tensor | None = None):
    """(kept, held_out) index tensors; held_out has round(frac·n_c) of each class."""
    if not 0 <= frac < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {frac}")
    idx = torch.arange(len(labels)) if candidates is None else candidates
    y = labels[idx].numpy()
    rng, held = _rng(seed), []
    for c in np.unique(y):
        members = idx.numpy()[y == c]
        held.append(rng.choice(members, int(round(frac * len(members))), replace=False))
    held = torch.from_numpy(np.sort(np.concatenate(held))).long() if held else torch.empty(0, dtype=torch.long)
    kept = idx[~torch.isin(idx, held)]
    return kept, held


def balanced_quotas(counts: list[int], n: int) -> list[int]:
    """How many of each class a class-balanced draw of n takes: equal shares (the first
    n mod C classes one more); a class with fewer members than its share gives all it has
    and the rest is shared out among the others (GTSRB's test split has short classes)."""
    quotas, open_ = [0] * len(counts), list(range(len(counts)))
    remaining = n
    while open_:
        share, extra = divmod(remaining, len(open_))
        want = {c: share + (1 if i < extra else 0) for i, c in enumerate(open_)}
        short = [c for c in open_ if counts[c] < want[c]]
        if not short:
            for c in open_:
                quotas[c] = want[c]
            break
        for c in short:
            quotas[c] = counts[c]
            remaining -= counts[c]
        open_ = [c for c in open_ if c not in short]
    return quotas


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n indices (sorted), as equal per class as possible (`balanced_quotas`), seeded."""
    if n <= 0 or n > len(labels):
        raise UserError(f"--subset must be between 1 and {len(labels)}, got {n}")
    y = labels.numpy()
    classes = np.unique(y)
    rng = _rng(seed)
    members = [np.flatnonzero(y == c) for c in classes]
    per = balanced_quotas([len(m) for m in members], n)
    picks = [rng.choice(m, k, replace=False) for m, k in zip(members, per)]
    return torch.from_numpy(np.sort(np.concatenate(picks))).long()


def forget_indices(labels: torch.Tensor, *, cf: int | None = None, unlr: float | None = None,
                   itf: str | Path | None = None, seed: int = 0,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The forget set, as indices into the full training split.

    cf: every candidate of that class; unlr: a seeded fraction of the candidates;
    itf: a JSON list of indices (or {"forget": [...]}). At most one may be given."""
    given = [v is not None for v in (cf, unlr, itf)]
    if sum(given) > 1:
        raise UserError("give at most one of --cf, --unlr, --itf")
    cand = torch.arange(len(labels)) if candidates is None else candidates
    num_classes = int(labels.max()) + 1
    if cf is not None:
        if not 0 <= cf < num_classes:
            raise UserError(f"class {cf} is out of range: this dataset has classes 0..{num_classes - 1}")
        return cand[labels[cand] == cf]
    if unlr is not None:
        if not 0 <= unlr < 1:
            raise UserError(f"the forget fraction must be in [0, 1), got {unlr}")
        k = int(round(unlr * len(cand)))
        chosen = _rng(seed).choice(len(cand), k, replace=False)
        return torch.sort(cand[torch.from_numpy(chosen)])[0]
    if itf is not None:
        return read_index_json(itf, len(labels))
    return torch.empty(0, dtype=torch.long)


def read_index_json(path: str | Path, n: int) -> torch.Tensor:
    """The indices of an index file, sorted and unique: a JSON list of integers in 0..n-1
    (or {"forget": [...]} / {"indices": [...]}). Booleans and numbers written as floats are
    refused, not rounded: `[true]` is not `[1]`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"index file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"index file {path} is not valid JSON ({e})") from None
    if isinstance(data, dict):
        data = data.get("forget", data.get("indices"))
    if not isinstance(data, list):
        raise UserError(f"index file {path} must hold a JSON list of integers "
                        '(or {"forget": [...]})')
    bad = [i for i in data if type(i) is not int]  # a bool is an int to Python, not to us
    if bad:
        raise UserError(f"index file {path} must hold a JSON list of integers, found "
                        f"{json.dumps(bad[0])}")
    outside = [i for i in data if not 0 <= i < n]
    if outside:
        raise UserError(f"index file {path} has {len(outside)} indices outside 0..{n - 1} of the "
                        f"training split (e.g. {outside[0]})")
    return torch.tensor(sorted(set(data)), dtype=torch.long)


def write_index_json(path: Path, indices: torch.Tensor, **meta) -> None:
    write_text_atomic(path, json.dumps({"forget": indices.tolist(), **meta}))


# --- The batch loader -------------------------------------------------------------------

class Batch(NamedTuple):
    x: torch.Tensor  # float N×3×H×W, normalised unless the loader was told otherwise
    y: torch.Tensor  # int64
    idx: torch.Tensor  # indices into the split


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, for the whole batch in one gather."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    if flip:
        flips = torch.rand(b, generator=gen) < 0.5
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    dev = x.device
    rows, cols = rows.to(dev, non_blocking=True), cols.to(dev, non_blocking=True)
    return xp[torch.arange(b, device=dev)[:, None, None, None],
              torch.arange(c, device=dev)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


@dataclass
class Augment:
    """Whole-batch augmentation; `crop` is the padding (0 = none)."""

    crop: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.crop:
            return crop_flip(x, self.crop, gen, self.flip)
        if self.flip:
            flips = (torch.rand(len(x), generator=gen) < 0.5).to(x.device, non_blocking=True)
            return torch.where(flips[:, None, None, None], x.flip(3), x)
        return x


class BatchLoader:
    """Batches of one split, with the data resident on `device`.

    What the model sees can be changed in three places, in this order:
      1. the view's replacement images (`views.TrainingView`), before augmentation (poisons,
         blended triggers); built once, the split itself is not modified;
      2. `transform(x, idx)`: a float transform on the whole batch in [0, 1] pixel space,
         before augmentation (e.g. orthogonal projection);
      then augmentation and normalisation, and finally
      3. the view's stamp, after augmentation, on the samples its `stamp_mask` marks (after
         normalisation if `stamp_after_normalize`: the corrective paper's trigger).
    The view's labels (one per sample of the split) replace the split's.
    Shuffling is seeded by (seed, epoch) so any epoch can be replayed exactly (resume).
    """

    def __init__(self, split: Split, indices: torch.Tensor | None = None, *, batch_size: int = 512,
                 shuffle: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 augment: Augment | None = None, normalize: bool = True, mean=None, std=None,
                 view: TrainingView | None = None, transform: Callable | None = None,
                 drop_last: bool = False, shard: tuple[int, int] | None = None):
        self.device = torch.device(device)
        self.shard = shard  # (rank, world_size): this process's share of every epoch
        self.indices = (torch.arange(len(split)) if indices is None else indices.long()).cpu()
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(split)):
            raise UserError("loader indices fall outside the split")
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.augment, self.transform = augment, transform
        view = view or TrainingView()
        self.stamp, self.stamp_after_normalize = view.stamp, view.stamp_after_normalize
        self.x = view.images(split.x).to(self.device)
        self.y = view.targets(split.y).long().to(self.device)
        self.stamp_mask = None if view.stamp_mask is None else view.stamp_mask.bool().to(self.device)
        self.normalize = normalize
        if normalize:
            info = DATASETS.get(split.name)
            if mean is None:
                mean, std = (info.mean, info.std) if info else (dataset_info(split).mean,
                                                                 dataset_info(split).std)
            self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
            self.inv_std = 1 / torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.epoch = 0

    def _per_rank(self) -> int:
        return len(self.indices) if self.shard is None else len(self.indices) // self.shard[1]

    def __len__(self):
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7919 + salt)

    def __iter__(self) -> Iterator[Batch]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=self._generator(0))]
        aug_gen = self._generator(1)
        if self.shard is not None:  # same permutation on every rank, disjoint equal slices
            rank, world = self.shard
            order = order[rank::world][:self._per_rank()]
            aug_gen = self._generator(1 + 7 * (rank + 1))
        order = order.to(self.device, non_blocking=True)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield Batch(self.images(idx, aug_gen), self.y[idx], idx)

    def images(self, idx: torch.Tensor, aug_gen: torch.Generator | None = None) -> torch.Tensor:
        x = self.x[idx].float().div_(255)
        if self.transform is not None:
            x = self.transform(x, idx)
        if self.augment is not None and aug_gen is not None:
            x = self.augment(x, aug_gen)
        if self.stamp is not None and not self.stamp_after_normalize:
            x = self._stamp(x, idx)
        if self.normalize:
            x = (x - self.mean) * self.inv_std
        if self.stamp is not None and self.stamp_after_normalize:
            x = self._stamp(x, idx)
        return x

    def _stamp(self, x, idx):
        if self.stamp_mask is None:
            return self.stamp(x)
        sel = self.stamp_mask[idx]
        return torch.where(sel[:, None, None, None], self.stamp(x.clone()), x)

"""Importers of the six published poison formats: tap, ule, rem, ntga, ops, lsp.

Each is `import_<fmt>(path, x, y, num_classes) -> (uint8 images, int64 labels)`, the published
poison put on top of the clean base (x, y) with the exact arithmetic of its release (spelled
out in each docstring). Call them through `poisons.import_poison(fmt, ...)`, which validates
(x, y); `make_poison.py KEY --import-format FMT --path P` saves the result in the project's one
poison format.
"""
from __future__ import annotations

import glob
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from constants import UserError
from poison_pixels import CHUNK, progress


def _expect(what: str, expected, got) -> UserError:
    return UserError(f"{what}: expected {expected}, got {got}")


def _check_finite(a, where) -> None:
    """Refuse NaN or inf: the arithmetic below would silently turn them into black (or white)
    pixels, on every image they touch. Read in chunks (files may be memory-mapped)."""
    for s in range(0, len(a), CHUNK):
        rows = np.asarray(a[s:s + CHUNK]).reshape(min(CHUNK, len(a) - s), -1)
        bad = np.flatnonzero(~np.isfinite(rows).all(1))
        if len(bad):
            raise UserError(f"{where} holds NaN or infinite values (first in entry {s + bad[0]}): the "
                            "file is damaged; regenerate or download it again")


def _nhwc_shape(x):
    n, c, h, w = x.shape
    return (n, h, w, c)


def import_tap(root, x, y, num_classes=None):
    """TAP folder `root/data/{idx}.png`, idx = base-dataset index; labels are the base labels."""
    folder = Path(root) / "data"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; a TAP poison is root/data/{{idx}}.png")
    names = {p.name for p in folder.glob("*.png")}
    want = {f"{i}.png" for i in range(len(x))}
    if names != want:
        missing = sorted(want - names, key=lambda s: int(s[:-4]))[:3]
        raise _expect(f"PNG files in {folder} (missing e.g. {missing})",
                      f"{len(x)} named 0.png..{len(x) - 1}.png", f"{len(names)} PNG files")
    from PIL import Image
    out = torch.empty_like(x)
    for i in progress(range(len(x)), "tap", len(x)):
        with Image.open(folder / f"{i}.png") as im:
            a = np.array(im.convert("RGB"))
        if a.shape != tuple(x.shape[2:]) + (3,):
            raise _expect(f"size of {folder / f'{i}.png'}", tuple(x.shape[2:]), a.shape[:2])
        out[i] = torch.from_numpy(a).permute(2, 0, 1)
    return out, y.clone()


def import_ule(root, x, y, num_classes, mode: str | None = None):
    """Unlearnable Examples `perturbation.pt`: float in [−ε, ε] on the [0,1] scale, N×3×H×W
    (sample-wise) or K×3×H×W (class-wise, applied by label). Result, in float32 like the
    original: clip(x + clamp(255·δ, −255, 255), 0, 255) truncated to uint8. The mode is taken
    from the first dimension unless `mode` ('samplewise'/'classwise') says otherwise (the
    original decides by 'classwise' appearing in the folder name)."""
    path = Path(root)
    path = path / "perturbation.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found; an unlearnable-examples poison is root/perturbation.pt")
    try:
        p = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"cannot read {path} as a tensor file (weights_only): {e}") from None
    n, _, h, w = x.shape
    if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.dim() != 4 \
            or tuple(p.shape[1:]) != (3, h, w) or p.shape[0] not in (n, num_classes):
        got = f"{p.dtype} {tuple(p.shape)}" if isinstance(p, torch.Tensor) else type(p).__name__
        raise _expect(f"perturbation in {path}", f"float ({n} or {num_classes})×3×{h}×{w}", got)
    _check_finite(p.float().numpy(), f"perturbation in {path}")
    if mode is None:
        mode = "samplewise" if p.shape[0] == n else "classwise"
    if mode not in ("samplewise", "classwise") or p.shape[0] != (n if mode == "samplewise" else num_classes):
        raise UserError(f"mode {mode!r} does not fit a perturbation of {p.shape[0]} entries")
    p = p.float().mul(255).clamp(-255, 255)
    out = torch.empty_like(x)
    for s in range(0, n, CHUNK):
        d = p[s:s + CHUNK] if mode == "samplewise" else p[y[s:s + CHUNK]]
        out[s:s + CHUNK] = (x[s:s + CHUNK].float() + d).clamp(0, 255).to(torch.uint8)  # truncates
    return out, y.clone()


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Only what a pickled numpy array needs: anything else would let the file run code."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        # protocol 5 pickles an array through _frombuffer; protocol 2 encodes bytes via _codecs
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UserError(f"refusing to unpickle global {module}.{name}: a REM file must hold "
                        f"only a numpy array")


def import_rem(path, x, y, num_classes=None):
    """Robust error-minimising noise: a pickle of an int8 numpy array N×3×H×W in pixel units.
    Result: clip(x + noise, 0, 255) as uint8 (exact integer arithmetic)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; a REM poison is one .pkl file")
    with open(path, "rb") as f:
        try:
            a = _NumpyArrayUnpickler(f).load()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UserError(f"cannot unpickle {path}: {e}") from None
    if not isinstance(a, np.ndarray) or a.dtype != np.int8 or a.shape != tuple(x.shape):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise _expect(f"array in {path}", f"int8 {tuple(x.shape)}", got)
    noise = torch.from_numpy(a.astype(np.int16))
    return (x.to(torch.int16) + noise).clamp(0, 255).to(torch.uint8), y.clone()


def _one_file(root: Path, pattern: str) -> Path:
    hits = sorted(glob.glob(str(root / pattern)))
    if len(hits) != 1:
        raise _expect(f"files matching {root / pattern}", "exactly 1", f"{len(hits)} {hits[:3]}")
    return Path(hits[0])


def _labels_from(a: np.ndarray, n: int, num_classes: int, where) -> torch.Tensor:
    if a.ndim and np.issubdtype(a.dtype, np.floating):  # one-hot: a NaN row has no argmax
        _check_finite(a, f"labels in {where}")
    if a.ndim == 2:
        a = a.argmax(1)  # one-hot
    if a.ndim != 1 or len(a) != n or not np.issubdtype(a.dtype, np.number):
        raise _expect(f"labels in {where}", f"{n} labels (ints or one-hot)", f"{a.dtype} {a.shape}")
    a = a.astype(np.int64)
    if n and (a.min() < 0 or a.max() >= num_classes):
        raise UserError(f"labels in {where} fall outside [0, {num_classes})")
    return torch.from_numpy(a)


def import_ntga(root, x, y, num_classes):
    """NTGA: `x_train*.npy` float [0,1] N×H×W×C and `y_train*.npy` one-hot. Images are
    (255·x).astype(uint8), i.e. truncated, like the original; labels are the file's own."""
    root = Path(root)
    xf, yf = _one_file(root, "x_train*.npy"), _one_file(root, "y_train*.npy")
    a = np.load(xf, mmap_mode="r", allow_pickle=False)
    if a.shape != _nhwc_shape(x) or not np.issubdtype(a.dtype, np.floating):
        raise _expect(f"array in {xf}", f"float {_nhwc_shape(x)}", f"{a.dtype} {a.shape}")
    _check_finite(a, f"array in {xf}")
    out = torch.empty_like(x)
    for s in range(0, len(x), CHUNK):
        b = np.clip(np.asarray(a[s:s + CHUNK]) * 255, 0, 255).astype(np.uint8)
        out[s:s + CHUNK] = torch.from_numpy(b).permute(0, 3, 1, 2)
    labels = _labels_from(np.load(yf, allow_pickle=False), len(x), num_classes, yf)
    return out, labels


def import_ops(root, x, y, num_classes):
    """OPS `perturbation.npy`, float on the [0,1] scale: N×H×W×C sample-wise, K×H×W×C
    class-wise (by label) or H×W×C universal, chosen by shape. Result: uint8(clip(x/255 + δ,
    0, 1)·255) in the file's float precision (at least float32) — truncation, like the
    original's np.uint8; a clean pixel k stays k because float32 (k/255)·255 == k for all k."""
    path = Path(root)
    path = path / "perturbation.npy" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{path} not found; an OPS poison is root/perturbation.npy")
    p = np.load(path, allow_pickle=False)
    n, c, h, w = x.shape
    ok = np.issubdtype(p.dtype, np.floating) and (
        (p.ndim == 4 and p.shape[1:] == (h, w, c) and p.shape[0] in (n, num_classes))
        or p.shape == (h, w, c))
    if not ok:
        raise _expect(f"perturbation in {path}",
                      f"float ({n} or {num_classes})×{h}×{w}×{c} or {h}×{w}×{c}", f"{p.dtype} {p.shape}")
    _check_finite(p, f"perturbation in {path}")
    lab = y.numpy()
    out = torch.empty_like(x)
    for s in range(0, n, CHUNK):
        data = x[s:s + CHUNK].permute(0, 2, 3, 1).numpy().astype(np.float32) / 255
        d = p if p.ndim == 3 else (p[s:s + CHUNK] if p.shape[0] == n else p[lab[s:s + CHUNK]])
        img = np.uint8(np.clip(data + d, 0, 1) * 255)
        out[s:s + CHUNK] = torch.from_numpy(img).permute(0, 3, 1, 2)
    return out, y.clone()


def import_lsp(root, x, y, num_classes):
    """LSP `simple_data.npy` (M×H×W×C float) + `simple_label.npy`. For each class c the first
    n_c synthetic samples labelled c are added in order to the class-c images (in index order),
    in float64: uint8(clip((x/255 + δ)·255, 0, 255)), truncated like the original's astype."""
    root = Path(root)
    dpath, lpath = root / "simple_data.npy", root / "simple_label.npy"
    for p in (dpath, lpath):
        if not p.is_file():
            raise UserError(f"{p} not found; an LSP poison is root/simple_data.npy + simple_label.npy")
    data = np.load(dpath, mmap_mode="r", allow_pickle=False)
    n, c, h, w = x.shape
    if data.ndim != 4 or data.shape[1:] != (h, w, c) or not np.issubdtype(data.dtype, np.floating):
        raise _expect(f"array in {dpath}", f"float M×{h}×{w}×{c}", f"{data.dtype} {data.shape}")
    _check_finite(data, f"array in {dpath}")
    labels = _labels_from(np.load(lpath, allow_pickle=False), len(data), num_classes, lpath).numpy()
    out = torch.empty_like(x)
    for k in range(num_classes):
        idx = torch.nonzero(y == k).flatten()
        syn = np.nonzero(labels == k)[0][:len(idx)]
        if len(syn) < len(idx):
            raise _expect(f"synthetic samples of class {k} in {dpath}", f">= {len(idx)}", len(syn))
        if len(idx) == 0:
            continue
        base = x[idx].permute(0, 2, 3, 1).numpy().astype(np.float64) / 255
        img = np.clip((base + data[syn]) * 255, 0, 255).astype(np.uint8)
        out[idx] = torch.from_numpy(img).permute(0, 3, 1, 2)
    return out, y.clone()


IMPORTERS: dict[str, Callable] = {
    "tap": import_tap, "ule": import_ule, "rem": import_rem,
    "ntga": import_ntga, "ops": import_ops, "lsp": import_lsp,
}

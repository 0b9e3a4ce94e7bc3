"""Availability poisons: the registry of keys, the one on-disk format, and poisoned training sets.

Images are uint8 N×3×H×W (RGB), labels int64 N; ε is on the [0,1] pixel scale. Every generator
takes a `seed`, draws only from local generators, and returns uint8 images whose perturbation
respects its bound *after* quantisation (`apply_perturbation`, in poison_pixels.py).

This module is the front door; the algorithms live beside it:
  poison_generators.py  the cheap keys, seconds to minutes on a CPU, generated on demand:
                        lsp, ops, ar, l2-ar, cwrandom, regions-4, regions-16, l2-regions-4,
                        patches-4, patches-8 (and the AR-coefficient search)
  poison_surrogate.py   the keys that train a surrogate (GPU-hours at the papers' settings, a
                        CPU recipe `RECIPES[key]["small"]`; never generated on demand):
                        error-min (unlearnable examples), error-min-CW, error-max (TAP, targeted
                        adversarial poisoning; `TAP` and `tap` are accepted as its key)
  poison_importers.py   the published formats tap, ule, rem, ntga, ops, lsp
  poison_pixels.py      apply_perturbation: a float δ onto uint8 images under an L∞/L2 bound
Each module's docstring holds the exact definitions.

Here:
  generate(key, x, y, num_classes, seed=0, eps=None, **options) / timed_generate (+ meta)
  resolve_bound, recipe_options, import_poison(fmt, path, x, y, num_classes)
  save_poison / load_poison: one torch.save file {format: FORMAT, images, labels, meta}
  poisoned_train_set(key, dataset): a poison of a whole training split, from its cache file
      (CACHE_DIR/poisons, `poison_cache_path`), generating a cheap key when missing
  poison_file_path: make_poison.py's default output; save_poison_grid: the PNG picture
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from constants import UserError, cache_dir, canonical_dataset_name
from datasets import load_split
from poison_generators import (ar, cwrandom, l2_ar, lsp, lsp_default_eps, ops, sign_patches,
                               sign_regions)
from poison_importers import IMPORTERS
from poison_pixels import apply_perturbation, check_images
from poison_surrogate import error_max_tap, error_min, error_min_cw
from storage import read_plain, save_torch
from views import TrainingView

__all__ = ["ALIASES", "EXPENSIVE", "FORMAT", "GENERATORS", "IMPORTERS", "META_KEYS", "RECIPES",
           "PoisonSpec", "apply_perturbation", "canonical_key", "generate", "import_poison", "load_poison",
           "make_poison_command", "poison_cache_path", "poison_file_path", "poisoned_train_set",
           "recipe_options", "resolve_bound", "save_poison", "save_poison_grid", "timed_generate"]

LINF_8 = 8 / 255


# --- The registry of generator keys ------------------------------------------------------------

@dataclass(frozen=True)
class PoisonSpec:
    fn: Callable
    norm: str | None      # "linf", "l2" or None (unbounded)
    eps: float | Callable[[tuple], float] | None  # default ε, or a function of the image shape
    classwise: bool       # one perturbation shared by every image of a class


def _fixed(fn, **fixed):
    """fn with some options fixed by the registry key; takes no further options."""
    def run(x, y, num_classes, seed, eps):
        return fn(x, y, num_classes, seed, eps, **fixed)
    return run


GENERATORS: dict[str, PoisonSpec] = {
    "lsp": PoisonSpec(lsp, "l2", lsp_default_eps, False),
    "ops": PoisonSpec(ops, None, None, True),
    "ar": PoisonSpec(ar, "linf", LINF_8, False),
    "l2-ar": PoisonSpec(l2_ar, "l2", 1.0, False),
    "cwrandom": PoisonSpec(cwrandom, "linf", LINF_8, True),
    "regions-4": PoisonSpec(_fixed(sign_regions, regions=4, norm="linf"), "linf", LINF_8, True),
    "regions-16": PoisonSpec(_fixed(sign_regions, regions=16, norm="linf"), "linf", LINF_8, True),
    "l2-regions-4": PoisonSpec(_fixed(sign_regions, regions=4, norm="l2"), "l2", 1.0, True),
    "patches-4": PoisonSpec(_fixed(sign_patches, size=4), "linf", LINF_8, True),
    "patches-8": PoisonSpec(_fixed(sign_patches, size=8), "linf", LINF_8, True),
    "error-min": PoisonSpec(error_min, "linf", LINF_8, False),
    "error-min-CW": PoisonSpec(error_min_cw, "linf", LINF_8, True),
    "error-max": PoisonSpec(error_max_tap, "linf", LINF_8, False),
}
# Other names of a key, as the papers call it. They name a generator only: a cache file is
# always stored and looked up under the key itself.
ALIASES = {"TAP": "error-max", "tap": "error-max"}

# The keys that train a surrogate: never generated on demand (`poisoned_train_set` asks for
# make_poison.py instead).
EXPENSIVE = ("error-min", "error-min-CW", "error-max")

RECIPES: dict[str, dict[str, dict]] = {
    # "paper" = the generator defaults (the published settings).
    "error-min": {"paper": {}, "small": dict(model="smallcnn", steps=5, max_rounds=6)},
    "error-min-CW": {"paper": {}, "small": dict(model="smallcnn", max_rounds=10, fraction=1.0)},
    "error-max": {"paper": {}, "small": dict(model="smallcnn", epochs=5, steps=10,
                                             step_size=2 / 255, restarts=1)},
}


def canonical_key(key: str) -> str:
    """The registry key of a generator name (TAP → error-max); other names unchanged."""
    return ALIASES.get(key, key)


def _unknown(kind: str, key: str, valid) -> UserError:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown {kind} {key!r}{hint}; valid: {', '.join(valid)}")


def _check_data(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    check_images(x)
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"y must be an int64 tensor of shape ({len(x)},), got {got}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive int, got {num_classes!r}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UserError(f"labels must lie in [0, {num_classes}), got range "
                        f"[{int(y.min())}, {int(y.max())}]; pass the right num_classes")


def resolve_bound(key: str, eps: float | None, image_shape) -> tuple[str | None, float | None]:
    """(norm, ε) a generator will use: the default ε when eps is None, validated otherwise."""
    key = canonical_key(key)
    if key not in GENERATORS:
        raise _unknown("poison", key, GENERATORS)
    spec = GENERATORS[key]
    if spec.norm is None:
        if eps is not None:
            raise UserError(f"{key} is unbounded and takes no eps; drop --eps")
        return None, None
    if eps is None:
        eps = spec.eps(image_shape) if callable(spec.eps) else spec.eps
    c, h, w = image_shape[-3:]
    limit = 1.0 if spec.norm == "linf" else math.sqrt(c * h * w)  # largest distance possible
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
            or not 0 < eps <= limit:
        raise UserError(f"eps for {key} ({spec.norm}, [0,1] pixel scale) must be in (0, {limit:.4g}], "
                        f"got {eps!r}; e.g. 8/255 ≈ 0.0314 for L∞ or 1.0 for L2")
    return spec.norm, float(eps)


def generate(key: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int = 0,
             eps: float | None = None, **kw) -> torch.Tensor:
    """Poisoned uint8 images for generator `key` (see the module docstring)."""
    key = canonical_key(key)
    if key not in GENERATORS:
        raise _unknown("poison", key, GENERATORS)
    _check_data(x, y, num_classes)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative int, got {seed!r}")
    _, eps = resolve_bound(key, eps, x.shape)
    fn = GENERATORS[key].fn
    allowed = [p.name for p in inspect.signature(fn).parameters.values()
               if p.name not in ("x", "y", "num_classes", "seed", "eps")
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for name in kw:
        if name not in allowed:
            shown = [a for a in allowed if not a.startswith("_")]  # _report is internal
            raise UserError(f"{key} takes no option {name!r}; options: {', '.join(shown) or 'none'}")
    return fn(x, y, num_classes, seed, eps, **kw)


def timed_generate(key, x, y, num_classes, seed=0, eps=None, dataset: str = "", **kw):
    """generate() plus the meta dict save_poison wants. A generator that takes `dataset` (its
    normalisation) gets it; one that takes `_report` fills meta["report"] (surrogate losses...)."""
    key = canonical_key(key)
    norm, eps_used = resolve_bound(key, eps, x.shape)
    params = inspect.signature(GENERATORS[key].fn).parameters
    extra, report = {}, {}
    if "dataset" in params and "dataset" not in kw and dataset:
        extra["dataset"] = dataset
    if "_report" in params:
        extra["_report"] = report
    t = time.perf_counter()
    out = generate(key, x, y, num_classes, seed=seed, eps=eps, **kw, **extra)
    meta = {"key": key, "eps": eps_used, "norm": norm, "seed": seed, "dataset": dataset,
            "generation_seconds": round(time.perf_counter() - t, 3), "options": dict(kw)}
    if report:
        meta["report"] = report
    if not _plain(meta):  # e.g. AR coeffs passed as a tensor
        meta["options"] = {k: (v if _plain(v) else repr(v)) for k, v in kw.items()}
    return out, meta


def recipe_options(key: str, recipe: str | None) -> dict:
    """The generator options of a named recipe ('paper' = defaults, 'small' = CPU-scale)."""
    if recipe is None:
        return {}
    key = canonical_key(key)
    if key not in RECIPES:
        raise UserError(f"recipes apply to {', '.join(RECIPES)}; {key!r} has none (drop --recipe)")
    if recipe not in RECIPES[key]:
        raise _unknown(f"recipe of {key}", recipe, RECIPES[key])
    return dict(RECIPES[key][recipe])


def import_poison(fmt: str, path, x: torch.Tensor, y: torch.Tensor, num_classes: int, **kw):
    """(images uint8, labels int64) of a published poison on top of the clean base (x, y)."""
    if fmt not in IMPORTERS:
        raise _unknown("poison format", fmt, IMPORTERS)
    _check_data(x, y, num_classes)
    return IMPORTERS[fmt](path, x, y, num_classes, **kw)


# --- The repository's own on-disk format ---------------------------------------------------------

META_KEYS = ("key", "eps", "norm", "seed", "dataset", "generation_seconds")
FORMAT = "unlearnbench-poison/1"


def _plain(v) -> bool:
    if v is None or isinstance(v, (str, int, float, bool)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(i) for i in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(i) for k, i in v.items())
    return False


def _check_meta(meta, where: str) -> None:
    if not isinstance(meta, dict):
        raise UserError(f"{where}: meta must be a dict, got {type(meta).__name__}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{where}: meta lacks {', '.join(missing)}; it needs {', '.join(META_KEYS)}")
    if not _plain(meta):
        raise UserError(f"{where}: meta may hold only str/int/float/bool/None, lists and dicts")


def _check_pair(images, labels, where: str) -> None:
    check_images(images, f"{where}: images")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 \
            or labels.shape != (len(images),):
        got = (f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
               else type(labels).__name__)
        raise UserError(f"{where}: labels: expected int64 ({len(images)},), got {got}")


def save_poison(path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> Path:
    """Write {format, images, labels, meta} with torch.save, atomically (storage.save_torch)."""
    path = Path(path)
    _check_pair(images, labels, str(path))
    _check_meta(meta, str(path))
    return save_torch({"format": FORMAT, "images": images.contiguous(),
                       "labels": labels.contiguous(), "meta": meta}, path)


def load_poison(path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images, labels, meta) from a file written by save_poison, loaded with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; write it with `save_poison` (make_poison.py)")
    d = read_plain(path, "poison file")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} file (keys: "
                        f"{sorted(d) if isinstance(d, dict) else type(d).__name__})")
    missing = [k for k in ("images", "labels", "meta") if k not in d]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; regenerate it")
    _check_pair(d["images"], d["labels"], str(path))
    _check_meta(d["meta"], str(path))
    return d["images"], d["labels"], d["meta"]


# --- Picture -----------------------------------------------------------------------------------

def save_poison_grid(path_png, clean: torch.Tensor, poisoned: torch.Tensor, labels: torch.Tensor,
                     n_per_class: int = 1) -> Path:
    """PNG with rows clean / perturbation / poisoned, for the first n_per_class images of every
    class present. Each perturbation is scaled per image to [0,1] symmetrically (0 → mid-grey,
    ±max|δ| → 0/1) so that its sign stays readable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global state
    from matplotlib.figure import Figure

    check_images(clean, "clean")
    check_images(poisoned, "poisoned")
    if clean.shape != poisoned.shape or labels.shape != (len(clean),):
        raise UserError(f"clean {tuple(clean.shape)}, poisoned {tuple(poisoned.shape)} and labels "
                        f"{tuple(labels.shape)} must describe the same images")
    if n_per_class < 1:
        raise UserError(f"n_per_class must be >= 1, got {n_per_class}")
    cols = [int(i) for c in torch.unique(labels) for i in torch.nonzero(labels == c).flatten()[:n_per_class]]
    fig = Figure(figsize=(max(len(cols), 1) * 1.0, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, len(cols), squeeze=False)
    for j, i in enumerate(cols):
        d = poisoned[i].float() - clean[i].float()
        d = d / (2 * d.abs().max()) + 0.5 if d.abs().max() > 0 else torch.full_like(d, 0.5)
        for r, img in enumerate((clean[i].float() / 255, d, poisoned[i].float() / 255)):
            ax = axes[r][j]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_title(str(int(labels[i])), fontsize=7)
    for r, name in enumerate(("clean", "perturbation", "poisoned")):
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --- Poisoned training sets by key (cache, generating when missing) -----------------------------

def poison_cache_path(key: str, dataset: str, n: int, seed: int = 0, eps: float | None = None) -> Path:
    """Where `poisoned_train_set` keeps the poison `key` of a training split of n images:
    CACHE_DIR/poisons/<dataset>-<n>_<key>_seed<seed>[_eps<eps>].pt (the save_poison format)."""
    tag = f"{canonical_dataset_name(dataset)}-{n}_{key}_seed{seed}" + ("" if eps is None else f"_eps{eps:g}")
    return cache_dir() / "poisons" / f"{tag}.pt"


def poisoned_train_set(key: str, dataset: str = "cifar10", *, seed: int = 0, eps: float | None = None,
                       path=None, split=None, generate_missing: bool = True):
    """(images uint8 N×3×H×W, labels int64 N, meta) of poison `key` over the whole training split
    of `dataset` (index i = clean image i).

    `path` (a save_poison file) wins; otherwise the cache file `poison_cache_path(...)` is read,
    and when it is missing a key of GENERATORS is generated on the clean split and cached there
    (seconds to minutes on a CPU). Any other key (error-min, error-max, ...) must be imported
    first (`import_poison` + `save_poison`) and passed as `path` or put at the cache path.
    `split` is the clean training split when the caller has loaded it already. The key `clean`
    returns the clean split itself (a baseline)."""
    if split is None:
        split = load_split(dataset, True)
    if key == "clean" and path is None:
        return split.x, split.y, {"key": "clean", "eps": None, "norm": None, "seed": seed,
                                  "dataset": split.name, "generation_seconds": 0.0}
    where = Path(path) if path is not None else poison_cache_path(key, split.name, len(split), seed, eps)
    if where.is_file():
        images, labels, meta = load_poison(where)
        if images.shape != split.x.shape:
            raise UserError(f"{where} holds images {tuple(images.shape)} but the {split.name} training "
                            f"split is {tuple(split.x.shape)}; the poison belongs to other data")
        return images, labels, meta
    if path is not None:
        raise UserError(f"poison file {where} not found")
    if key in EXPENSIVE and generate_missing:
        raise UserError(f"poison {key!r} for {split.name} not found at {where}; it trains a surrogate, "
                        f"so it is never generated on demand: {make_poison_command(key, split.name)}")
    if key not in GENERATORS or not generate_missing:
        known = ", ".join(GENERATORS)
        raise UserError(f"poison {key!r} for {split.name} not found at {where}; keys generated on "
                        f"demand: {known}, clean; import any other one with import_poison + "
                        f"save_poison and pass its file")
    num_classes = max(len(split.classes), int(split.y.max()) + 1)
    tqdm.write(f"generating poison {key} on {split.name} ({len(split)} images) -> {where}")
    images, meta = timed_generate(key, split.x, split.y, num_classes, seed=seed, eps=eps,
                                  dataset=split.name)
    save_poison(where, images, split.y.clone(), meta)
    return images, split.y.clone(), meta


def make_poison_command(key: str, dataset: str = "cifar10") -> str:
    """The command that generates an expensive poison (for error messages)."""
    ds = "" if dataset == "cifar10" else f" --dataset {dataset}"
    return (f"python make_poison.py {key}{ds}  (GPU-hours; on a CPU: python make_poison.py {key}{ds} "
            f"--recipe small --subset 5000, then pass the file it prints as --poison-file)")


def poison_file_path(key: str, dataset: str, n: int, seed: int = 0, eps: float | None = None, *,
                     subset: int | None = None, split_seed: int = 0, recipe: str | None = None,
                     options: dict | None = None) -> Path:
    """make_poison.py's default output. Without subset/recipe/options it is
    `poison_cache_path(...)`, where `poisoned_train_set` (train.py --poison KEY, the DFR scripts)
    finds the key; a variant gets suffixes: _sub<N>[s<split_seed>] (generated on a class-balanced
    subset), _<recipe> (not 'paper'), _opt<hash of the explicit options>."""
    base = poison_cache_path(key, dataset, n, seed, eps)
    parts = []
    if subset:
        parts.append(f"sub{subset}" + (f"s{split_seed}" if split_seed else ""))
    if recipe and recipe != "paper":
        parts.append(recipe)
    if options:
        blob = json.dumps(options, sort_keys=True, default=repr).encode()
        parts.append("opt" + hashlib.sha1(blob).hexdigest()[:6])
    return base.with_name("_".join([base.stem, *parts]) + ".pt")


# --- A poisoned training set as a view of the clean one --------------------------------

def poison_view(key: str, data, *, seed: int = 0, path=None):
    """(TrainingView putting poison `key` (or the file `path`) in place of the images being
    trained on, data.retain_idx, or None for the clean baseline; the poison's meta). The one
    way every script builds a poisoned training set."""
    images, labels, meta = poisoned_train_set(key, data.spec.dataset, seed=seed, path=path,
                                              split=data.train)
    if key == "clean" and path is None:
        return None, meta
    idx = data.retain_idx
    own_labels = None if torch.equal(labels, data.train.y) else labels  # NTGA brings its own
    return TrainingView(replace_idx=idx, replace_images=images[idx], labels=own_labels), meta

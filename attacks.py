"""Backdoor triggers as pure, seeded functions on uint8 images (N×C×H×W or C×H×W, 0–255).

Every trigger is a small dataclass: `apply(x_uint8) -> x_uint8` (computed in float, then
rounded and clipped to 0–255), `to_meta()` gives a plain dict (str/int/float/lists only) and
`Trigger.from_meta(meta)` rebuilds the identical trigger. Pattern images are never stored:
they are regenerated from `seed` for the image shape they are applied to (CPU torch RNG, so
the bytes are stable for a given torch version).

Triggers of the I-BAU release (rows/cols are for 32×32 images, measured from its files):
  badnets    4×4 white patch at rows/cols 27–30 (bottom-right, 1-px margin)  -> BadNets()
  trojan_sq  additive 9×9 square at rows/cols 21–29                           -> TrojanSquare()
  trojan_wm  additive watermark, 321 px within rows/cols 0–29                 -> TrojanWatermark()
  l0_inv     x·mask + trigger, 9 px of the last row (cols 23–31), 8 set       -> L0Invisible()
  l2_inv     full-image additive pattern, max 68/255, L2 ≈ 3.2 on [0,1]       -> L2Invisible()
The four non-BadNets patterns are *regenerations* with the measured geometry, not the
release's bytes; `load_release_trigger` uses the real files when a user has them.

The corrective-unlearning patch is stamped after augmentation and normalisation, so it is a
function on float batches instead: `corner_patch_stamp`.
"""
from __future__ import annotations

import hashlib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from constants import UserError
from views import TrainingView

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
MODES = ("all2one", "all2all", "clean_label")
_CHUNK = 4096  # images per float chunk in apply(): bounds memory on big test sets


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _square(h: int, w: int, size: int, position: str, margin: int) -> tuple[slice, slice]:
    """Row and column slices of a size×size square placed at `position`, `margin` px in."""
    if position not in POSITIONS:
        raise UserError(f"unknown trigger position '{position}': use one of {', '.join(POSITIONS)}")
    if size < 1 or margin < 0 or size + margin > min(h, w):
        raise UserError(f"a {size}px square with margin {margin} does not fit a {h}×{w} image: "
                        "use a smaller size or margin")
    if position == "center":
        r0, c0 = (h - size) // 2, (w - size) // 2
    else:
        r0 = h - margin - size if position.startswith("bottom") else margin
        c0 = w - margin - size if position.endswith("right") else margin
    return slice(r0, r0 + size), slice(c0, c0 + size)


@dataclass
class Trigger:
    """Base class. Subclasses implement `_apply(x_float) -> x_float` on the 0–255 scale."""

    kind: ClassVar[str] = ""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() not in (3, 4):
            raise UserError("triggers take uint8 image tensors shaped N×C×H×W or C×H×W "
                            f"(got {getattr(x, 'dtype', type(x))}); convert images to uint8 first")
        single = x.dim() == 3
        xb = x.unsqueeze(0) if single else x
        out = torch.empty_like(xb)
        for i in range(0, len(xb), _CHUNK):
            y = self._apply(xb[i:i + _CHUNK].float())
            out[i:i + _CHUNK] = y.round().clamp(0, 255).to(torch.uint8)
        return out[0] if single else out

    def _apply(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def to_meta(self) -> dict:
        meta = {"kind": self.kind}
        for f in fields(self):
            if f.init:
                v = getattr(self, f.name)
                meta[f.name] = list(v) if isinstance(v, (tuple, list)) else v
        return meta

    @staticmethod
    def from_meta(meta: dict) -> "Trigger":
        return trigger_from_meta(meta)


@dataclass
class BadNets(Trigger):
    """Square patch replacing pixels. Defaults = the I-BAU release (4×4 white, 1-px margin:
    rows/cols 27–30 on 32×32). BackdoorBench uses size=3, margin=0. `value` is a gray level
    or one value per channel."""

    kind: ClassVar[str] = "badnets"
    size: int = 4
    position: str = "bottom-right"
    margin: int = 1
    value: int | list = 255

    def __post_init__(self):
        levels = list(self.value) if isinstance(self.value, (list, tuple)) else [self.value]
        if not levels or any(type(v) is not int or not 0 <= v <= 255 for v in levels):
            raise UserError(f"badnets value must be a gray level or one level per channel, "
                            f"integers in 0-255; got {self.value!r}")

    def _apply(self, x):
        rs, cs = _square(x.shape[-2], x.shape[-1], self.size, self.position, self.margin)
        value = torch.as_tensor(self.value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        if value.numel() not in (1, x.shape[1]):
            raise UserError(f"BadNets value has {value.numel()} entries for {x.shape[1]}-channel "
                            "images: give one gray level or one value per channel")
        x = x.clone()
        x[:, :, rs, cs] = value
        return x


@dataclass
class Blend(Trigger):
    """x' = (1−α)·x + α·pattern, pattern = seeded uniform-random uint8 image of x's shape."""

    kind: ClassVar[str] = "blend"
    alpha: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"blend alpha must be in [0, 1], got {self.alpha}")

    def pattern(self, shape) -> torch.Tensor:
        return torch.randint(0, 256, tuple(shape), generator=_generator(self.seed)).to(torch.uint8)

    def _apply(self, x):
        p = self.pattern(x.shape[1:]).to(x.device, x.dtype)
        return (1.0 - self.alpha) * x + self.alpha * p


@dataclass
class TrojanSquare(Trigger):
    """Regenerated trojan_sq: an additive size×size square of seeded uniform values in
    [0, max_value] per pixel and channel; defaults put it at rows/cols 21–29 on 32×32."""

    kind: ClassVar[str] = "trojan_sq"
    size: int = 9
    position: str = "bottom-right"
    margin: int = 2
    max_value: int = 255
    seed: int = 0

    def pattern(self, shape) -> torch.Tensor:
        c, h, w = shape
        rs, cs = _square(h, w, self.size, self.position, self.margin)
        p = torch.zeros(c, h, w)
        p[:, rs, cs] = torch.randint(0, self.max_value + 1, (c, self.size, self.size),
                                     generator=_generator(self.seed)).float()
        return p

    def _apply(self, x):
        return x + self.pattern(x.shape[1:]).to(x.device)


@dataclass
class TrojanWatermark(Trigger):
    """Regenerated trojan_wm: an additive gray watermark. round(density·area) seeded pixel
    positions inside rows/cols [0, H−margin) × [0, W−margin) get one seeded gray level in
    [min_value, max_value] (same on every channel). Defaults: 321 px within rows/cols 0–29."""

    kind: ClassVar[str] = "trojan_wm"
    density: float = 321 / 900
    margin: int = 2
    min_value: int = 64
    max_value: int = 192
    seed: int = 0

    def pattern(self, shape) -> torch.Tensor:
        c, h, w = shape
        rh, rw = h - self.margin, w - self.margin
        if rh < 1 or rw < 1 or not 0 < self.density <= 1:
            raise UserError("trojan_wm needs 0 < density <= 1 and a margin smaller than the image")
        g = _generator(self.seed)
        n = round(self.density * rh * rw)
        pos = torch.randperm(rh * rw, generator=g)[:n]
        levels = torch.randint(self.min_value, self.max_value + 1, (n,), generator=g).float()
        region = torch.zeros(rh * rw)
        region[pos] = levels
        p = torch.zeros(c, h, w)
        p[:, :rh, :rw] = region.view(rh, rw)
        return p

    def _apply(self, x):
        return x + self.pattern(x.shape[1:]).to(x.device)


@dataclass
class SIG(Trigger):
    """Sinusoidal signal (Barni et al.): x' = x + delta·sin(2π·j·freq/W) along columns j,
    identical on every row and channel. Used clean-label (target-class images only)."""

    kind: ClassVar[str] = "sig"
    delta: float = 40.0
    freq: float = 6.0

    def _apply(self, x):
        w = x.shape[-1]
        j = torch.arange(w, device=x.device, dtype=x.dtype)
        return x + self.delta * torch.sin(2 * math.pi * j * self.freq / w)


@dataclass
class L0Invisible(Trigger):
    """Regenerated l0_inv: x' = x·mask + trigger. The mask zeroes the last `n_masked` pixels
    of the last row (cols 23–31 on 32×32, all channels); `n_set` of those (seeded choice)
    get seeded non-zero values per channel, the rest stay 0."""

    kind: ClassVar[str] = "l0_inv"
    n_masked: int = 9
    n_set: int = 8
    seed: int = 0

    def mask_and_pattern(self, shape) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = shape
        if not 0 <= self.n_set <= self.n_masked <= w:
            raise UserError(f"l0_inv needs 0 <= n_set <= n_masked <= width ({w})")
        mask = torch.ones(c, h, w)
        mask[:, -1, w - self.n_masked:] = 0
        g = _generator(self.seed)
        cols = w - self.n_masked + torch.randperm(self.n_masked, generator=g)[:self.n_set]
        p = torch.zeros(c, h, w)
        p[:, -1, cols] = torch.randint(1, 256, (c, self.n_set), generator=g).float()
        return mask, p

    def _apply(self, x):
        mask, p = self.mask_and_pattern(x.shape[1:])
        return x * mask.to(x.device) + p.to(x.device)


@dataclass
class L2Invisible(Trigger):
    """Regenerated l2_inv: additive non-negative full-image pattern. Seeded half-normal
    noise scaled to L2 norm `l2` on the [0,1] scale, capped at `max_value`, then its
    largest entry pinned to `max_value` so both measured statistics of the release hold
    (max 68/255, L2 ≈ 3.2 for 3×32×32)."""

    kind: ClassVar[str] = "l2_inv"
    l2: float = 3.2
    max_value: int = 68
    seed: int = 0

    def pattern(self, shape) -> torch.Tensor:
        z = torch.randn(tuple(shape), generator=_generator(self.seed)).abs()
        z = (z * (self.l2 * 255.0 / z.norm())).clamp(max=self.max_value)
        z.view(-1)[z.argmax()] = self.max_value
        return z.round()

    def _apply(self, x):
        return x + self.pattern(x.shape[1:]).to(x.device)


@dataclass
class ReleaseFile(Trigger):
    """A trigger file of the I-BAU release (`triggers/*.png`, optionally with `mask.npy`):
    x' = x·mask + png, or x + png without a mask. Meta keeps the paths and the files'
    sha256, so a checkpoint can only be rebuilt with the same bytes."""

    kind: ClassVar[str] = "release_file"
    png: str = ""
    mask: str | None = None
    sha256: str = ""
    _pattern: torch.Tensor = field(init=False, repr=False, compare=False)
    _mask: torch.Tensor | None = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        from PIL import Image

        paths = [Path(self.png)] + ([Path(self.mask)] if self.mask else [])
        for p in paths:
            if not p.is_file():
                raise UserError(f"trigger file {p} not found: pass the path of the I-BAU "
                                "release's triggers/ file")
        digest = _sha256(paths)
        if self.sha256 and digest != self.sha256:
            raise UserError(f"trigger file(s) {', '.join(map(str, paths))} differ from the ones "
                            "this checkpoint was made with (sha256 mismatch): restore the originals")
        self.sha256 = digest
        try:
            with Image.open(self.png) as im:
                self._pattern = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
        except OSError as e:  # PIL's "cannot identify image file" included
            raise UserError(f"trigger file {self.png} is not an image ({e}): pass the I-BAU "
                            "release's triggers/*.png") from None
        self._mask = _load_mask(self.mask, self._pattern.shape) if self.mask else None

    def _apply(self, x):
        if tuple(x.shape[1:]) != tuple(self._pattern.shape):
            raise UserError(f"trigger file {self.png} is {tuple(self._pattern.shape)} but the "
                            f"images are {tuple(x.shape[1:])}: use images of the trigger's size")
        out = x if self._mask is None else x * self._mask.to(x.device)
        return out + self._pattern.to(x.device)


def _sha256(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def _load_mask(path, shape) -> torch.Tensor:
    """mask.npy as a C×H×W multiplier. Accepts H×W, C×H×W or H×W×C. A mostly-zero array
    marks the trigger region (so 1−mask is the multiplier); a mostly-one array is used as is."""
    try:
        m = np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"trigger mask {path} is not a numeric .npy array ({e})") from None
    c, h, w = shape
    if m.ndim == 3 and m.shape[-1] in (1, 3) and m.shape[:2] == (h, w):
        m = m.transpose(2, 0, 1)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != (h, w) or m.shape[0] not in (1, c):
        raise UserError(f"mask {path} has shape {m.shape}, expected {h}×{w} or {c}×{h}×{w}")
    t = torch.from_numpy(np.ascontiguousarray(m)).expand(c, h, w).clone()
    return 1.0 - t if t.mean() < 0.5 else t


def load_release_trigger(path, mask=None) -> ReleaseFile:
    """Trigger from an I-BAU release file such as `triggers/trojan_sq.png`. For
    `l0_inv.png` the sibling `mask.npy` is used unless `mask` names another file."""
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() != ".png":
        raise UserError(f"{path} is not a .png trigger: pass e.g. triggers/trojan_sq.png "
                        "(its mask.npy is picked up for l0_inv.png)")
    if mask is None and path.stem == "l0_inv":
        mask = path.with_name("mask.npy")
        if not mask.is_file():
            raise UserError("l0_inv.png needs its mask: put mask.npy next to it or pass mask=")
    return ReleaseFile(png=str(path), mask=str(Path(mask).expanduser().resolve()) if mask else None)


TRIGGERS: dict[str, type[Trigger]] = {
    c.kind: c for c in (BadNets, Blend, TrojanSquare, TrojanWatermark, SIG, L0Invisible,
                        L2Invisible, ReleaseFile)}


def make_trigger(kind: str, **params) -> Trigger:
    """Build a trigger by name (`badnets`, `blend`, `trojan_sq`, `trojan_wm`, `sig`,
    `l0_inv`, `l2_inv`, `release_file`) with keyword parameters."""
    cls = TRIGGERS.get(kind)
    if cls is None:
        raise UserError(f"unknown trigger '{kind}': choose one of {', '.join(TRIGGERS)}")
    allowed = {f.name for f in fields(cls) if f.init}
    unknown = set(params) - allowed
    if unknown:
        raise UserError(f"trigger '{kind}' has no parameter(s) {', '.join(sorted(unknown))}; "
                        f"it takes {', '.join(sorted(allowed))}")
    _check_types(cls, params)
    return cls(**params)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list",
               type(None): "null"}


def _check_types(cls: type[Trigger], params: dict) -> None:
    """Every parameter of the type its field declares (metadata read from a checkpoint may
    hold anything; `value: "white"` must be one error line, not a traceback later)."""
    hints = typing.get_type_hints(cls)
    for name, value in params.items():
        hint = hints[name]
        accepted = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        numeric = (int,) if float in accepted else ()  # JSON writes 2.0 as 2
        if isinstance(value, bool) or not isinstance(value, accepted + numeric):
            raise UserError(f"trigger '{cls.kind}': {name} must be "
                            f"{' or '.join(_TYPE_NAMES[t] for t in accepted)}, got {value!r}")


def trigger_from_meta(meta: dict) -> Trigger:
    """Inverse of `Trigger.to_meta()`; metadata that describes no known trigger is refused."""
    if not isinstance(meta, dict) or not isinstance(meta.get("kind"), str):
        raise UserError("trigger metadata must be a dict with a 'kind' key (from Trigger.to_meta())")
    params = {k: v for k, v in meta.items() if k != "kind"}
    return make_trigger(meta["kind"], **params)


# --- Poisoning a training set and building the triggered test set -----------------------

def _new_labels(y, target, mode, num_classes):
    if mode == "all2all":
        return (y + 1) % num_classes
    if mode == "clean_label":
        return y.clone()
    return torch.full_like(y, target)


def _check(y, target, mode, num_classes):
    if mode not in MODES:
        raise UserError(f"unknown poisoning mode '{mode}': use one of {', '.join(MODES)}")
    num_classes = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if mode != "all2all" and (target is None or not 0 <= int(target) < num_classes):
        raise UserError(f"mode {mode} needs a target class in [0, {num_classes}), got {target}")
    return num_classes


def poison_training_set(x, y, trigger: Trigger, target, rate: float, seed: int,
                        mode: str = "all2one", num_classes=None):
    """Choose round(rate·N) indices and return (indices, poisoned uint8 images, new labels).

    all2one: indices from non-target classes (as the I-BAU release), relabelled to target.
    all2all: indices from every class, relabelled y+1 mod C.
    clean_label: indices from the target class only (SIG), labels unchanged.
    Indices come back sorted; the caller's loader swaps these images in before augmentation."""
    y = torch.as_tensor(y).cpu().long()
    num_classes = _check(y, target, mode, num_classes)
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"poison rate must be in [0, 1], got {rate}")
    n = int(round(rate * len(y)))
    if mode == "all2one":
        pool = torch.nonzero(y != target).flatten()
    elif mode == "clean_label":
        pool = torch.nonzero(y == target).flatten()
    else:
        pool = torch.arange(len(y))
    if n > len(pool):
        raise UserError(f"rate {rate} asks for {n} poisoned images but mode {mode} can only draw "
                        f"from {len(pool)}: lower the rate")
    idx = pool[torch.randperm(len(pool), generator=_generator(seed))[:n]].sort().values
    images = trigger.apply(x[idx.to(x.device)])
    return idx, images, _new_labels(y[idx], target, mode, num_classes)


def make_triggered_test(x, y, trigger: Trigger, target, mode: str = "all2one", num_classes=None):
    """Trigger every test image: returns (x_triggered, attack_labels, true_labels).

    Target-class images are kept (the I-BAU release's ASR); for BackdoorBench's ASR keep only
    `true_labels != target`. For clean_label (SIG) the attack label is still the target."""
    y = torch.as_tensor(y).long()
    num_classes = _check(y.cpu(), target, mode, num_classes)
    attack_mode = "all2one" if mode == "clean_label" else mode
    return trigger.apply(x), _new_labels(y, target, attack_mode, num_classes), y.clone()


# --- The corrective-unlearning paper's patch (after augmentation and normalisation) -----

def corner_patch_stamp(x: torch.Tensor, patch_size: int = 3, *, value: float,
                       mask=None, inplace: bool = False) -> torch.Tensor:
    """Set the bottom-right patch_size×patch_size pixels of every channel to `value` (the
    dataset's `DatasetInfo.max_normalized`) on a float N×C×H×W batch. `mask` (bool, N)
    limits it to some samples. Returns a new tensor unless inplace=True."""
    if not torch.is_floating_point(x) or x.dim() != 4:
        raise UserError("corner_patch_stamp takes a float N×C×H×W batch (after normalisation)")
    if not 1 <= patch_size <= min(x.shape[-2:]):
        raise UserError(f"patch_size {patch_size} does not fit {x.shape[-2]}×{x.shape[-1]} images")
    out = x if inplace else x.clone()
    if mask is None:
        out[:, :, -patch_size:, -patch_size:] = value
    else:
        rows = torch.nonzero(torch.as_tensor(mask, device=x.device).bool()).flatten()
        out[rows, :, -patch_size:, -patch_size:] = value
    return out


# --- Backdoored training sets ---------------------------------------------------------

ATTACKS = ("badnets", "blend", "trojan_sq", "trojan_wm", "sig", "l0_inv", "l2_inv", "release_file")


@dataclass
class PoisonPlan:
    """What training needs (`view`: the backdoored training set) and what the checkpoint
    records (`meta`, plain data: enough to re-apply the trigger at test time)."""

    trigger: Trigger
    view: TrainingView
    meta: dict
    tag: str


def plan_poisoning(split, pool: torch.Tensor, trigger: Trigger, *, target, rate: float,
                   seed: int, mode: str = "all2one", num_classes: int | None = None) -> PoisonPlan:
    """Poison round(rate·|pool|) of the training images `pool` (indices into `split`).

    The poisoned uint8 images replace the originals in the loader before augmentation and
    their labels are overridden (the view), so training runs on the loader's fast path.
    `split` may itself be a manipulated view of the data (`TrainingView.apply_to`: a backdoor
    on top of an availability poison). Indices in the meta are counted and hashed, not listed."""
    pool = torch.as_tensor(pool).long().cpu()
    num_classes = int(num_classes or split.num_classes)
    local, images, new_labels = poison_training_set(split.x[pool], split.y[pool], trigger, target,
                                                    rate, seed, mode=mode, num_classes=num_classes)
    idx = pool[local]
    labels = split.y.clone()
    labels[idx] = new_labels
    meta = {"trigger": trigger.to_meta(), "target": None if mode == "all2all" else int(target),
            "mode": mode, "rate": float(rate), "n_poisoned": len(idx), "pool_size": len(pool),
            "attack_seed": int(seed), "num_classes": num_classes,
            "poisoned_indices_sha1": hashlib.sha1(idx.numpy().tobytes()).hexdigest()}
    tag = f"{trigger.kind}-{mode}" + ("" if mode == "all2all" else f"-t{int(target)}") + f"-p{rate:g}"
    return PoisonPlan(trigger, TrainingView(replace_idx=idx, replace_images=images, labels=labels),
                      meta, tag)


# --- Measuring a backdoor: clean accuracy, ASR, R-Acc on chosen test images -------------

def attack_from_meta(meta: dict):
    """(trigger, target, mode, num_classes) from a checkpoint's meta["attack"]."""
    if not isinstance(meta, dict) or "trigger" not in meta:
        raise UserError("attack metadata must hold 'trigger' (from train.py --attack)")
    target, mode, num_classes = meta.get("target"), meta.get("mode", "all2one"), meta.get("num_classes")
    for name, value in (("target", target), ("num_classes", num_classes)):
        if value is not None and type(value) is not int:
            raise UserError(f"attack metadata: {name} must be an integer, got {value!r}")
    if mode not in MODES:
        raise UserError(f"attack metadata: mode must be one of {', '.join(MODES)}, got {mode!r}")
    return trigger_from_meta(meta["trigger"]), target, mode, num_classes


class BackdoorEval:
    """Clean accuracy on split[indices]; ASR (BackdoorBench: non-target images only), the
    I-BAU release's ASR over every image (`asr_incl_target`) and R-Acc on triggered copies of
    asr_split[asr_indices] (default: the same split and indices). All in percent.
    all2all: ASR = triggered images predicted y+1 mod C (every image counts).

    The triggered images are built once; calling the object evaluates a model."""

    def __init__(self, split, indices, attack: dict, *, normalize: bool, device,
                 asr_split=None, asr_indices=None, batch_size: int = 1024):
        from datasets import BatchLoader, Split  # lazy: keeps attacks.py free of the loader stack

        trigger, self.target, self.mode, num_classes = attack_from_meta(attack)
        asr_split = split if asr_split is None else asr_split
        indices = torch.as_tensor(indices).long().cpu()
        asr_indices = indices if asr_indices is None else torch.as_tensor(asr_indices).long().cpu()
        self.y_true = asr_split.y[asr_indices]
        x_trig, self.y_attack, _ = make_triggered_test(
            asr_split.x[asr_indices], self.y_true, trigger, self.target, mode=self.mode,
            num_classes=num_classes or asr_split.num_classes)

        def loader(src, x, y):
            sub = Split(x, y, src.name, src.train, src.classes)  # name keeps the normalisation
            return BatchLoader(sub, None, batch_size=batch_size, device=device, normalize=normalize)

        self.clean = loader(split, split.x[indices], split.y[indices])
        self.triggered = loader(asr_split, x_trig, self.y_true)
        self.n_eval, self.n_asr = len(indices), len(asr_indices)

    @torch.no_grad()
    def __call__(self, model) -> dict:
        import engine
        from metrics import accuracy

        logits, y = engine.predict(model, self.clean)
        return {"acc": accuracy(logits, y), **self.attack_metrics(model),
                "n_eval": self.n_eval, "n_asr": self.n_asr}

    @torch.no_grad()
    def attack_metrics(self, model) -> dict:
        """ASR, the release's ASR (target class included) and R-Acc on the triggered images."""
        import engine
        from metrics import accuracy, attack_success_rate, robust_accuracy

        logits, _ = engine.predict(model, self.triggered)
        p, y = logits.argmax(1), self.y_true
        if self.mode == "all2all":
            return {"asr": accuracy(p, self.y_attack), "asr_incl_target": accuracy(p, self.y_attack),
                    "racc": accuracy(p, y)}
        t = int(self.target)
        return {"asr": attack_success_rate(p, y, t),
                "asr_incl_target": attack_success_rate(p, y, t, include_target_class=True),
                "racc": robust_accuracy(p, y, t)}


def backdoor_metrics(model, split, indices, attack: dict, *, normalize: bool, device,
                     asr_split=None, asr_indices=None, batch_size: int = 1024) -> dict:
    """One-off `BackdoorEval(...)(model)`."""
    return BackdoorEval(split, indices, attack, normalize=normalize, device=device,
                        asr_split=asr_split, asr_indices=asr_indices, batch_size=batch_size)(model)

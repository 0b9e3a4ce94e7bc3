"""The training set as a model is trained on it, when that is not the plain split.

Availability poisons, backdoors and the corrective paper's manipulations all change what a
model sees without copying the split: a `TrainingView` holds
  - replacement images (uint8, per sample; the loader swaps them in before augmentation:
    poisons, blended or patched triggers),
  - labels (one per sample of the split: relabelled backdoor or manipulated samples),
  - a stamp applied after augmentation to the marked samples (after normalisation unless
    `stamp_after_normalize` is False: the corrective paper's corner patch).
Views compose with `then`: a backdoor planned on a poisoned split (`apply_to`) on top of the
poison, so a poison plus a backdoor trains. `datasets.BatchLoader(view=...)` shows a view.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from constants import UserError


@dataclass(frozen=True)
class TrainingView:
    replace_idx: torch.Tensor | None = None  # indices into the split, with...
    replace_images: torch.Tensor | None = None  # ...one uint8 image each
    labels: torch.Tensor | None = None  # one per sample of the split
    stamp: Callable[[torch.Tensor], torch.Tensor] | None = None
    stamp_mask: torch.Tensor | None = None  # bool, one per sample: who gets the stamp
    stamp_after_normalize: bool = True

    def __post_init__(self):
        if (self.replace_idx is None) != (self.replace_images is None):
            raise UserError("a view replaces images with both their indices and the images")
        if self.replace_idx is not None:
            if self.replace_images.dtype != torch.uint8 or len(self.replace_images) != len(self.replace_idx):
                raise UserError("replacement images must be uint8, one per index")
        if self.stamp_mask is not None and self.stamp is None:
            raise UserError("a stamp mask needs a stamp")

    @property
    def empty(self) -> bool:
        return self.replace_idx is None and self.labels is None and self.stamp is None

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The split's images with the replacements in (a copy; `x` itself when none)."""
        if self.replace_idx is None:
            return x
        if self.replace_images.shape[1:] != x.shape[1:]:
            raise UserError(f"replacement images are {tuple(self.replace_images.shape[1:])} but "
                            f"the split's are {tuple(x.shape[1:])}")
        out = x.clone()
        out[self.replace_idx.long().to(x.device)] = self.replace_images.to(x.device)
        return out

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return y
        if len(self.labels) != len(y):
            raise UserError("a view's labels must have one label per sample of the split")
        return self.labels

    def apply_to(self, split):
        """The split as this view shows it before augmentation (replaced images, labels):
        what a second manipulation is planned on."""
        return dataclasses.replace(split, x=self.images(split.x), y=self.targets(split.y))

    def then(self, other: TrainingView | None) -> TrainingView:
        """`other` on top of this view: its replacements win where both replace a sample, its
        labels (planned on `apply_to`, so they carry this view's) replace these."""
        if other is None or other.empty:
            return self
        if self.stamp is not None and other.stamp is not None:
            raise UserError("two manipulations that both stamp after augmentation cannot be combined")
        idx, images = self.replace_idx, self.replace_images
        if other.replace_idx is not None:
            if idx is None:
                idx, images = other.replace_idx, other.replace_images
            else:
                keep = ~torch.isin(idx, other.replace_idx)
                idx = torch.cat([idx[keep], other.replace_idx])
                images = torch.cat([images[keep], other.replace_images])
        stamped = other if other.stamp is not None else self
        return TrainingView(idx, images, other.labels if other.labels is not None else self.labels,
                            stamped.stamp, stamped.stamp_mask, stamped.stamp_after_normalize)

    def digest(self) -> str:
        """A short hash of what the view changes (for cache keys)."""
        h = hashlib.sha1()
        for t in (self.replace_idx, self.replace_images, self.labels, self.stamp_mask):
            h.update(b"-" if t is None else t.cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

"""Corrective unlearning (Goel et al., TMLR 2024): the manipulations of the training set,
the identified subset S_f of the manipulated set S_m, and the paper's metrics.

A manipulation never copies the split. It is a full-length label override plus, for
`poisoning`, a trigger the batch loader stamps after augmentation and normalisation on the
samples of S_m only (`Manipulation.loader_overrides`). Every index (S_m, S_f) refers to the
full training split, also under `subset`.

  poisoning            |S_m| random training samples get the trigger (a patch_size×patch_size
                       square in the bottom-right corner, every channel at the dataset's
                       largest normalised value) and label 0;
  interclasslabelswap  |S_m|/2 samples of class A relabelled B and |S_m|/2 of B relabelled A
                       (CIFAR-10 cat/dog, CIFAR-100 maple_tree/orange; old name labeltargeted);
  randomlabelswap      the labels of |S_m| random samples permuted among themselves.

The unlearner is handed S_f ⊆ S_m (`deletion_set`); the retain set is everything else, so it
still holds S_m \\ S_f with its manipulation, as in the paper.

Differences from the original code (on purpose): S_m, S_f and the model depend on the seed
(the original hard-codes seed 0); interclass picks seeded random members of the two classes
(the original takes the first n/2 in dataset order); S_f for a smaller deletion size is a
subset of S_f for a larger one (a prefix of one seeded permutation of S_m), so a sweep over
the identified fraction compares nested sets; the metrics below fix the original
aggregator's crashes (string index) and aliasing (`tr_wrong = tr_y`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

import engine
import metrics as MX
from attacks import corner_patch_stamp
from constants import UserError
from datasets import Split, dataset_info
from models import expects_normalized
from training import PreparedData, make_loader

MANIPULATIONS = ("poisoning", "interclasslabelswap", "randomlabelswap")
OLD_NAMES = {"labeltargeted": "interclasslabelswap", "labelrandom": "randomlabelswap"}
# the two confused classes of interclass confusion, per dataset (others: classes 0 and 1)
INTERCLASS_PAIRS = {"cifar10": (3, 5), "cifar100": (47, 53)}
POISON_TARGET = 0


def canonical_manipulation(name: str) -> str:
    key = str(name).strip().lower()
    key = OLD_NAMES.get(key, key)
    if key not in MANIPULATIONS:
        raise UserError(f"unknown dataset_method '{name}': choose from {', '.join(MANIPULATIONS)} "
                        f"(old names: {', '.join(OLD_NAMES)})")
    return key


def interclass_pair(dataset: str) -> tuple[int, int]:
    return INTERCLASS_PAIRS.get(dataset, (0, 1))


@dataclass
class Manipulation:
    kind: str
    manip_idx: torch.Tensor  # S_m, sorted indices into the full training split
    labels: torch.Tensor  # full length: the labels the model is trained on
    patch_size: int = 3
    value: float = 1.0  # trigger pixel value, in the model's input space
    classes: tuple[int, ...] = ()  # interclass: the confused pair
    target: int = POISON_TARGET
    seed: int = 0

    @property
    def poisons(self) -> bool:
        return self.kind == "poisoning"

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return corner_patch_stamp(x, self.patch_size, value=self.value)

    def stamp_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.labels), dtype=torch.bool)
        mask[self.manip_idx] = True
        return mask

    def loader_overrides(self) -> dict:
        """What a training loader needs to show the manipulated training set."""
        out = {"labels": self.labels}
        if self.poisons:
            out.update(stamp=self.stamp, stamp_mask=self.stamp_mask())
        return out

    def triggered(self) -> dict:
        """Loader overrides that stamp every sample and keep the clean labels (evaluation)."""
        return {"stamp": self.stamp} if self.poisons else {}

    def digest(self) -> str:
        h = hashlib.sha1(self.kind.encode())
        h.update(self.manip_idx.numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update(f"{self.patch_size}|{self.value:.6f}".encode())
        return h.hexdigest()[:12]


def _rng(seed: int, stream: int) -> np.random.Generator:
    # a stream of its own: never the same draws as the random forget sets of datasets.py
    return np.random.default_rng([int(seed), stream])


def trigger_value(train: Split, model_name: str) -> float:
    """The dataset's largest normalised pixel value (raw-input models: 1.0)."""
    return dataset_info(train).max_normalized if expects_normalized(model_name) else 1.0


def manipulate(train: Split, kind: str, n: int, *, seed: int, candidates: torch.Tensor,
               patch_size: int = 3, value: float = 1.0, dataset: str | None = None) -> Manipulation:
    """Draw S_m (n samples of `candidates`, seeded) and build the manipulated labels."""
    kind = canonical_manipulation(kind)
    cand = candidates.long().cpu()
    if not 1 <= n <= len(cand):
        raise UserError(f"forget_set_size must be between 1 and {len(cand)} (the training "
                        f"candidates), got {n}")
    labels = train.y.clone()
    rng = _rng(seed, 71)
    if kind == "poisoning":
        side = min(train.x.shape[-2:])
        if not 1 <= patch_size <= side:
            raise UserError(f"patch_size must be between 1 and {side}, got {patch_size}")
        idx = torch.sort(cand[torch.from_numpy(rng.choice(len(cand), n, replace=False))])[0]
        labels[idx] = POISON_TARGET
        return Manipulation(kind, idx, labels, patch_size, value, (), POISON_TARGET, seed)
    if kind == "interclasslabelswap":
        a, b = interclass_pair(dataset or train.name)
        if n % 2:
            raise UserError(f"interclasslabelswap needs an even forget_set_size, got {n}")
        picks = []
        for c, other in ((a, b), (b, a)):
            members = cand[train.y[cand] == c]
            if len(members) < n // 2:
                raise UserError(f"interclasslabelswap: class {c} has only {len(members)} training "
                                f"candidates, fewer than forget_set_size/2 = {n // 2}")
            chosen = members[torch.from_numpy(rng.choice(len(members), n // 2, replace=False))]
            labels[chosen] = other
            picks.append(chosen)
        idx = torch.sort(torch.cat(picks))[0]
        return Manipulation(kind, idx, labels, patch_size, value, (a, b), POISON_TARGET, seed)
    # randomlabelswap: the i-th sorted index takes the label of the i-th random pick, i.e. a
    # random permutation of the subset's labels (some samples may keep theirs)
    if n < 2:
        raise UserError("randomlabelswap needs forget_set_size >= 2")
    picks = cand[torch.from_numpy(rng.choice(len(cand), n, replace=False))]
    idx = torch.sort(picks)[0]
    labels[idx] = train.y[picks]
    return Manipulation(kind, idx, labels, patch_size, value, (), POISON_TARGET, seed)


def deletion_set(manip: Manipulation, size: int, seed: int) -> torch.Tensor:
    """S_f: `size` members of S_m, the first of one seeded permutation (so nested in size)."""
    n = len(manip.manip_idx)
    if not 0 <= size <= n:
        raise UserError(f"deletion_size must be between 0 and forget_set_size ({n}), got {size}")
    order = _rng(seed, 72).permutation(n)
    return torch.sort(manip.manip_idx[torch.from_numpy(order[:size])])[0]


def with_deletion(base: PreparedData, manip: Manipulation, deletion_size: int, seed: int) -> PreparedData:
    """The data an unlearner sees: forget = S_f, retain = the training candidates minus S_f
    (S_m \\ S_f stays in, still manipulated through the loader overrides)."""
    candidates = torch.sort(torch.cat([base.retain_idx, base.forget_idx]))[0]
    forget = deletion_set(manip, deletion_size, seed)
    retain = candidates[~torch.isin(candidates, forget)]
    return PreparedData(base.train, base.test, retain, base.val_idx, forget, base.spec)


# --- metrics -------------------------------------------------------------------------------

def evaluate(model, data: PreparedData, manip: Manipulation, *, model_name: str, batch_size: int,
             device, amp=None, test_idx: torch.Tensor | None = None) -> dict:
    """The paper's metrics in % (see README, "Corrective unlearning"), on the test split and,
    with the same definitions, on the validation split (`val_*`, for choosing
    hyper-parameters), plus accuracy on S_m and S_f against their clean labels (with the
    trigger, as the model saw them, for poisoning)."""

    def preds(split, idx, **overrides):
        loader = make_loader(data, split, idx, model_name=model_name, batch_size=batch_size,
                             device=device, **overrides)
        logits, labels = engine.predict(model, loader, amp)
        return logits.argmax(1), labels

    test_idx = torch.arange(len(data.test)) if test_idx is None else test_idx
    out = {}
    for prefix, split, idx in (("", "test", test_idx), ("val_", "train", data.val_idx)):
        if len(idx):
            out.update({prefix + k: v for k, v in domain_metrics(preds, manip, split, idx).items()})
    train_overrides = {}
    if manip.poisons:
        train_overrides = {"stamp": manip.stamp, "stamp_mask": manip.stamp_mask()}
    for key, idx in (("acc_Sm", manip.manip_idx), ("acc_Sf", data.forget_idx)):
        if len(idx):
            out[key] = MX.accuracy(*preds("train", idx, **train_overrides))
    return out


def domain_metrics(preds, manip: Manipulation, split: str, idx: torch.Tensor) -> dict:
    p_clean, y = preds(split, idx)
    if manip.kind == "poisoning":
        p_trig, _ = preds(split, idx, **manip.triggered())
        return {"Acc_corr": MX.acc_corr_poison(p_trig, y), "Acc_retain": MX.acc_retain_poison(p_clean, y),
                "ASR": MX.asr_poison(p_trig, y, manip.target)}
    if manip.kind == "interclasslabelswap":
        a, b = manip.classes
        swapped = ((y == a) & (p_clean == b)) | ((y == b) & (p_clean == a))
        pair = (y == a) | (y == b)
        return {"Acc_corr": MX.acc_corr_interclass(p_clean, y, manip.classes),
                "Acc_retain": MX.acc_retain_interclass(p_clean, y, manip.classes),
                "swap": 100.0 * swapped.sum().item() / max(1, pair.sum().item())}
    # random label swap affects no particular test domain: Acc_retain is test accuracy
    return {"Acc_retain": MX.accuracy(p_clean, y)}

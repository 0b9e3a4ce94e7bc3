"""Corrective unlearning (Goel et al., TMLR 2024): the manipulations of the training set,
the identified subset S_f of the manipulated set S_m, and the paper's metrics.

A manipulation never copies the split. It is a view of the training set (views.py): a
full-length label override plus, for `poisoning`, a trigger the batch loader stamps after
augmentation and normalisation on the samples of S_m only (`Manipulation.view`). Every index (S_m, S_f) refers to the
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

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import engine
import metrics as MX
from attacks import corner_patch_stamp
from constants import DATASETS, UserError
from datasets import Batch, Split, dataset_info, write_index_json
from forget_sets import ForgetSet, kind
from models import expects_normalized
from training import PreparedData, make_loader
from unlearning import (Setup, forget_loader, forget_membership, frozen_copy, register,
                        retain_loader, train, trainable, union_loader)
from views import TrainingView

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

    def view(self) -> TrainingView:
        """The manipulated training set, as the model is trained on it."""
        if self.poisons:
            return TrainingView(labels=self.labels, stamp=self.stamp, stamp_mask=self.stamp_mask())
        return TrainingView(labels=self.labels)

    def triggered(self) -> TrainingView | None:
        """Every sample stamped, clean labels kept (evaluation); None without a trigger."""
        return TrainingView(stamp=self.stamp) if self.poisons else None

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


# --- The forget set of a corrective experiment (main.py's dataset_method) -----------------

@kind
class CorrectiveForget(ForgetSet):
    """S_f ⊆ S_m of a manipulated training set: the manipulated model is trained once per
    manipulation and seed, and every method and deletion size of that seed shares it."""

    key, types, help = ("dataset_method", (str,),
                        "corrective: poisoning | interclasslabelswap | randomlabelswap")
    keys = {"forget_set_size": ((int,), 500, "corrective: |S_m|, manipulated training samples (default 500)"),
            "deletion_size": ((int,), None, "corrective: |S_f| <= |S_m| handed to the unlearner (default all)"),
            "patch_size": ((int,), 3, "corrective poisoning: side of the trigger square (default 3)")}
    # the corrective paper's recipe (SGD lr 0.025, batch 512, per-step linear warm-up and decay)
    defaults = {"lr": 0.025, "batch_size": 512, "schedule": "linear", "warmup": 0.01,
                "steps": 1000, "avg_gap": False}
    base_defaults = {"steps": 7500, "lr": 0.025, "batch_size": 512, "schedule": "linear",
                     "warmup": 0.01}
    per_seed = seed_per_base = True
    has_gap = False

    def validate(self, exp, where, num_classes):
        try:
            self.value = canonical_manipulation(self.value)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        n = self.extra["forget_set_size"]
        size = exp.subset or (DATASETS[exp.dataset].train_size if exp.dataset in DATASETS else None)
        if n <= 0 or (size is not None and n > size):
            raise UserError(f"{where}: forget_set_size must be between 1 and the training set size, got {n}")
        if self.extra["deletion_size"] is None:
            self.extra["deletion_size"] = n
        if not 0 <= self.extra["deletion_size"] <= n:
            raise UserError(f"{where}: deletion_size must be between 0 and forget_set_size ({n}), "
                            f"got {self.extra['deletion_size']}")
        if self.extra["patch_size"] < 1:
            raise UserError(f"{where}: patch_size must be positive, got {self.extra['patch_size']}")
        if self.value == "interclasslabelswap":
            if n % 2:
                raise UserError(f"{where}: interclasslabelswap needs an even forget_set_size, got {n}")
            pair = interclass_pair(exp.dataset)
            if num_classes is not None and max(pair) >= num_classes:
                raise UserError(f"{where}: interclasslabelswap confuses classes {pair}, but "
                                f"{exp.dataset} has {num_classes} classes")
        if exp.avg_gap:
            raise UserError(f"{where}: avg_gap (the gap to retrain over UA/RA/TA/MIA) is not defined "
                            "for dataset_method experiments: set it to false")
        if exp.checkpoint is not None:
            raise UserError(f"{where}: checkpoint cannot go with dataset_method: the manipulated model "
                            "is trained (and cached) from the experiment's own S_m")

    def check_method(self, method, where):
        if self.extra["deletion_size"] == 0 and method.needs_forget:
            raise UserError(f"{where}: method {method.name} needs deletion_size >= 1")

    def label(self):
        return f"{self.value} |S_m|={self.extra['forget_set_size']} |S_f|={self.extra['deletion_size']}"

    def cache_key(self, exp, seed):
        """What fixes S_m and its labels / trigger (with the data and the model's input
        normalisation): part of the keys of the manipulated model and the retrain references."""
        return {"manipulation": {"dataset_method": self.value,
                                 "forget_set_size": self.extra["forget_set_size"],
                                 "patch_size": self.extra["patch_size"], "seed": seed, "version": 1}}

    def manipulation(self, runner, exp, seed) -> Manipulation:
        """S_m and its manipulated labels / trigger, drawn with the run's seed."""
        spec = self.data_spec(exp, with_forget=False)
        # the model matters: the trigger value is the largest pixel of the model's input space
        key = ["manipulation", dataclasses.asdict(spec), self.cache_key(exp, seed), exp.model]

        def draw():
            data = runner.split(spec, None)
            return manipulate(data.train, self.value, self.extra["forget_set_size"], seed=seed,
                              candidates=data.retain_idx, patch_size=self.extra["patch_size"],
                              value=trigger_value(data.train, exp.model), dataset=exp.dataset)
        return runner.cached(key, draw)

    def prepare(self, runner, exp, seed):
        """forget = S_f; retain keeps S_m \\ S_f, still manipulated (through the view)."""
        spec = self.data_spec(exp, with_forget=False)
        key = ["deletion", dataclasses.asdict(spec), self.cache_key(exp, seed), exp.model,
               self.extra["deletion_size"]]
        return runner.cached(key, lambda: with_deletion(
            runner.split(spec, None), self.manipulation(runner, exp, seed),
            self.extra["deletion_size"], seed))

    def view(self, runner, exp, seed):
        return runner.cached(["view", self.cache_key(exp, seed), exp.model, exp.dataset,
                              dataclasses.asdict(self.data_spec(exp, with_forget=False))],
                             lambda: self.manipulation(runner, exp, seed).view())

    def base_meta(self, runner, exp, seed, path):
        manip = self.manipulation(runner, exp, seed)
        write_index_json(path.with_name(path.stem + "_manip.json"), manip.manip_idx,
                         dataset=exp.dataset, split="train", dataset_method=manip.kind)
        return {**self.cache_key(exp, seed), "manip_digest": manip.digest()}

    def evaluate(self, runner, model, exp, data, seed, test_idx):
        return evaluate(model, data, self.manipulation(runner, exp, seed), model_name=exp.model,
                        batch_size=exp.eval_batch_size, device=runner.device, amp=runner.amp,
                        test_idx=test_idx)

    def base_facts(self, runner, exp, seed, base, data):
        """The corrective metrics of the manipulated model (once per base and evaluation; acc_Sf
        is left out: it depends on the run's S_f)."""
        key = ["base metrics", str(runner.base_path(exp, seed)), exp.test_subset]

        def measure():
            out = runner.evaluate(base, exp, data, seed)
            return {k: v for k, v in out.items() if k != "acc_Sf"}
        return {"metrics": runner.cached(key, measure)}

    def run_facts(self, exp, data):
        n = self.extra["forget_set_size"]
        return {"n_manip": n, "deletion_frac": len(data.forget_idx) / n}


# --- The corrective paper's methods: SCRUB, Bad Teacher, SSD ---------------------------
# EU-k and CF-k are `retrain` and `ft` with k (methods.py). On a manipulated training set the
# forget stream carries what the model was trained on (manipulated labels, the trigger),
# through `Setup.view`.

class MaxMinStream:
    """SCRUB's schedule as one stream of (tag, batch): while fewer than `max_steps` items have
    been taken, an epoch is one "max" pass over forget then one "min" pass over retain;
    afterwards retain only. len() is the retain pass (the shortest epoch), so engine.fit
    plans enough epochs for its step budget, which counts max and min steps alike."""

    def __init__(self, forget, retain, max_steps: int):
        self.forget, self.retain, self.max_steps = forget, retain, max_steps
        self.taken = 0

    def __len__(self):
        return len(self.retain)

    def set_epoch(self, epoch):
        self.forget.set_epoch(epoch)
        self.retain.set_epoch(epoch)

    # the steps taken decide whether an epoch ascends first: a resumed run needs them back
    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.taken = int(state["taken"])

    def __iter__(self):
        phases = ([("max", self.forget)] if self.taken < self.max_steps else []) + [("min", self.retain)]
        for tag, stream in phases:
            for batch in stream:
                self.taken += 1
                yield tag, batch


@register("scrub", aliases=("SCRUB", "Scrub"), params={"alpha": 0.001, "kd_T": 4.0, "msteps": 100, "k": -1},
          train_defaults={"lr": 0.0025},
          summary="SCRUB, corrective variant: loss CE + alpha * T^2 KL_T(teacher || student); "
                  "while step < msteps each epoch first ascends the whole loss on forget "
                  "(manipulated labels), then descends it on retain",
          source="corrective-unlearning-bench src/methods.py Scrub (Kurmanji et al. 2023)")
def scrub(model: nn.Module, s: Setup) -> nn.Module:
    """The corrective paper's SCRUB maximises CE + KL on the forget set (the original SCRUB
    maximises only the KL). The KL is averaged per sample (batchmean), times T^2."""
    alpha, temp, msteps = float(s.params["alpha"]), float(s.params["kd_T"]), int(s.params["msteps"])
    if alpha < 0 or temp <= 0 or msteps < 0:
        raise UserError("scrub needs alpha >= 0, kd_T > 0 and msteps >= 0")
    teacher = frozen_copy(model)

    def loss_fn(m, item):
        tag, batch = item
        logits = m(batch.x)
        with torch.no_grad():
            target = F.softmax(teacher(batch.x).float() / temp, dim=1)
        kl = F.kl_div(F.log_softmax(logits.float() / temp, dim=1), target, reduction="batchmean")
        loss = F.cross_entropy(logits, batch.y) + alpha * kl * temp * temp
        return (-loss if tag == "max" else loss), logits, batch.y

    stream = MaxMinStream(forget_loader(s), retain_loader(s), msteps)
    train(model, s, stream, loss_fn, state=(stream,), desc="scrub")
    return model


def random_init_copy(model_name: str, num_classes: int, device, seed: int) -> nn.Module:
    """A freshly initialised model of the same architecture (seeded, no gradients, eval)."""
    from models import get_model
    with torch.random.fork_rng(devices=[]):  # leave the global RNG stream as it was
        torch.manual_seed(seed)
        return frozen_copy(get_model(model_name, num_classes).to(device))


@register("badt", aliases=("BadT", "bad_teacher"), params={"k": -1},
          summary="Bad Teacher: distil the whole training set, S_f from a random-init "
                  "(incompetent) teacher, the rest from the original model (KL, T = 1)",
          source="corrective-unlearning-bench src/methods.py BadT (Chundawat et al. 2023)")
def badt(model: nn.Module, s: Setup) -> nn.Module:
    """The original averages F.kl_div over classes too (reduction='mean', 1/C of the KL);
    here the KL is per sample (batchmean), so learning rates are C times smaller for the
    same step."""
    good = frozen_copy(model)
    bad = random_init_copy(s.model_name, s.num_classes, s.device, s.seed + 7919)
    is_forget = forget_membership(s)

    def loss_fn(m, batch: Batch):
        logits = m(batch.x)
        with torch.no_grad():
            target = F.softmax(good(batch.x).float(), dim=1)
            sel = is_forget[batch.idx]
            if sel.any():
                target[sel] = F.softmax(bad(batch.x[sel]).float(), dim=1)
        loss = F.kl_div(F.log_softmax(logits.float(), dim=1), target, reduction="batchmean")
        return loss, logits, batch.y

    train(model, s, union_loader(s), loss_fn, desc="badt")
    return model


def ssd_importance(model: nn.Module, loader, params: list[torch.Tensor], amp: bool = False) -> list[torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean cross-entropy (eval mode)."""
    sums = [torch.zeros_like(p) for p in params]
    batches = 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for batch in loader:
        with engine.autocast(device, amp):
            loss = F.cross_entropy(model(batch.x), batch.y)
        for acc, g in zip(sums, torch.autograd.grad(loss, params)):
            acc += g.float().pow(2)
        batches += 1
    model.train(was_training)
    return [acc / max(1, batches) for acc in sums]


@torch.no_grad()
def ssd_dampen(params: list[torch.Tensor], imp_forget: list[torch.Tensor], imp_retain: list[torch.Tensor],
               dampening: float, select_weight: float, masks: list[torch.Tensor] | None = None) -> int:
    """Selective synaptic dampening in place: where I_f > alpha * I_D, theta *= min(lambda *
    I_D / I_f, 1); every other coordinate is left bit-identical. Returns how many were selected."""
    selected = 0
    for i, (p, i_f, i_d) in enumerate(zip(params, imp_forget, imp_retain)):
        sel = i_f > select_weight * i_d  # implies I_f > 0
        if masks is not None:
            sel &= masks[i]
        if not sel.any():
            continue
        beta = (dampening * i_d / torch.where(sel, i_f, torch.ones_like(i_f))).clamp(max=1.0)
        p.copy_(torch.where(sel, p * beta.to(p.dtype), p))
        selected += int(sel.sum())
    return selected


_IMPORTANCE_CACHE: dict = {}  # key -> (objects kept alive for the key's ids, result)


def _importances(model, s: Setup, params, names, amp):
    """(I_f, I_D) on the forget and retain streams. Settings of one grid share the same
    importances: they are cached for the same weights, data, seed and loader overrides (the
    entry holds the data objects, so their ids cannot be reused while it lives)."""
    h = hashlib.sha1()
    for n, p in zip(names, params):
        h.update(n.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    for idx in (s.data.forget_idx, s.data.retain_idx):
        h.update(idx.cpu().numpy().tobytes())
    key = (h.hexdigest(), id(s.data), id(s.view), s.seed, s.train.batch_size, s.train.augment,
           bool(amp))
    if key in _IMPORTANCE_CACHE:
        return _IMPORTANCE_CACHE[key][1]
    result = (ssd_importance(model, forget_loader(s, salt=11), params, amp),
              ssd_importance(model, retain_loader(s, salt=12), params, amp))
    while len(_IMPORTANCE_CACHE) >= 4:
        _IMPORTANCE_CACHE.pop(next(iter(_IMPORTANCE_CACHE)))
    _IMPORTANCE_CACHE[key] = ((s.data, s.view), result)
    return result


@register("ssd", aliases=("SSD",), params={"SSDdampening": 1.0, "SSDselectwt": 10.0, "k": -1},
          iterative=False,
          summary="Selective Synaptic Dampening: importances I = mean squared gradient on forget "
                  "(I_f) and retain (I_D); where I_f > SSDselectwt * I_D, theta *= "
                  "min(SSDdampening * I_D / I_f, 1); no training",
          source="corrective-unlearning-bench src/methods.py SSD (Foster et al. 2024)")
def ssd(model: nn.Module, s: Setup) -> nn.Module:
    """As the corrective paper: I_D on the retain set (the original SSD uses the whole
    training set), gradients with the training augmentation, every parameter tensor
    including BatchNorm's, exponent 1. k restricts it to the last k layers (the original
    crashes for k != -1); a saliency mask, if given, restricts it further."""
    lam, alpha = float(s.params["SSDdampening"]), float(s.params["SSDselectwt"])
    if lam <= 0 or alpha <= 0:
        raise UserError(f"ssd needs SSDdampening > 0 and SSDselectwt > 0, got {lam} and {alpha}")
    params, _ = trainable(model, int(s.params["k"]))
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    amp = engine.resolve_amp(s.train.amp, torch.device(s.device))
    imp_f, imp_d = _importances(model, s, params, names, amp)
    masks = None if s.mask is None else [s.mask[n].to(p.device) for n, p in zip(names, params)]
    selected = ssd_dampen(params, imp_f, imp_d, lam, alpha, masks)
    s.log(f"ssd: dampened {selected} of {sum(p.numel() for p in params)} parameters")
    model.eval()
    return model


# --- metrics -------------------------------------------------------------------------------

def evaluate(model, data: PreparedData, manip: Manipulation, *, model_name: str, batch_size: int,
             device, amp=None, test_idx: torch.Tensor | None = None) -> dict:
    """The paper's metrics in % (see README, "Corrective unlearning"), on the test split and,
    with the same definitions, on the validation split (`val_*`, for choosing
    hyper-parameters), plus accuracy on S_m and S_f against their clean labels (with the
    trigger, as the model saw them, for poisoning)."""

    def preds(split, idx, view=None):
        loader = make_loader(data, split, idx, model_name=model_name, batch_size=batch_size,
                             device=device, view=view)
        logits, labels = engine.predict(model, loader, amp)
        return logits.argmax(1), labels

    test_idx = torch.arange(len(data.test)) if test_idx is None else test_idx
    out = {}
    for prefix, split, idx in (("", "test", test_idx), ("val_", "train", data.val_idx)):
        if len(idx):
            out.update({prefix + k: v for k, v in domain_metrics(preds, manip, split, idx).items()})
    seen = TrainingView(stamp=manip.stamp, stamp_mask=manip.stamp_mask()) if manip.poisons else None
    for key, idx in (("acc_Sm", manip.manip_idx), ("acc_Sf", data.forget_idx)):
        if len(idx):
            out[key] = MX.accuracy(*preds("train", idx, seen))
    return out


def domain_metrics(preds, manip: Manipulation, split: str, idx: torch.Tensor) -> dict:
    p_clean, y = preds(split, idx)
    if manip.kind == "poisoning":
        p_trig, _ = preds(split, idx, manip.triggered())
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

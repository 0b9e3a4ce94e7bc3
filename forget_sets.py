"""What an unlearning experiment forgets: one object per kind of forget set.

An experiment names exactly one forget specifier. Each kind knows the JSON key that names
it (and the keys that only go with it), the defaults it brings, how the run's data split
is built, what it adds to the cache keys of the models trained for it, the view of the
training set the model was trained on, and the metrics its runs report. The runner asks
these questions and never branches on the kind.

  class_to_forget   every training image of one class (SalUn's class-wise forgetting)
  unlearning_rate   a random share of the training set, drawn per seed (random forgetting)
  idxs_to_forget    the training indices in a JSON file
  dataset_method    the corrective paper's manipulations (corrective.CorrectiveForget)

The first three report SalUn's metrics (`salun_metrics`): UA, RA, TA, MIA and Avg. Gap to
the retrain reference.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

import engine
import metrics as MX
from constants import UserError
from training import DataSpec, PreparedData, make_loader, test_indices_without_class
from views import TrainingView

KINDS: dict[str, type[ForgetSet]] = {}  # JSON key -> kind


def kind(cls):
    """Class decorator: a kind of forget set, named by its JSON key."""
    KINDS[cls.key] = cls
    return cls


class ForgetSet:
    key: ClassVar[str]
    types: ClassVar[tuple]  # the JSON types its value may have
    help: ClassVar[str]
    keys: ClassVar[dict] = {}  # keys that only go with this kind: {key: (types, default, help)}
    defaults: ClassVar[dict] = {}  # the experiment's defaults (unlearning recipe, ...) it brings
    base_defaults: ClassVar[dict] = {}  # defaults of the base model's recipe
    per_seed: ClassVar[bool] = False  # a different forget set for every seed
    has_gap: ClassVar[bool] = True  # Avg. Gap to a retrain reference is defined
    seed_per_base: ClassVar[bool] = False  # one base model per run seed (manipulated data)

    def __init__(self, value, extra: dict | None = None):
        self.value, self.extra = value, dict(extra or {})

    # --- validation and description ------------------------------------------------
    def validate(self, exp, where: str, num_classes: int | None) -> None:
        """Check the value against the experiment; raise UserError(where: ...)."""

    def check_method(self, method, where: str) -> None:
        """Refuse a method this forget set cannot run."""

    def label(self) -> str:
        raise NotImplementedError

    def record(self) -> dict:
        """The experiment record's forget keys (every kind's key, None where not this kind)."""
        out = {k: None for cls in KINDS.values() for k in (cls.key, *cls.keys)}
        out[self.key] = self.value
        out.update(self.extra)
        return out

    # --- data ------------------------------------------------------------------------
    def data_spec(self, exp, with_forget: bool = True) -> DataSpec:
        spec = DataSpec(dataset=exp.dataset, subset=exp.subset, val_frac=exp.val_frac,
                        split_seed=exp.split_seed)
        if with_forget:
            for name, value in self.spec_fields().items():
                setattr(spec, name, value)
        return spec

    def spec_fields(self) -> dict:
        """DataSpec's forget fields (cf / unlr / itf)."""
        return {}

    def prepare(self, runner, exp, seed: int) -> PreparedData:
        """The run's data: forget and retain sets of the (sub)set, validation split."""
        return runner.split(self.data_spec(exp), seed if self.per_seed else None)

    def view(self, runner, exp, seed: int) -> TrainingView | None:
        """The training set as the model was trained on it (None: the plain split)."""
        return None

    def cache_key(self, exp, seed: int) -> dict:
        """What this forget set adds to the cache keys of the models trained for it."""
        return {}

    # --- evaluation --------------------------------------------------------------------
    def test_indices(self, test) -> torch.Tensor:
        return torch.arange(len(test))

    def evaluate(self, runner, model, exp, data: PreparedData, seed: int,
                 test_idx: torch.Tensor) -> dict:
        return salun_metrics(model, exp, data, test_idx, runner.device, runner.amp,
                             forgotten_class=None)

    def base_meta(self, runner, exp, seed: int, path) -> dict:
        """What the base model's checkpoint records about this forget set (and the files it
        writes beside it) when the base model is trained for it."""
        return {}

    def base_facts(self, runner, exp, seed: int, base, data: PreparedData) -> dict:
        """What a run's record says about the original model besides its test accuracy."""
        return {}

    def run_facts(self, exp, data: PreparedData) -> dict:
        """Facts about the run's forget set for its record."""
        return {}


@kind
class ClassForget(ForgetSet):
    key, types, help = "class_to_forget", (int,), "forget every training image of this class"

    def validate(self, exp, where, num_classes):
        if num_classes is not None and not 0 <= self.value < num_classes:
            raise UserError(f"{where}: class_to_forget {self.value} is out of range: {exp.dataset} "
                            f"has classes 0..{num_classes - 1}")

    def label(self):
        return f"class {self.value}"

    def spec_fields(self):
        return {"cf": self.value}

    def test_indices(self, test):
        return test_indices_without_class(test, self.value)

    def evaluate(self, runner, model, exp, data, seed, test_idx):
        return salun_metrics(model, exp, data, test_idx, runner.device, runner.amp,
                             forgotten_class=self.value)


@kind
class RandomForget(ForgetSet):
    key, types, help = ("unlearning_rate", (float, int),
                        "forget this fraction of the training set (drawn per seed)")
    per_seed = True

    def validate(self, exp, where, num_classes):
        if not 0 < self.value < 1:
            raise UserError(f"{where}: unlearning_rate must be in (0, 1), got {self.value}")

    def label(self):
        return f"{100 * self.value:g}% random"

    def spec_fields(self):
        return {"unlr": self.value}


@kind
class IndexFileForget(ForgetSet):
    key, types, help = "idxs_to_forget", (str,), "JSON file with the training indices to forget"

    def validate(self, exp, where, num_classes):
        if not Path(self.value).is_file():
            raise UserError(f"{where}: index file {self.value} does not exist")

    def label(self):
        return f"file {Path(self.value).name}"

    def spec_fields(self):
        return {"itf": self.value}


def salun_metrics(model, exp, data: PreparedData, test_idx, device, amp,
                  forgotten_class: int | None) -> dict:
    """SalUn's metrics in %: UA = 100 − forget accuracy, RA, TA, validation accuracy (and on
    the forgotten class's validation images), the SVC MIA-efficacy (`MIA`: confidence; the
    other attacks as MIA_<name>) and DeepDive's RandomForest loss MIA."""
    def loader(split, idx):
        return make_loader(data, split, idx, model_name=exp.model, batch_size=exp.eval_batch_size,
                           device=device)

    def predict(split, idx):
        return engine.predict(model, loader(split, idx), amp)

    cf = forgotten_class
    val_idx = data.val_idx if cf is None else data.val_idx[data.train.y[data.val_idx] != cf]
    lf, yf = predict("train", data.forget_idx)
    lr_, yr = predict("train", data.retain_idx)
    lt, yt = predict("test", test_idx)
    out = {"UA": MX.unlearning_accuracy(lf, yf), "RA": MX.accuracy(lr_, yr), "TA": MX.accuracy(lt, yt)}
    if len(val_idx):
        lv, yv = predict("train", val_idx)
        out["VA"] = MX.accuracy(lv, yv)
    if cf is not None:
        vf = data.val_idx[data.train.y[data.val_idx] == cf]
        if len(vf):
            out["VA_forget"] = MX.accuracy(*predict("train", vf))
    mia = MX.svc_mia(lr_, yr, lt, yt, lf, yf, attacks=exp.mia_attacks, max_shadow=exp.mia_cap)
    out["MIA"] = mia["confidence"]
    out.update({f"MIA_{k}": v for k, v in mia.items() if k != "confidence"})
    if exp.rf_mia and len(val_idx):
        rf = MX.rf_loss_mia(MX.per_sample_loss(lr_, yr), MX.per_sample_loss(lv, yv),
                            MX.per_sample_loss(lf, yf), MX.per_sample_loss(lt, yt),
                            max_samples=exp.mia_cap or 5000)
        out["MIA_RF"], out["MIA_RF_auc"] = rf["acc"], rf["auc"]
    return out

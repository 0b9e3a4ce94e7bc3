"""Unlearning experiments: the schema of the JSON experiment files (SalUn DeepDive's keys,
the corrective paper's names), their validation and loading.

An experiment file is a list of experiments (dicts) or {"defaults": {...}, "experiments":
[...]}. `validate` turns one dict into a typed `Experiment`, checking every key, type and
range before anything runs, with one line naming the experiment and what to fix. The
training keys (`lr`, `epochs`, `batch_size`, ...) are the fields of `engine.TrainConfig`,
with the unlearning defaults of `unlearning.UNLEARN_DEFAULTS`; the base model's recipe
(`base`) takes the same keys plus `seed`, with the SalUn base recipe as its defaults.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import corrective  # noqa: F401  (registers the dataset_method forget set)
import metrics as MX
import unlearning
from constants import DATASETS, UserError, canonical_dataset_name, data_root
from engine import TrainConfig
from forget_sets import KINDS, ForgetSet
from models import MODELS, canonical_model_name

OPT_STR, OPT_INT, OPT_FLOAT = (str, type(None)), (int, type(None)), (float, int, type(None))

# key: (accepted JSON types, default, help); the training keys come from TrainConfig
KEYS: dict[str, tuple] = {
    "method": (str, "rl", "unlearning method or alias (see --list-methods)"),
    "tag": (OPT_STR, None, "name of the experiment in tables and logs"),
    "seed": (int, 0, "first seed; run i uses seed + i"),
    "nexp": (int, 1, "runs (seeds) per experiment; --nexp overrides"),
    "checkpoint": (OPT_STR, None, "base model checkpoint; none = train (and cache) it"),
    "num_classes": (OPT_INT, None, "checked against the dataset (corrective README flag)"),
    "use_mask": (bool, False, "apply the SalUn saliency mask (method salun always does)"),
    "mask_thr": (float, 0.5, "share of weights the mask lets change (global top |grad|)"),
    "load_mask": (OPT_STR, None, "use this saved mask instead of computing one"),
    "save_mask": (bool, False, "save the computed mask next to the results"),
    "model": (str, "resnet18", "model name (models.py or timm)"),
    "dataset": (str, "cifar10", "cifar10, cifar100, svhn, gtsrb or an ImageFolder name"),
    "subset": (OPT_INT, None, "class-balanced subset of the training split (quick runs)"),
    "test_subset": (OPT_INT, None, "class-balanced subset of the test split (quick runs)"),
    "val_frac": (float, 0.1, "stratified validation split held out of training"),
    "split_seed": (int, 0, "seed of subset / validation split (shared by all runs)"),
    "base": (dict, None, "recipe of the base and retrain models (the training keys and seed)"),
    "mia_cap": (OPT_INT, None, "cap on each MIA shadow set (speed); none = official size"),
    "mia_attacks": (list, list(MX.MIA_ATTACKS), "SVC MIA attacks to run; MIA = confidence"),
    "rf_mia": (bool, True, "also DeepDive's RandomForest loss MIA (retain vs validation)"),
    "avg_gap": (bool, True, "train/reuse the retrain reference and report Avg. Gap"),
    "save_model": (bool, False, "save the unlearned model under <results>/models/"),
    "eval_batch_size": (int, 1024, "evaluation batch size"),
}
# the corrective README's names for existing keys: they win over them
KEY_ALIASES = {"unlearn_method": "method", "unlearn_iters": "steps", "unlearn_lr": "lr"}
BASE_ALIASES = {"pretrain_iters": "steps", "pretrain_lr": "lr"}
# the base model's recipe: the official SalUn one (182 epochs, ×0.1 at 50 % and 75 %)
BASE_DEFAULTS = TrainConfig(epochs=182, lr=0.1, batch_size=256, schedule="multistep")
PARAM_TYPES = {"k": (int,), "samples": (int,), "no_l1_epochs": (int,), "msteps": (int,)}


def _json_types(annotation) -> tuple:
    """The JSON types a TrainConfig field accepts, from its annotation."""
    if typing.get_origin(annotation) is tuple:
        return (list,)
    union = isinstance(annotation, types.UnionType)
    out = []
    for t in typing.get_args(annotation) if union else (annotation,):
        out += [float, int] if t is float else [t]
    return tuple(dict.fromkeys(out))


_HINTS = typing.get_type_hints(TrainConfig)
TRAIN_KEYS = {name: _json_types(_HINTS[name]) for name in TrainConfig.recipe_fields()}
TRAIN_KEYS["schedule"] = OPT_STR  # null: the method's default schedule


def param_keys() -> list[str]:
    """Every method hyper-parameter (top-level keys; each method accepts only its own)."""
    unlearning.method_names()  # loads the method modules
    return sorted({k for m in unlearning.METHODS.values() for k in m.params})


def forget_keys() -> dict[str, tuple]:
    """The forget specifiers and the keys that only go with one of them."""
    out = {}
    for cls in KINDS.values():
        out[cls.key] = (cls.types + (type(None),), None, cls.help)
        out.update({k: (v[0] + (type(None),), None, v[2]) for k, v in cls.keys.items()})
    return out


@dataclass
class Experiment:
    """One validated experiment."""

    method: str
    method_name: str
    params: dict
    forget: ForgetSet
    train: TrainConfig  # the unlearning recipe
    base: TrainConfig  # the base (and retrain) model's recipe
    base_seed: int | None = None
    tag: str = ""
    seed: int = 0
    nexp: int = 1
    checkpoint: str | None = None
    use_mask: bool = False
    mask_thr: float = 0.5
    load_mask: str | None = None
    save_mask: bool = False
    model: str = "resnet18"
    dataset: str = "cifar10"
    subset: int | None = None
    test_subset: int | None = None
    val_frac: float = 0.1
    split_seed: int = 0
    mia_cap: int | None = None
    mia_attacks: list = field(default_factory=lambda: list(MX.MIA_ATTACKS))
    rf_mia: bool = True
    avg_gap: bool = True
    save_model: bool = False
    eval_batch_size: int = 1024

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.nexp))

    @property
    def is_reference(self) -> bool:
        """Retraining from scratch without a mask: the reference the others are compared to."""
        return self.method_name == "retrain" and self.params.get("k", -1) == -1 and not self.use_mask

    def record(self) -> dict:
        """The experiment as plain data for result records (one flat dict, as in the files)."""
        skip = {"forget", "train", "base", "base_seed", "tag"}
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in skip}
        out.update(self.forget.record())
        out.update({k: v for k, v in self.train.plain().items() if k in TRAIN_KEYS})
        out["base"] = {**{k: v for k, v in self.base.plain().items() if k in TRAIN_KEYS},
                       "seed": self.base_seed}
        return out


# ----------------------------------------------------------------------------- checks

def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
             list: "a list", dict: "an object", type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_type(where: str, key: str, value, types) -> None:
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise UserError(f"{where}: '{key}' must be {_type_name(types)}, got {json.dumps(value)}")


def _unknown(where: str, key: str, valid) -> UserError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{where}: unknown key '{key}'{hint}")


def num_classes_of(dataset: str) -> int | None:
    key = canonical_dataset_name(dataset)
    if key in DATASETS:
        return DATASETS[key].num_classes
    root = data_root()
    for cand in (root / dataset / "train", root / key / "train"):
        if cand.is_dir():
            return sum(1 for d in cand.iterdir() if d.is_dir())
    return None


def _check_model(where: str, name: str) -> str:
    if canonical_model_name(name) in MODELS:
        return canonical_model_name(name)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return name
    close = difflib.get_close_matches(canonical_model_name(name), list(MODELS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"{where}: unknown model '{name}'{hint}; choose from {', '.join(MODELS)} "
                    "or a timm model name")


def _resolve_path(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = base_dir / path
    return alt if alt.exists() else path


def _check_recipe(where: str, values: dict) -> None:
    if values["epochs"] <= 0 and not values["steps"]:
        raise UserError(f"{where}: epochs must be positive")
    if values["optimizer"] not in TrainConfig.OPTIMIZERS:
        raise UserError(f"{where}: optimizer must be sgd or adam, got '{values['optimizer']}'")
    if values["schedule"] not in TrainConfig.SCHEDULES:
        raise UserError(f"{where}: schedule must be constant, cosine, linear or multistep")
    for key in ("lr", "batch_size"):
        if values[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {values[key]}")
    if values["steps"] is not None and values["steps"] <= 0:
        raise UserError(f"{where}: steps must be positive, got {values['steps']}")


def _recipe(values: dict) -> TrainConfig:
    values = {k: v for k, v in values.items() if k in TRAIN_KEYS}
    values["milestones"] = tuple(values.get("milestones") or ())
    return TrainConfig(**values)


def validate_base(raw: dict, where: str) -> tuple[TrainConfig, int | None]:
    """The base model's recipe from the `base` object (SalUn's recipe where not set)."""
    valid = {**{k: t for k, t in TRAIN_KEYS.items() if k != "schedule"}, "schedule": (str,),
             "milestones": (list, type(None)), "steps": OPT_INT, "seed": OPT_INT}
    out = {**BASE_DEFAULTS.plain(), "milestones": None, "seed": None}
    for key, value in raw.items():
        if key not in valid:
            raise _unknown(where, key, valid)
        _check_type(where, key, value, valid[key])
        out[key] = value
    _check_recipe(where, out)
    if out["milestones"] is None and out["schedule"] == "multistep":
        out["milestones"] = [out["epochs"] // 2, out["epochs"] * 3 // 4]
    if not all(isinstance(m, int) for m in out["milestones"] or []):
        raise UserError(f"{where}: milestones must be a list of integers")
    return _recipe(out), out["seed"]


# ----------------------------------------------------------------------------- validation

def validate(raw: dict, where: str, base_dir: Path) -> Experiment:
    """Merge defaults, check every key, type and range; returns the experiment."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: an experiment must be a JSON object, got {json.dumps(raw)[:60]}")
    params = param_keys()
    schema = {**KEYS, **{k: (t, None, "") for k, t in TRAIN_KEYS.items()}, **forget_keys(),
              **{a: (OPT_STR if a == "unlearn_method" else OPT_INT if a == "unlearn_iters"
                     else OPT_FLOAT, None, "") for a in KEY_ALIASES},
              **{a: (OPT_INT if a == "pretrain_iters" else OPT_FLOAT, None, "") for a in BASE_ALIASES}}
    for key in raw:
        if key not in schema and key not in params:
            raise _unknown(where, key, set(schema) | set(params))
    for key, value in raw.items():
        accepted = PARAM_TYPES.get(key, (float, int)) if key in params else schema[key][0]
        _check_type(where, key, value, accepted)
    exp = {k: copy.deepcopy(v[1]) for k, v in KEYS.items()}
    exp.update({k: v for k, v in unlearning.UNLEARN_DEFAULTS.plain().items() if k in TRAIN_KEYS})
    exp["schedule"] = None
    exp.update({k: v for k, v in raw.items() if k in KEYS or k in TRAIN_KEYS})
    given = set(raw)
    for alias, key in KEY_ALIASES.items():  # the corrective README's names win
        if raw.get(alias) is not None:
            exp[key] = raw[alias]
            given.add(key)
    named = [cls for cls in KINDS.values() if raw.get(cls.key) is not None]
    if len(named) != 1:
        what = "none" if not named else " and ".join(cls.key for cls in named)
        raise UserError(f"{where}: name exactly one forget specifier ({', '.join(KINDS)}); got {what}")
    cls = named[0]
    for other in KINDS.values():
        stray = [k for k in other.keys if other is not cls and raw.get(k) is not None]
        if stray:
            raise UserError(f"{where}: '{stray[0]}' only goes with {other.key}")
    forget = cls(raw[cls.key], {k: raw.get(k, d[1]) if raw.get(k) is not None else d[1]
                                for k, d in cls.keys.items()})
    for key, value in cls.defaults.items():  # e.g. the corrective paper's recipe
        if key not in given and not (key == "steps" and "epochs" in given):
            exp[key] = value
    exp["dataset"] = canonical_dataset_name(exp["dataset"])
    n_classes = num_classes_of(exp["dataset"])
    if n_classes is None and exp["dataset"] not in DATASETS:
        raise UserError(f"{where}: unknown dataset '{exp['dataset']}': choose from "
                        f"{', '.join(DATASETS)} or put an ImageFolder under {data_root()}")
    if exp["num_classes"] is not None and n_classes is not None and exp["num_classes"] != n_classes:
        raise UserError(f"{where}: num_classes {exp['num_classes']} does not match {exp['dataset']} "
                        f"({n_classes} classes)")
    if cls.key == "idxs_to_forget":
        forget.value = str(_resolve_path(forget.value, base_dir))
    for key in ("checkpoint", "load_mask"):
        if exp[key] is not None:
            path = _resolve_path(exp[key], base_dir)
            if not path.is_file():
                what = {"checkpoint": "checkpoint", "load_mask": "mask file"}[key]
                raise UserError(f"{where}: {what} {exp[key]} does not exist")
            exp[key] = str(path)
    forget.validate(types.SimpleNamespace(**exp), where, n_classes)
    method, exp["params"] = _method(exp, raw, given, params, forget, where)
    if exp["load_mask"] is not None:
        exp["use_mask"] = True
    if not 0 < exp["mask_thr"] <= 1:
        raise UserError(f"{where}: mask_thr must be in (0, 1], got {exp['mask_thr']}")
    if exp["schedule"] is None:
        exp["schedule"] = method.train_defaults.get("schedule", "constant")
    _check_recipe(where, exp)
    for key in ("nexp", "eval_batch_size"):
        if exp[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {exp[key]}")
    for key in ("subset", "test_subset", "mia_cap"):
        if exp[key] is not None and exp[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {exp[key]}")
    test_size = DATASETS[exp["dataset"]].test_size if exp["dataset"] in DATASETS else None
    if exp["test_subset"] is not None and test_size and exp["test_subset"] > test_size:
        raise UserError(f"{where}: test_subset {exp['test_subset']} exceeds the test split")
    if not 0 <= exp["val_frac"] < 1:
        raise UserError(f"{where}: val_frac must be in [0, 1), got {exp['val_frac']}")
    bad = [a for a in exp["mia_attacks"] if a not in MX.MIA_ATTACKS]
    if bad or not exp["mia_attacks"]:
        raise UserError(f"{where}: mia_attacks must be a non-empty list from {list(MX.MIA_ATTACKS)}")
    if "confidence" not in exp["mia_attacks"]:
        exp["mia_attacks"] = ["confidence"] + exp["mia_attacks"]  # the headline MIA
    exp["model"] = _check_model(where, exp["model"])
    base_raw = dict(exp["base"] or {})
    for alias, key in BASE_ALIASES.items():
        if raw.get(alias) is not None:
            base_raw[key] = raw[alias]
    for key, value in cls.base_defaults.items():
        if not (key == "steps" and "epochs" in base_raw):
            base_raw.setdefault(key, value)
    base, base_seed = validate_base(base_raw, f"{where}, base")
    if exp["tag"] is None:
        args = ", ".join(f"{k}={v:g}" for k, v in sorted((k, raw[k]) for k in params if k in raw))
        exp["tag"] = (method.name + (f"({args})" if args else "")
                      + (f"+mask{exp['mask_thr']:g}" if exp["use_mask"] and not method.forces_mask else ""))
    plain = {k: v for k, v in exp.items() if k in KEYS and k not in ("method", "num_classes", "base")}
    return Experiment(method=exp["method"], method_name=method.name, params=exp["params"],
                      forget=forget, train=_recipe(exp), base=base, base_seed=base_seed, **plain)


def _method(exp: dict, raw: dict, given: set, params: list[str], forget: ForgetSet, where: str):
    """(method, its hyper-parameters); the method's own training defaults where not given."""
    try:
        method, _ = unlearning.resolve(exp["method"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    for key, value in method.train_defaults.items():  # e.g. SCRUB's smaller learning rate
        if key != "schedule" and key not in given:
            exp[key] = value
    forget.check_method(method, where)
    try:
        chosen = unlearning.method_params(exp["method"], {k: raw[k] for k in params if k in raw})
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    if method.forces_mask:
        if raw.get("use_mask") is False:
            raise UserError(f"{where}: method {method.name} always uses the saliency mask; "
                            "use rl_split for RL without it")
        exp["use_mask"] = True
    return method, chosen


def load_file(path: str) -> tuple[list, dict]:
    """(experiments as given, file defaults) of a JSON experiment file."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"experiment file {path} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    defaults = {}
    if isinstance(data, dict) and "experiments" in data:
        extra = [k for k in data if k not in ("experiments", "defaults", "description", "commit")]
        if extra:
            raise _unknown(path, extra[0], ("experiments", "defaults", "description", "commit"))
        defaults, data = data.get("defaults") or {}, data["experiments"]
        if not isinstance(defaults, dict):
            raise UserError(f"{path}: 'defaults' must be an object")
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of experiments")
    return data, defaults


def raw_experiments(path: str, flags: dict) -> tuple[list[tuple[str, dict]], str, Path]:
    """[(where, experiment as given)], source stem and base folder for relative paths, from a
    file (`path`, flags overriding every experiment) or from the flags alone."""
    specifiers = list(KINDS)
    if flags.get("class_to_forget") is None and any(k in flags for k in specifiers):
        flags.pop("class_to_forget", None)
    if not path:
        if not any(k in flags for k in specifiers):
            flags["class_to_forget"] = 0  # DeepDive's default -CF 0
        return [("command line", flags)], "cli", Path.cwd()
    raw, defaults = load_file(path)
    drop = set()
    if any(k in flags for k in specifiers):  # a forget flag replaces the file's specifier
        drop |= set(specifiers)
    drop |= {a for a, key in KEY_ALIASES.items() if key in flags}  # a flag beats the file's alias
    defaults = {k: v for k, v in defaults.items() if k not in drop}
    out = []
    for i, r in enumerate(raw):
        if isinstance(r, dict):
            r = {**defaults, **{k: v for k, v in r.items() if k not in drop}, **flags}
        out.append((f"{path} experiment {i + 1}", r))
    return out, Path(path).stem, Path(path).resolve().parent

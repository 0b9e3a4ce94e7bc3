"""Unlearning runner: SalUn DeepDive's main.py interface, driven by JSON experiment files.

    python main.py -L exp/quickstart.json               # the quickstart table (CPU, minutes)
    python main.py -L exp/classforget.json --nexp 5     # every experiment x 5 seeds
    python main.py -M rl_split -UM -MT 0.5 -CF 3 -E 10 -LR 0.013 -c checkpoints/base.pt
    python main.py -L exp/table1_cifar10_random10.json --dry-run   # validate, show the plan

A JSON file is a list of experiments (dicts), or {"defaults": {...}, "experiments": [...]}.
Each experiment names exactly one forget specifier: class_to_forget, unlearning_rate,
idxs_to_forget, or dataset_method (corrective unlearning: a manipulated training set, of
which the unlearner is handed deletion_size of the forget_set_size manipulated samples; the
manipulated model is trained once per configuration and seed and cached; see corrective.py
and the README's "Corrective unlearning"; the corrective README's flags --dataset_method,
--forget_set_size, --deletion_size, --pretrain_iters, --unlearn_method, --unlearn_iters, ...
are accepted too). `--nexp N` (or the key `nexp`) repeats it with seeds seed ... seed+N-1 (a
random forget set is drawn per seed). Without `checkpoint`, the base model the experiment
describes (`model`, `dataset`, `subset`, the `base` recipe) is trained once and cached; the
`retrain` reference (for Avg. Gap) is trained per seed on the retain set with the same
recipe and cached; both under CHECKPOINT_DIR, keyed by a hash of config, forget set and seed.
Flags given together with -L override the file's values in every experiment.

Results: one JSON line per run in RESULTS_DIR/main/<file stem>/runs.jsonl, per-experiment
mean +- std in summary.csv / summary.md (printed at the end). All metrics in percent:
UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy (without the forgotten
class in class-wise forgetting), MIA = SalUn's MIA-efficacy (SVC on confidence), MIA_RF =
DeepDive's RandomForest loss MIA, gap = Avg. Gap to retrain over UA/RA/TA/MIA; time_s =
wall-clock seconds of the unlearning (mask included; the retrain row shows its training).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import distributed
import corrective
import engine
import methods
import metrics as MX
from cli import RunLogger, add_runtime_args, run_main, setup_runtime
from constants import (DATASETS, UserError, canonical_dataset_name, checkpoint_dir, data_root,
                       results_dir)
from datasets import balanced_subset, write_index_json
from models import MODELS, canonical_model_name, get_model
from reporting import append_jsonl, markdown_table, summarize, write_json, write_tables
from training import (DataSpec, PreparedData, config_hash, make_loader, prepare_data,
                      test_indices_without_class, train_classifier)

# ----------------------------------------------------------------------------- schema

OPT_STR, OPT_INT, OPT_FLOAT = (str, type(None)), (int, type(None)), (float, int, type(None))

# key: (accepted types, default, help)
KEYS: dict[str, tuple] = {
    "method": (str, "rl", "unlearning method or alias (see --list-methods)"),
    "tag": (OPT_STR, None, "name of the experiment in tables and logs"),
    "seed": (int, 0, "first seed; run i uses seed + i"),
    "nexp": (int, 1, "runs (seeds) per experiment; --nexp overrides"),
    "checkpoint": (OPT_STR, None, "base model checkpoint; none = train (and cache) it"),
    # the forget specifier: exactly one (the corrective-unlearning issue adds dataset_method)
    "class_to_forget": (OPT_INT, None, "forget every training image of this class"),
    "unlearning_rate": (OPT_FLOAT, None, "forget this fraction of the training set (per seed)"),
    "idxs_to_forget": (OPT_STR, None, "JSON file with the training indices to forget"),
    "dataset_method": (OPT_STR, None, "corrective: poisoning | interclasslabelswap | randomlabelswap"),
    "forget_set_size": (OPT_INT, None, "corrective: |S_m|, manipulated training samples (default 500)"),
    "deletion_size": (OPT_INT, None, "corrective: |S_f| <= |S_m| handed to the unlearner (default all)"),
    "patch_size": (OPT_INT, None, "corrective poisoning: side of the trigger square (default 3)"),
    "num_classes": (OPT_INT, None, "checked against the dataset (corrective README flag)"),
    "unlearn_method": (OPT_STR, None, "alias of method (wins over it)"),
    "unlearn_iters": (OPT_INT, None, "alias of steps: unlearning iteration budget (wins over it)"),
    "unlearn_lr": (OPT_FLOAT, None, "alias of lr (wins over it)"),
    "pretrain_iters": (OPT_INT, None, "sets base.steps: iterations of the (manipulated) base model"),
    "pretrain_lr": (OPT_FLOAT, None, "sets base.lr"),
    "use_mask": (bool, False, "apply the SalUn saliency mask (method salun always does)"),
    "mask_thr": (float, 0.5, "share of weights the mask lets change (global top |grad|)"),
    "load_mask": (OPT_STR, None, "use this saved mask instead of computing one"),
    "save_mask": (bool, False, "save the computed mask next to the results"),
    "lr": (float, 0.01, "unlearning learning rate"),
    "epochs": (int, 10, "unlearning epochs"),
    "steps": (OPT_INT, None, "unlearning iteration budget (overrides epochs)"),
    "batch_size": (int, 256, "unlearning batch size"),
    "optimizer": (str, "sgd", "sgd or adam"),
    "momentum": (float, 0.9, "SGD momentum (DeepDive used 0 at lr 0.1)"),
    "weight_decay": (float, 5e-4, "weight decay"),
    "schedule": (OPT_STR, None, "constant|cosine|linear|multistep; none = method default"),
    "warmup": (float, 0.0, "linear warm-up, fraction of all steps"),
    "augment": (bool, True, "crop + flip on the unlearning streams"),
    "model": (str, "resnet18", "model name (models.py or timm)"),
    "dataset": (str, "cifar10", "cifar10, cifar100, svhn, gtsrb or an ImageFolder name"),
    "subset": (OPT_INT, None, "class-balanced subset of the training split (quick runs)"),
    "test_subset": (OPT_INT, None, "class-balanced subset of the test split (quick runs)"),
    "val_frac": (float, 0.1, "stratified validation split held out of training"),
    "split_seed": (int, 0, "seed of subset / validation split (shared by all runs)"),
    "base": (dict, None, "recipe of the base and retrain models (see BASE_KEYS)"),
    "mia_cap": (OPT_INT, None, "cap on each MIA shadow set (speed); none = official size"),
    "mia_attacks": (list, list(MX.MIA_ATTACKS), "SVC MIA attacks to run; MIA = confidence"),
    "rf_mia": (bool, True, "also DeepDive's RandomForest loss MIA (retain vs validation)"),
    "avg_gap": (bool, True, "train/reuse the retrain reference and report Avg. Gap"),
    "save_model": (bool, False, "save the unlearned model under <results>/models/"),
    "eval_batch_size": (int, 1024, "evaluation batch size"),
}
FORGET_KEYS = ("class_to_forget", "unlearning_rate", "idxs_to_forget", "dataset_method")
KEY_ALIASES = {"unlearn_method": "method", "unlearn_iters": "steps", "unlearn_lr": "lr"}
BASE_ALIASES = {"pretrain_iters": "steps", "pretrain_lr": "lr"}
CORRECTIVE_KEYS = ("forget_set_size", "deletion_size", "patch_size")
# the corrective paper's recipe (SGD lr 0.025, batch 512, per-step linear warm-up and decay),
# the defaults of corrective experiments for what they do not set
CORRECTIVE_DEFAULTS = {"lr": 0.025, "batch_size": 512, "schedule": "linear", "warmup": 0.01,
                       "steps": 1000, "avg_gap": False, "forget_set_size": 500, "patch_size": 3}
CORRECTIVE_BASE_DEFAULTS = {"steps": 7500, "lr": 0.025, "batch_size": 512, "schedule": "linear",
                            "warmup": 0.01}
# method hyper-parameters (top-level keys; each method accepts only its own)
PARAM_KEYS = sorted({k for m in methods.METHODS.values() for k in m.params})
PARAM_TYPES = {"k": (int,), "samples": (int,), "no_l1_epochs": (int,), "msteps": (int,)}

BASE_KEYS: dict[str, tuple] = {  # the official SalUn recipe for the original model
    "epochs": (int, 182), "steps": (OPT_INT, None), "lr": (float, 0.1), "batch_size": (int, 256),
    "optimizer": (str, "sgd"), "momentum": (float, 0.9), "weight_decay": (float, 5e-4),
    "schedule": (str, "multistep"), "milestones": ((list, type(None)), None),
    "warmup": (float, 0.0), "augment": (bool, True), "seed": (OPT_INT, None),
}

METRICS = ["UA", "RA", "TA", "MIA", "MIA_RF", "gap", "Acc_corr", "Acc_retain", "ASR", "acc_Sm",
           "acc_Sf", "time_s"]
HEADERS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA", "MIA_RF": "MIA-RF",
           "gap": "Avg. Gap", "Acc_corr": "Acc_corr", "Acc_retain": "Acc_retain", "ASR": "ASR",
           "acc_Sm": "acc S_m", "acc_Sf": "acc S_f", "time_s": "time (s)"}


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


def _num_classes(dataset: str) -> int | None:
    key = canonical_dataset_name(dataset)
    if key in DATASETS:
        return DATASETS[key].num_classes
    root = data_root()
    for cand in (root / dataset / "train", root / key / "train"):
        if cand.is_dir():
            return sum(1 for d in cand.iterdir() if d.is_dir())
    return None


def _test_size(dataset: str) -> int | None:
    info = DATASETS.get(canonical_dataset_name(dataset))
    return info.test_size if info else None


def _check_model(where: str, name: str) -> None:
    if canonical_model_name(name) in MODELS:
        return
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return
    close = difflib.get_close_matches(canonical_model_name(name), list(MODELS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"{where}: unknown model '{name}'{hint}; choose from {', '.join(MODELS)} "
                    "or a timm model name")


def validate(raw: dict, where: str, base_dir: Path) -> dict:
    """Merge defaults, check every key, type and range; returns the normalised experiment."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: an experiment must be a JSON object, got {json.dumps(raw)[:60]}")
    valid = set(KEYS) | set(PARAM_KEYS)
    for key in raw:
        if key not in valid:
            raise _unknown(where, key, valid)
    exp = {k: copy.deepcopy(v[1]) for k, v in KEYS.items()}
    for key, value in raw.items():
        types = PARAM_TYPES.get(key, (float, int)) if key in PARAM_KEYS else KEYS[key][0]
        _check_type(where, key, value, types)
        exp[key] = value
    given_keys = _apply_aliases(exp, raw)
    if exp["dataset_method"] is not None:  # the corrective paper's recipe where not set
        for key, value in CORRECTIVE_DEFAULTS.items():
            if key not in given_keys and not (key == "steps" and "epochs" in given_keys):
                exp[key] = value
    # the forget specifier
    given = [k for k in FORGET_KEYS if exp[k] is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise UserError(f"{where}: name exactly one forget specifier ({', '.join(FORGET_KEYS)}); got {what}")
    exp["dataset"] = canonical_dataset_name(exp["dataset"])
    n_classes = _num_classes(exp["dataset"])
    if n_classes is None and exp["dataset"] not in DATASETS:
        raise UserError(f"{where}: unknown dataset '{exp['dataset']}': choose from "
                        f"{', '.join(DATASETS)} or put an ImageFolder under {data_root()}")
    cf = exp["class_to_forget"]
    if cf is not None and n_classes is not None and not 0 <= cf < n_classes:
        raise UserError(f"{where}: class_to_forget {cf} is out of range: {exp['dataset']} has "
                        f"classes 0..{n_classes - 1}")
    if exp["num_classes"] is not None and n_classes is not None and exp["num_classes"] != n_classes:
        raise UserError(f"{where}: num_classes {exp['num_classes']} does not match {exp['dataset']} "
                        f"({n_classes} classes)")
    _validate_corrective(exp, where, n_classes)
    if exp["unlearning_rate"] is not None and not 0 < exp["unlearning_rate"] < 1:
        raise UserError(f"{where}: unlearning_rate must be in (0, 1), got {exp['unlearning_rate']}")
    for key in ("idxs_to_forget", "checkpoint", "load_mask"):
        if exp[key] is not None:
            path = _resolve_path(exp[key], base_dir)
            if not path.is_file():
                what = {"checkpoint": "checkpoint", "load_mask": "mask file"}.get(key, "index file")
                raise UserError(f"{where}: {what} {exp[key]} does not exist")
            exp[key] = str(path)
    # method and its hyper-parameters
    try:
        method, _ = methods.resolve(exp["method"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    exp["method_name"] = method.name
    for key, value in method.train_defaults.items():  # e.g. SCRUB's smaller learning rate
        if key != "schedule" and key not in given_keys:
            exp[key] = value
    if exp["dataset_method"] is not None and exp["deletion_size"] == 0 and method.needs_forget:
        raise UserError(f"{where}: method {method.name} needs deletion_size >= 1")
    given_params = {k: raw[k] for k in PARAM_KEYS if k in raw}
    try:
        exp["params"] = methods.method_params(exp["method"], given_params)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    for key in PARAM_KEYS:
        exp.pop(key, None)
    if method.forces_mask:
        if "use_mask" in raw and raw["use_mask"] is False:
            raise UserError(f"{where}: method {method.name} always uses the saliency mask; "
                            "use rl_split for RL without it")
        exp["use_mask"] = True
    if exp["load_mask"] is not None:
        exp["use_mask"] = True
    if not 0 < exp["mask_thr"] <= 1:
        raise UserError(f"{where}: mask_thr must be in (0, 1], got {exp['mask_thr']}")
    if exp["schedule"] is None:
        exp["schedule"] = method.train_defaults.get("schedule", "constant")
    for key in ("lr", "batch_size", "nexp", "eval_batch_size"):
        if exp[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {exp[key]}")
    if exp["epochs"] <= 0 and not exp["steps"]:
        raise UserError(f"{where}: epochs must be positive")
    for key in ("subset", "test_subset", "mia_cap", "steps"):
        if exp[key] is not None and exp[key] <= 0:
            raise UserError(f"{where}: {key} must be positive, got {exp[key]}")
    if exp["test_subset"] is not None and _test_size(exp["dataset"]) and exp["test_subset"] > _test_size(exp["dataset"]):
        raise UserError(f"{where}: test_subset {exp['test_subset']} exceeds the test split")
    if not 0 <= exp["val_frac"] < 1:
        raise UserError(f"{where}: val_frac must be in [0, 1), got {exp['val_frac']}")
    if exp["optimizer"] not in ("sgd", "adam"):
        raise UserError(f"{where}: optimizer must be sgd or adam, got '{exp['optimizer']}'")
    if exp["schedule"] not in ("constant", "cosine", "linear", "multistep"):
        raise UserError(f"{where}: schedule must be constant, cosine, linear or multistep")
    bad = [a for a in exp["mia_attacks"] if a not in MX.MIA_ATTACKS]
    if bad or not exp["mia_attacks"]:
        raise UserError(f"{where}: mia_attacks must be a non-empty list from {list(MX.MIA_ATTACKS)}")
    if "confidence" not in exp["mia_attacks"]:
        exp["mia_attacks"] = ["confidence"] + exp["mia_attacks"]  # the headline MIA
    _check_model(where, exp["model"])
    exp["model"] = canonical_model_name(exp["model"]) if canonical_model_name(exp["model"]) in MODELS else exp["model"]
    exp["base"] = validate_base(_base_raw(exp), f"{where}, base")
    for key in (*KEY_ALIASES, *BASE_ALIASES, "num_classes"):
        exp.pop(key)
    if exp["tag"] is None:
        args = ", ".join(f"{k}={v:g}" for k, v in sorted(given_params.items()))
        exp["tag"] = (method.name + (f"({args})" if args else "")
                      + (f"+mask{exp['mask_thr']:g}" if exp["use_mask"] and not method.forces_mask else ""))
    return exp


def _apply_aliases(exp: dict, raw: dict) -> set:
    """The corrective README's names for existing keys win over them; returns the keys the
    experiment gave (aliases counted as their key)."""
    for alias, key in KEY_ALIASES.items():
        if raw.get(alias) is not None:
            exp[key] = raw[alias]
    return set(raw) | {KEY_ALIASES[a] for a in raw if a in KEY_ALIASES and raw[a] is not None}


def _base_raw(exp: dict) -> dict:
    """The base recipe as given, plus pretrain_iters / pretrain_lr, plus (corrective
    experiments) the corrective paper's recipe for what is not set."""
    out = dict(exp["base"] or {})
    for alias, key in BASE_ALIASES.items():
        if exp[alias] is not None:
            out[key] = exp[alias]
    if exp["dataset_method"] is not None:
        for key, value in CORRECTIVE_BASE_DEFAULTS.items():
            if key == "steps" and "epochs" in out:
                continue
            out.setdefault(key, value)
    return out


def _validate_corrective(exp: dict, where: str, n_classes: int | None) -> None:
    """dataset_method and the keys that go with it."""
    if exp["dataset_method"] is None:
        stray = [k for k in CORRECTIVE_KEYS if exp[k] is not None]
        if stray:
            raise UserError(f"{where}: '{stray[0]}' only goes with dataset_method")
        return
    try:
        exp["dataset_method"] = corrective.canonical_manipulation(exp["dataset_method"])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    n = exp["forget_set_size"]
    size = exp["subset"] or (DATASETS[exp["dataset"]].train_size if exp["dataset"] in DATASETS else None)
    if n <= 0 or (size is not None and n > size):
        raise UserError(f"{where}: forget_set_size must be between 1 and the training set size, got {n}")
    if exp["deletion_size"] is None:
        exp["deletion_size"] = n
    if not 0 <= exp["deletion_size"] <= n:
        raise UserError(f"{where}: deletion_size must be between 0 and forget_set_size ({n}), "
                        f"got {exp['deletion_size']}")
    if exp["patch_size"] < 1:
        raise UserError(f"{where}: patch_size must be positive, got {exp['patch_size']}")
    if exp["dataset_method"] == "interclasslabelswap":
        if n % 2:
            raise UserError(f"{where}: interclasslabelswap needs an even forget_set_size, got {n}")
        pair = corrective.interclass_pair(exp["dataset"])
        if n_classes is not None and max(pair) >= n_classes:
            raise UserError(f"{where}: interclasslabelswap confuses classes {pair}, but "
                            f"{exp['dataset']} has {n_classes} classes")
    if exp["avg_gap"]:
        raise UserError(f"{where}: avg_gap (the gap to retrain over UA/RA/TA/MIA) is not defined "
                        "for dataset_method experiments: set it to false")
    if exp["checkpoint"] is not None:
        raise UserError(f"{where}: checkpoint cannot go with dataset_method: the manipulated model "
                        "is trained (and cached) from the experiment's own S_m")


def validate_base(raw: dict, where: str) -> dict:
    out = {k: copy.deepcopy(v[1]) for k, v in BASE_KEYS.items()}
    for key, value in raw.items():
        if key not in BASE_KEYS:
            raise _unknown(where, key, BASE_KEYS)
        _check_type(where, key, value, BASE_KEYS[key][0])
        out[key] = value
    if out["epochs"] <= 0 and not out["steps"]:
        raise UserError(f"{where}: epochs must be positive")
    if out["lr"] <= 0 or out["batch_size"] <= 0:
        raise UserError(f"{where}: lr and batch_size must be positive")
    if out["schedule"] not in ("constant", "cosine", "linear", "multistep"):
        raise UserError(f"{where}: schedule must be constant, cosine, linear or multistep")
    if out["milestones"] is None and out["schedule"] == "multistep":
        out["milestones"] = [out["epochs"] // 2, out["epochs"] * 3 // 4]
    if out["milestones"] is not None and not all(isinstance(m, int) for m in out["milestones"]):
        raise UserError(f"{where}: milestones must be a list of integers")
    return out


def _resolve_path(p: str, base_dir: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists():
        return path
    alt = base_dir / path
    return alt if alt.exists() else path


def load_experiments(path: str) -> tuple[list[dict], dict]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"experiment file {path} does not exist")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    defaults = {}
    if isinstance(data, dict) and "experiments" in data:
        extra = [k for k in data if k not in ("experiments", "defaults", "description")]
        if extra:
            raise _unknown(path, extra[0], ("experiments", "defaults", "description"))
        defaults, data = data.get("defaults") or {}, data["experiments"]
        if not isinstance(defaults, dict):
            raise UserError(f"{path}: 'defaults' must be an object")
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: expected a non-empty list of experiments")
    return data, defaults


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-L", "--load", default="", help="JSON experiment file ('' = one experiment from flags)")
    p.add_argument("--nexp", type=int, default=None, help="runs per experiment (seeds seed..seed+N-1)")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan")
    p.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    p.add_argument("--out", default=None, help="results folder (default RESULTS_DIR/main/<file stem>)")
    e = p.add_argument_group("experiment (with -L: override every experiment of the file)")
    e.add_argument("-c", "--checkpoint", default=None)
    e.add_argument("-CF", "--class-to-forget", dest="class_to_forget", type=int, default=None)
    e.add_argument("-UL", "--unlearning-rate", dest="unlearning_rate", type=float, default=None)
    e.add_argument("-ITF", "--idxs-to-forget", dest="idxs_to_forget", default=None)
    e.add_argument("-E", "--epochs", type=int, default=None)
    e.add_argument("-M", "--method", "--unlearn_method", dest="method", default=None)
    e.add_argument("-UM", "--use-mask", dest="use_mask", action="store_const", const=True, default=None)
    e.add_argument("-MT", "--mask-thr", dest="mask_thr", type=float, default=None)
    e.add_argument("-LM", "--load-mask", dest="load_mask", default=None)
    e.add_argument("-LR", "--lr", "--unlearn_lr", dest="lr", type=float, default=None)
    e.add_argument("-T", "--tag", default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--model", default=None)
    e.add_argument("--dataset", default=None)
    e.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    e.add_argument("--subset", type=int, default=None)
    e.add_argument("--test-subset", dest="test_subset", type=int, default=None)
    e.add_argument("--mia-cap", dest="mia_cap", type=int, default=None)
    e.add_argument("--k", type=int, default=None, help="last k layers (CF-k / EU-k)")
    e.add_argument("--alpha", type=float, default=None, help="method weight (l1_sparse, iu, neggrad_plus, scrub)")
    c = p.add_argument_group("corrective unlearning (the corrective README's flags; JSON keys of the same names)")
    c.add_argument("--dataset_method", default=None, help="poisoning | interclasslabelswap | randomlabelswap")
    c.add_argument("--forget_set_size", type=int, default=None, help="|S_m|, manipulated samples")
    c.add_argument("--deletion_size", type=int, default=None, help="|S_f| <= |S_m| handed to the unlearner")
    c.add_argument("--patch_size", type=int, default=None, help="poisoning trigger side (default 3)")
    c.add_argument("--num_classes", type=int, default=None, help="checked against the dataset")
    c.add_argument("--pretrain_iters", type=int, default=None, help="iterations of the manipulated model")
    c.add_argument("--pretrain_lr", type=float, default=None)
    c.add_argument("--unlearn_iters", "--steps", dest="steps", type=int, default=None,
                   help="unlearning iteration budget (overrides epochs)")
    c.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=None)
    c.add_argument("--kd_T", type=float, default=None, help="scrub temperature")
    c.add_argument("--msteps", type=int, default=None, help="scrub max-step budget")
    c.add_argument("--SSDdampening", type=float, default=None, help="ssd lambda")
    c.add_argument("--SSDselectwt", type=float, default=None, help="ssd alpha")
    add_runtime_args(p)
    return p


FLAG_KEYS = ("checkpoint", "class_to_forget", "unlearning_rate", "idxs_to_forget", "epochs", "method",
             "use_mask", "mask_thr", "load_mask", "lr", "tag", "seed", "model", "dataset", "batch_size",
             "subset", "test_subset", "mia_cap", "k", "alpha", "dataset_method", "forget_set_size",
             "deletion_size", "patch_size", "num_classes", "pretrain_iters", "pretrain_lr", "steps",
             "weight_decay", "kd_T", "msteps", "SSDdampening", "SSDselectwt")


def experiments_from_args(args) -> tuple[list[tuple[str, dict]], str, Path]:
    """[(where, raw experiment)], source stem, base dir for relative paths."""
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    if flags.get("class_to_forget") is None and any(k in flags for k in ("unlearning_rate", "idxs_to_forget")):
        flags.pop("class_to_forget", None)
    if args.load:
        raw, defaults = load_experiments(args.load)
        if any(k in flags for k in FORGET_KEYS):  # a forget flag replaces the file's specifier
            defaults = {k: v for k, v in defaults.items() if k not in FORGET_KEYS}
            raw = [{k: v for k, v in r.items() if k not in FORGET_KEYS} if isinstance(r, dict) else r
                   for r in raw]
        # a flag beats the file's alias of its key too (-M over "unlearn_method")
        aliases = {a for a, key in KEY_ALIASES.items() if key in flags}
        defaults = {k: v for k, v in defaults.items() if k not in aliases}
        raw = [{k: v for k, v in r.items() if k not in aliases} if isinstance(r, dict) else r for r in raw]
        out = [(f"{args.load} experiment {i + 1}", {**defaults, **r, **flags} if isinstance(r, dict) else r)
               for i, r in enumerate(raw)]
        return out, Path(args.load).stem, Path(args.load).resolve().parent
    if not any(k in flags for k in FORGET_KEYS):
        flags["class_to_forget"] = 0  # DeepDive's default -CF 0
    return [("command line", flags)], "cli", Path.cwd()


# ----------------------------------------------------------------------------- running

def data_spec(exp: dict, with_forget: bool = True) -> DataSpec:
    """The data an experiment describes. The forget specifier maps onto DataSpec here; the
    corrective-unlearning issue adds `dataset_method` (a manipulated training set) next to it."""
    spec = DataSpec(dataset=exp["dataset"], subset=exp["subset"], val_frac=exp["val_frac"],
                    split_seed=exp["split_seed"])
    if with_forget:
        spec.cf, spec.unlr, spec.itf = exp["class_to_forget"], exp["unlearning_rate"], exp["idxs_to_forget"]
    return spec


def _recipe(base: dict) -> dict:
    train = {k: base[k] for k in ("epochs", "steps", "lr", "optimizer", "momentum", "weight_decay",
                                   "schedule", "warmup")}
    train["milestones"] = list(base["milestones"] or [])
    return {"train": train, "batch_size": base["batch_size"], "augment": base["augment"]}


def _manip_key(exp: dict, seed: int) -> dict:
    """What determines S_m and the manipulated labels / trigger (with the data spec and the
    model's input normalisation): hashed into the base and retrain cache names."""
    return {"dataset_method": exp["dataset_method"], "forget_set_size": exp["forget_set_size"],
            "patch_size": exp["patch_size"], "seed": seed, "version": 1}


def _digest(idx: torch.Tensor) -> str:
    return hashlib.sha1(idx.cpu().numpy().tobytes()).hexdigest()[:12]


class Runner:
    def __init__(self, args, device, out_dir: Path, amp):
        self.args, self.device, self.out_dir, self.amp = args, device, out_dir, amp
        self.bases: dict[str, tuple] = {}  # key -> (model, meta)
        self.references: dict[str, dict] = {}  # retrain cache path -> metrics
        self.splits: dict[tuple, PreparedData] = {}
        self.manipulations: dict[tuple, corrective.Manipulation] = {}
        self.base_metrics: dict[str, dict] = {}  # corrective: base path -> its metrics

    # --- data and models -----------------------------------------------------------
    def data(self, exp, seed, with_forget=True) -> PreparedData:
        spec = data_spec(exp, with_forget)
        random = with_forget and exp["unlearning_rate"] is not None
        key = (json.dumps(asdict(spec), sort_keys=True), seed if random else None)
        if key not in self.splits:
            self.splits[key] = prepare_data(spec, seed=seed)
        if exp["dataset_method"] is not None and with_forget:  # forget = S_f, retain keeps S_m \ S_f
            dkey = (key[0], json.dumps(_manip_key(exp, seed), sort_keys=True), exp["model"], exp["deletion_size"])
            if dkey not in self.splits:
                self.splits[dkey] = corrective.with_deletion(self.splits[key], self.manipulation(exp, seed),
                                                             exp["deletion_size"], seed)
            return self.splits[dkey]
        return self.splits[key]

    def manipulation(self, exp, seed) -> corrective.Manipulation | None:
        """S_m and its manipulated labels / trigger, drawn with the run's seed (None: no
        dataset_method)."""
        if exp["dataset_method"] is None:
            return None
        data = self.data(exp, seed, False)
        # the model matters: the trigger value is the largest pixel of the model's input space
        key = (json.dumps(asdict(data.spec), sort_keys=True), json.dumps(_manip_key(exp, seed), sort_keys=True),
               exp["model"])
        if key not in self.manipulations:
            self.manipulations[key] = corrective.manipulate(
                data.train, exp["dataset_method"], exp["forget_set_size"], seed=seed,
                candidates=data.retain_idx, patch_size=exp["patch_size"],
                value=corrective.trigger_value(data.train, exp["model"]), dataset=exp["dataset"])
        return self.manipulations[key]

    def overrides(self, exp, seed) -> dict:
        manip = self.manipulation(exp, seed)
        return manip.loader_overrides() if manip is not None else {}

    def base_path(self, exp, seed=None) -> Path:
        return checkpoint_dir() / "base" / f"{exp['model']}_{exp['dataset']}_{self.base_hash(exp, seed)}.pt"

    def base_hash(self, exp, seed=None) -> str:
        key = {"role": "base", "model": exp["model"], "data": asdict(data_spec(exp, False)),
               "recipe": _recipe(exp["base"]), "seed": self.base_seed(exp, seed)}
        if exp["dataset_method"] is not None:  # the manipulated model: one per manipulation and seed
            key["manipulation"] = _manip_key(exp, exp["seed"] if seed is None else seed)
        return config_hash(key)

    @staticmethod
    def base_seed(exp, seed=None) -> int:
        """The base model's seed: base.seed, else the first seed (SalUn: one base for all
        runs), or the run's seed for corrective experiments (S_m is drawn per seed)."""
        if exp["base"]["seed"] is not None:
            return exp["base"]["seed"]
        return seed if exp["dataset_method"] is not None and seed is not None else exp["seed"]

    def base_model(self, exp, seed=None):
        """(model, meta, recipe) of the original model: the checkpoint, or trained and cached.
        Corrective experiments: the model trained on the manipulated set of run seed `seed`."""
        if exp["checkpoint"]:
            key = exp["checkpoint"]
            if key not in self.bases:
                sd, meta = engine.load_checkpoint(key)
                if meta.get("model") and canonical_model_name(meta["model"]) != canonical_model_name(exp["model"]):
                    raise UserError(f"{key} holds a {meta['model']} but the experiment says model "
                                    f"'{exp['model']}': set \"model\"")
                model = get_model(exp["model"], self.data(exp, exp["seed"], False).num_classes).to(self.device)
                engine.load_weights(model, sd, key)
                recipe = ({"train": meta["train"], "batch_size": meta.get("batch_size", 256),
                           "augment": meta.get("augment", True)} if isinstance(meta.get("train"), dict)
                          else _recipe(exp["base"]))
                self.bases[key] = (model.eval(), meta, recipe)
            return self.bases[key]
        path = self.base_path(exp, seed)
        key = str(path)
        if key not in self.bases:
            recipe = _recipe(exp["base"])
            seed = exp["seed"] if seed is None else seed
            if path.is_file():
                sd, meta = engine.load_checkpoint(path)
                model = get_model(exp["model"], meta["num_classes"]).to(self.device)
                engine.load_weights(model, sd, path)
                print(f"base model: {path} (cached, test acc {meta.get('test_acc', float('nan')):.2f}%)")
            else:
                data = self.data(exp, seed, False)
                manip = self.manipulation(exp, seed)
                extra = {"role": "base"}
                if manip is not None:
                    extra.update(manipulation=_manip_key(exp, seed), manip_digest=manip.digest())
                    write_index_json(path.with_name(path.stem + "_manip.json"), manip.manip_idx,
                                     dataset=exp["dataset"], split="train", dataset_method=manip.kind)
                print(f"training the base model -> {path}")
                model, meta = methods.train_from_scratch(
                    exp["model"], data, recipe, device=self.device, seed=self.base_seed(exp, seed), ckpt_path=path,
                    eval_batch_size=exp["eval_batch_size"], amp=self.amp, extra_meta=extra,
                    loader_overrides=self.overrides(exp, seed) or None)
                print(f"base model: test acc {meta['test_acc']:.2f}%")
            self.bases[key] = (model.eval(), meta, recipe)
        return self.bases[key]

    def setup(self, exp, data, seed, recipe, mask=None, cache_path=None) -> methods.Setup:
        return methods.Setup(
            data=data, model_name=exp["model"], device=self.device, seed=seed, epochs=exp["epochs"],
            steps=exp["steps"], lr=exp["lr"], batch_size=exp["batch_size"], optimizer=exp["optimizer"],
            momentum=exp["momentum"], weight_decay=exp["weight_decay"], schedule=exp["schedule"],
            warmup=exp["warmup"], amp=self.amp, augment=exp["augment"], mask=mask,
            params=dict(exp["params"]), base_recipe=recipe, cache_path=cache_path,
            eval_batch_size=exp["eval_batch_size"], loader_overrides=self.overrides(exp, seed))

    def retrain_path(self, exp, data, seed, recipe) -> Path:
        key = {"role": "retrain", "model": exp["model"], "data": asdict(data_spec(exp, False)),
               "recipe": recipe, "seed": seed, "forget": _digest(data.forget_idx),
               "n_forget": len(data.forget_idx)}
        if exp["dataset_method"] is not None:  # the retain set still holds S_m \ S_f, manipulated
            key["manipulation"] = _manip_key(exp, seed)
        h = config_hash(key)
        return checkpoint_dir() / "retrain" / f"{exp['model']}_{exp['dataset']}_{h}.pt"

    def reference(self, exp, data, seed, recipe) -> tuple[dict, torch.nn.Module | None]:
        """Metrics of the retrain reference for this forget set and seed (trained once, cached)."""
        path = self.retrain_path(exp, data, seed, recipe)
        key = f"{path}|{self.eval_key(exp)}"
        if key in self.references:
            return self.references[key], None
        s = self.setup(exp, data, seed, recipe, cache_path=path)
        s.params = {"k": -1}
        if not path.is_file():
            print(f"training the retrain reference (seed {seed}) -> {path}")
            write_index_json(path.with_name(path.stem + "_forget.json"), data.forget_idx,
                             dataset=exp["dataset"], split="train")
        with MX.timer(self.device) as t:
            model, meta = methods.retrain_from_scratch(s)
        seconds = meta.get("train_seconds_this_process") if meta.get("cached") else t.seconds
        result = self.evaluate(model, exp, data, seed)
        result.update({"time_s": seconds, "cached": bool(meta.get("cached")), "checkpoint": str(path)})
        self.references[key] = result
        return result, model

    @staticmethod
    def eval_key(exp) -> str:
        return json.dumps([exp[k] for k in ("test_subset", "mia_cap", "mia_attacks", "rf_mia")])

    # --- evaluation ----------------------------------------------------------------
    def evaluate(self, model, exp, data: PreparedData, seed: int | None = None) -> dict:
        mk = lambda split, idx: make_loader(data, split, idx, model_name=exp["model"],  # noqa: E731
                                            batch_size=exp["eval_batch_size"], device=self.device)
        cf = exp["class_to_forget"]
        test_idx = test_indices_without_class(data.test, cf)
        if exp["test_subset"]:
            pick = balanced_subset(data.test.y[test_idx], min(exp["test_subset"], len(test_idx)), exp["split_seed"])
            test_idx = test_idx[pick]
        if exp["dataset_method"] is not None:  # Acc_corr / Acc_retain / ASR (no UA/MIA: see README)
            return corrective.evaluate(model, data, self.manipulation(exp, exp["seed"] if seed is None else seed),
                                       model_name=exp["model"], batch_size=exp["eval_batch_size"],
                                       device=self.device, amp=self.amp, test_idx=test_idx)
        val_idx = data.val_idx if cf is None else data.val_idx[data.train.y[data.val_idx] != cf]
        lf, yf = engine.predict(model, mk("train", data.forget_idx), self.amp)
        lr_, yr = engine.predict(model, mk("train", data.retain_idx), self.amp)
        lt, yt = engine.predict(model, mk("test", test_idx), self.amp)
        out = {"UA": MX.unlearning_accuracy(lf, yf), "RA": MX.accuracy(lr_, yr), "TA": MX.accuracy(lt, yt)}
        if len(val_idx):
            lv, yv = engine.predict(model, mk("train", val_idx), self.amp)
            out["VA"] = MX.accuracy(lv, yv)
        if cf is not None:
            vf = data.val_idx[data.train.y[data.val_idx] == cf]
            if len(vf):
                out["VA_forget"] = MX.accuracy(*engine.predict(model, mk("train", vf), self.amp))
        mia = MX.svc_mia(lr_, yr, lt, yt, lf, yf, attacks=exp["mia_attacks"], max_shadow=exp["mia_cap"])
        out["MIA"] = mia["confidence"]
        out.update({f"MIA_{k}": v for k, v in mia.items() if k != "confidence"})
        if exp["rf_mia"] and len(val_idx):
            rf = MX.rf_loss_mia(MX.per_sample_loss(lr_, yr), MX.per_sample_loss(lv, yv),
                                MX.per_sample_loss(lf, yf), MX.per_sample_loss(lt, yt),
                                max_samples=exp["mia_cap"] or 5000)
            out["MIA_RF"], out["MIA_RF_auc"] = rf["acc"], rf["auc"]
        return out

    # --- one run -------------------------------------------------------------------
    def run(self, exp: dict, index: int, seed: int, run_idx: int, source: str) -> dict:
        data = self.data(exp, seed)
        base, base_meta, recipe = self.base_model(exp, seed)
        record = {"experiment": index, "name": exp["tag"], "method": exp["method_name"], "seed": seed,
                  "forget": forget_label(exp), "n_forget": len(data.forget_idx),
                  "n_retain": len(data.retain_idx), "forget_digest": _digest(data.forget_idx)}
        is_reference = exp["method_name"] == "retrain" and exp["params"].get("k", -1) == -1 and not exp["use_mask"]
        ref = None
        if exp["avg_gap"] or is_reference:
            ref, ref_model = self.reference(exp, data, seed, recipe)
        if is_reference:
            result = {k: v for k, v in ref.items() if k not in ("checkpoint",)}
            model = ref_model
            if model is None and exp["save_model"]:
                sd, _ = engine.load_checkpoint(ref["checkpoint"])
                model = get_model(exp["model"], data.num_classes).to(self.device)
                engine.load_weights(model, sd, ref["checkpoint"])
            record["reference_checkpoint"] = ref["checkpoint"]
        else:
            model = copy.deepcopy(base)
            mask_seconds = 0.0
            with MX.timer(self.device) as t:
                mask = None
                if exp["use_mask"]:
                    s0 = self.setup(exp, data, seed, recipe)
                    with MX.timer(self.device) as tm:
                        mask = (methods.load_mask(exp["load_mask"], model, self.device) if exp["load_mask"]
                                else methods.saliency_mask(model, s0, exp["mask_thr"]))
                    mask_seconds = tm.seconds
                s = self.setup(exp, data, seed, recipe, mask=mask)
                model = methods.unlearn(model, exp["method"], s)
            with MX.timer(self.device) as te:
                result = self.evaluate(model, exp, data, seed)
            result["time_s"], result["eval_s"] = t.seconds, te.seconds
            if mask is not None:
                result["mask_s"] = mask_seconds
                result["mask_fraction"] = methods.mask_fraction(mask)
                if exp["save_mask"] and not exp["load_mask"]:
                    p = methods.save_mask(self.out_dir / "masks" / f"{_safe(exp['tag'])}_seed{seed}.pt", mask,
                                          threshold=exp["mask_thr"], forget_digest=record["forget_digest"])
                    record["mask_path"] = str(p)
        if ref is not None and exp["dataset_method"] is None:  # corrective: no UA/MIA, no gap
            record["ref"] = {k: ref[k] for k in ("UA", "RA", "TA", "MIA", "VA", "VA_forget") if k in ref}
            result["gap"] = MX.avg_gap(result, ref)
        record.update(result)
        record["base"] = {"checkpoint": exp["checkpoint"] or str(self.base_path(exp, seed)),
                          "test_acc": base_meta.get("test_acc")}
        if exp["dataset_method"] is not None:  # the manipulated model before unlearning
            record["base"]["metrics"] = self.manipulated_metrics(exp, seed, base, data)
            record["n_manip"] = exp["forget_set_size"]
            record["deletion_frac"] = len(data.forget_idx) / exp["forget_set_size"]
        record["config"] = {k: v for k, v in exp.items() if k not in ("tag",)}
        record["device"], record["torch"] = str(self.device), torch.__version__
        if exp["save_model"] and model is not None:
            path = self.out_dir / "models" / _safe(exp["tag"]) / f"seed{seed}.pt"
            meta = {"model": exp["model"], "num_classes": data.num_classes, "dataset": exp["dataset"],
                    "data": asdict(data_spec(exp, True)), "method": exp["method_name"], "seed": seed,
                    "class_to_forget": exp["class_to_forget"], "forget_digest": record["forget_digest"],
                    "role": "unlearned"}
            engine.save_checkpoint(path, model, meta)
            record["model_path"] = str(path)
            self.save_base_copy(exp, base, data, seed)
        return record

    def manipulated_metrics(self, exp, seed, base, data) -> dict:
        """The corrective metrics of the manipulated model (once per base and evaluation);
        acc_Sf is left out: it depends on the run's S_f."""
        key = f"{self.base_path(exp, seed)}|{exp['test_subset']}"
        if key not in self.base_metrics:
            out = self.evaluate(base, exp, data, seed)
            self.base_metrics[key] = {k: v for k, v in out.items() if k != "acc_Sf"}
        return self.base_metrics[key]

    def save_base_copy(self, exp, base, data, seed=None):
        path = self.out_dir / "models" / "base" / f"seed{self.base_seed(exp, seed)}.pt"
        if not path.exists():
            engine.save_checkpoint(path, base, {"model": exp["model"], "num_classes": data.num_classes,
                                                "dataset": exp["dataset"], "data": asdict(data_spec(exp, False)),
                                                "method": "base", "class_to_forget": None, "role": "base"})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


def forget_label(exp: dict) -> str:
    if exp["class_to_forget"] is not None:
        return f"class {exp['class_to_forget']}"
    if exp["unlearning_rate"] is not None:
        return f"{100 * exp['unlearning_rate']:g}% random"
    if exp["dataset_method"] is not None:
        return f"{exp['dataset_method']} |S_m|={exp['forget_set_size']} |S_f|={exp['deletion_size']}"
    return f"file {Path(exp['idxs_to_forget']).name}"


def plan_lines(exps: list[dict], runner_paths) -> list[str]:
    lines = []
    for i, exp in enumerate(exps, 1):
        seeds = list(range(exp["seed"], exp["seed"] + exp["nexp"]))
        if exp["checkpoint"]:
            base = exp["checkpoint"]
        else:
            p = runner_paths(exp)
            base = f"{p} ({'cached' if p.is_file() else 'to train'})"
        subset = f" subset {exp['subset']}" if exp["subset"] else ""
        lines.append(f"{i:>3}. {exp['tag']}: {exp['method_name']} on {exp['model']}/{exp['dataset']}{subset}, "
                     f"forget {forget_label(exp)}, lr {exp['lr']:g}, "
                     + (f"steps {exp['steps']}, " if exp["steps"] else f"epochs {exp['epochs']}, ") +
                     f"mask {exp['mask_thr'] if exp['use_mask'] else 'no'}, seeds {seeds}; base {base}")
    return lines


CORRECTIVE_DATA_KEYS = ("dataset_method", "forget_set_size", "deletion_size", "patch_size")


def prepare_shared_models(runner: Runner, jobs: list[tuple[int, dict, int]]) -> None:
    """Under torchrun, before any run: every base model and retrain reference the runs need
    is trained (and cached) by exactly one rank, the others wait; the runs then only read
    these caches, so no two ranks train or write the same file."""
    # corrective experiments (dataset_method) have one base model per seed, the others one
    base_args = [(exp, exp["seed"] + r) if exp.get("dataset_method") else (exp,) for _, exp, r in jobs]
    bases = [a for a in base_args if not a[0]["checkpoint"]]
    for n in distributed.share_out([str(runner.base_path(*a)) for a in bases]):
        runner.base_model(*bases[n])
    distributed.wait_all()
    refs, keys = [], []
    for (_, exp, r), args in zip(jobs, base_args):
        seed = exp["seed"] + r
        is_reference = exp["method_name"] == "retrain" and exp["params"].get("k", -1) == -1 and not exp["use_mask"]
        if exp["avg_gap"] or is_reference:  # as in Runner.run
            recipe = runner.base_model(*args)[2]
            refs.append((exp, seed, recipe))
            # what fixes the retain set, hence the cache file (a finer key than the file name
            # at worst trains a model twice; atomic writes make that harmless)
            data = [asdict(data_spec(exp)), {k: exp.get(k) for k in CORRECTIVE_DATA_KEYS}]
            keys.append(json.dumps([exp["model"], data, seed, recipe], sort_keys=True, default=str))
    for n in distributed.share_out(keys):
        exp, seed, recipe = refs[n]
        runner.reference(exp, runner.data(exp, seed), seed, recipe)
    distributed.wait_all()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print(methods.method_help())
        return 0
    raw, stem, base_dir = experiments_from_args(args)
    exps = []
    for where, r in raw:
        exp = validate(r, where, base_dir)
        if args.nexp is not None:
            if args.nexp <= 0:
                raise UserError("--nexp must be positive")
            exp["nexp"] = args.nexp
        exps.append(exp)
    out_dir = Path(args.out) if args.out else results_dir() / "main" / stem
    probe = Runner(args, torch.device("cpu"), out_dir, None)
    n_runs = sum(e["nexp"] for e in exps)
    print(f"{len(exps)} experiment(s), {n_runs} run(s) -> {out_dir}")
    for line in plan_lines(exps, probe.base_path):
        print(line)
    if args.dry_run:
        print("dry run: everything validated, nothing run")
        return 0
    device = setup_runtime(args)
    runner = Runner(args, device, out_dir, args.amp)
    runs_file = out_dir / "runs.jsonl"
    started = distributed.gather_all(time.strftime("%Y%m%d_%H%M%S"))[0]
    split = distributed.global_world_size() > 1  # torchrun: the runs are shared out among ranks
    if split:  # this rank's records as it goes; rank 0 merges them into runs.jsonl at the end
        runs_file = out_dir / f"runs.{started}.rank{distributed.global_rank()}.jsonl"
    t0 = time.perf_counter()
    jobs = [(i, exp, r) for i, exp in enumerate(exps, 1) for r in range(exp["nexp"])]
    records = []
    with distributed.independent():  # each rank trains its own models, no DDP
        if split:
            prepare_shared_models(runner, jobs)
        for j in distributed.share_out(range(len(jobs))):
            i, exp, r = jobs[j]
            seed = exp["seed"] + r
            print(f"\n=== experiment {i}/{len(exps)} '{exp['tag']}', seed {seed} ===")
            logger = RunLogger(not args.no_log, args.wandb_project,
                               f"{exp['method_name']}_run_{'M_' if exp['use_mask'] else ''}{started}_{r}",
                               {**{k: v for k, v in exp.items()}, "runid": started, "runidx": r, "source": stem})
            record = runner.run(exp, i, seed, r, stem)
            record["started"] = started
            append_jsonl(runs_file, record)
            logger.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
            logger.finish()
            records.append((j, record))
            print("  " + ", ".join(f"{k}={record[k]:.2f}" for k in METRICS if isinstance(record.get(k), float)))
    records = distributed.merge_in_order(records)  # every run, in the single-process order
    if split:
        if distributed.global_rank() != 0:
            return 0
        for record in records:
            append_jsonl(out_dir / "runs.jsonl", record)
        for part in out_dir.glob(f"runs.{started}.rank*.jsonl"):
            part.unlink()
        runs_file = out_dir / "runs.jsonl"
    wall = time.perf_counter() - t0
    rows = summary_rows(records)
    md = write_tables(rows, out_dir / "summary")
    print(f"\n{stem}: {len(records)} run(s) in {wall / 60:.1f} min on {device}; mean ± std over seeds "
          f"(results: {runs_file})\n")
    print(md)
    return 0


def summary_rows(records: list[dict]) -> list[dict]:
    present = [m for m in METRICS if any(isinstance(r.get(m), (int, float)) for r in records)]
    rows = summarize(records, ["experiment", "name", "forget"], present)
    out = []
    for row in rows:
        new = {"experiment": row["experiment"], "method": row["name"], "forget": row["forget"], "n": row["n"]}
        for m in present:
            new[HEADERS[m]] = row.get(m, "")
        out.append(new)
    return out


if __name__ == "__main__":
    run_main(main)

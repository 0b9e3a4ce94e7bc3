"""Training a classifier from a data description: the recipe shared by train.py, the base
and `retrain` models of main.py, and dfr_step_1.py. The loop itself is `engine.fit`.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import distributed
import engine
from constants import UserError, canonical_dataset_name, checkpoint_dir
from datasets import (Augment, BatchLoader, Split, balanced_subset, dataset_info, forget_indices,
                      load_split, stratified_split)
from models import canonical_model_name, expects_normalized, get_model
from storage import exclusive
from views import TrainingView


@dataclass
class DataSpec:
    dataset: str = "cifar10"
    subset: int | None = None  # class-balanced subset of the training split
    val_frac: float = 0.1  # stratified validation split, held out of training
    split_seed: int = 0  # seeds subset and validation split (shared by all runs)
    cf: int | None = None
    unlr: float | None = None
    itf: str | None = None
    download: bool = False


@dataclass
class PreparedData:
    train: Split
    test: Split
    retain_idx: torch.Tensor  # what training uses: candidates minus forget
    val_idx: torch.Tensor
    forget_idx: torch.Tensor
    spec: DataSpec

    @property
    def num_classes(self) -> int:
        return dataset_info(self.train).num_classes


def prepare_data(spec: DataSpec, seed: int = 0) -> PreparedData:
    """Load the splits and build the index sets. Every index refers to the full training
    split, also under `subset`. The forget set is drawn with `seed` (random forgetting
    differs per run); subset and validation split with `split_seed` (shared)."""
    train = load_split(spec.dataset, True, download=spec.download)
    test = load_split(spec.dataset, False, download=spec.download)
    pool = balanced_subset(train.y, spec.subset, spec.split_seed) if spec.subset else None
    candidates, val_idx = stratified_split(train.y, spec.val_frac, spec.split_seed, candidates=pool)
    forget = forget_indices(train.y, cf=spec.cf, unlr=spec.unlr, itf=spec.itf, seed=seed,
                            candidates=candidates)
    if spec.itf is not None and spec.subset:
        forget = _forget_in_subset(forget, pool, candidates, spec)
    retain = candidates[~torch.isin(candidates, forget)]
    return PreparedData(train, test, retain, val_idx, forget, spec)


def _forget_in_subset(forget: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor,
                      spec: DataSpec) -> torch.Tensor:
    """An index file's forget set under `subset`: every index must be in the subset's draw
    (else the forget set would silently shrink, to nothing for a file of another draw); those
    in the draw's validation split were never trained on and are left out, with a note."""
    outside = forget[~torch.isin(forget, pool)]
    if len(outside):
        raise UserError(f"index file {spec.itf} has {len(outside)} of its {len(forget)} indices "
                        f"outside the subset trained on (subset {spec.subset}, split seed "
                        f"{spec.split_seed}; e.g. {int(outside[0])}): use indices of that draw "
                        "(the _forget.json written beside a model trained on it) or drop the subset")
    kept = forget[torch.isin(forget, candidates)]
    if len(kept) < len(forget):
        print(f"note: {len(forget) - len(kept)} indices of {spec.itf} are in the validation split "
              "(never trained on) and are not forgotten")
    return kept


def test_indices_without_class(test: Split, cf: int | None) -> torch.Tensor:
    idx = torch.arange(len(test))
    return idx if cf is None else idx[test.y != cf]


def make_loader(data: PreparedData, split: str, indices, *, model_name: str, batch_size: int,
                device, train: bool = False, seed: int = 0, augment: Augment | None = None,
                view: TrainingView | None = None, **kwargs) -> BatchLoader:
    """A loader over the train or test split (through `view` if given); `train=True`
    shuffles and augments (crop + flip unless `augment` says otherwise)."""
    source = data.train if split == "train" else data.test
    return BatchLoader(source, indices, batch_size=batch_size, shuffle=train, seed=seed,
                       device=device, augment=(augment or Augment()) if train else None,
                       normalize=expects_normalized(model_name), view=view, **kwargs)


# what a recipe's cache key held before TrainConfig carried the batch size and augmentation
_KEYED = ("epochs", "steps", "lr", "optimizer", "momentum", "weight_decay", "schedule", "warmup")


def recipe_key(cfg: engine.TrainConfig) -> dict:
    """The part of a cached model's key that says how it was trained. The layout of earlier
    versions is kept, so their cached models stay found; any other recipe field that differs
    from its default is added, so a changed setting never reuses a stale model."""
    defaults = engine.TrainConfig()
    more = {f: getattr(cfg, f) for f in engine.TrainConfig.recipe_fields()
            if f not in (*_KEYED, "milestones", "batch_size", "augment")
            and getattr(cfg, f) != getattr(defaults, f)}
    key = {"train": {**{f: getattr(cfg, f) for f in _KEYED}, "milestones": list(cfg.milestones)},
           "batch_size": cfg.batch_size, "augment": cfg.augment}
    if more:
        key["more"] = more
    return key


def config_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def build_model(model_name: str, num_classes: int, device, seed: int):
    torch.manual_seed(seed)  # the initialisation is part of the seeded run
    return get_model(model_name, num_classes).to(device)


def train_classifier(model_name: str, data: PreparedData, cfg: engine.TrainConfig, *,
                     device, seed: int, ckpt_path: Path, batch_size: int | None = None,
                     extra_meta: dict | None = None, augment: Callable | None = None,
                     eval_batch_size: int = 1024, logger=None, resume: bool | Path = True,
                     on_epoch_end=None, view: TrainingView | None = None,
                     transform: Callable | None = None, loss_fn=None, finish: Callable | None = None):
    """Train from scratch on `data.retain_idx`, evaluate each epoch on val/test, and save
    `ckpt_path` (state_dict + plain metadata). Resumes from `<ckpt>.resume-<hash>.pt`, or from
    the file `resume` names (a model of one run, written to a temporary checkpoint), or not at
    all (`resume=False`).
    The batch size and augmentation are the config's unless given (`augment`: a whole-batch
    augmentation such as the orthogonal-projection recipe's strong one). `view` is the training
    set as trained on (views.py), `transform` a float transform of each batch before
    augmentation (the orthogonal projection).
    `loss_fn` (default cross-entropy) is passed to engine.fit, e.g. a CutMix loss;
    `on_epoch_end(epoch, record, model)` runs after every epoch (e.g. per-epoch checkpoints).
    `finish(model, meta, history)` completes the meta (final metrics) and writes what belongs
    with the checkpoint (a results file); the checkpoint is written after it, last, so it
    exists only when everything that belongs to it does (one commit point)."""
    batch_size = batch_size or cfg.batch_size
    augment = augment or cfg.augmentation()
    num_classes = data.num_classes
    model = build_model(model_name, num_classes, device, seed)
    loader = make_loader(data, "train", data.retain_idx, model_name=model_name,
                         batch_size=batch_size, device=device, train=True, seed=seed,
                         augment=augment, shard=distributed.shard(), view=view, transform=transform)
    evals = {"test_acc": make_loader(data, "test", test_indices_without_class(data.test, data.spec.cf),
                                      model_name=model_name, batch_size=eval_batch_size, device=device)}
    if len(data.val_idx):
        evals["val_acc"] = make_loader(data, "train", data.val_idx, model_name=model_name,
                                       batch_size=eval_batch_size, device=device)

    def evaluate(m, epoch):
        out = {k: engine.accuracy_on(m, ld, cfg.amp) for k, ld in evals.items()}
        if logger is not None:
            logger.log({"epoch": epoch, **out})
        return out

    meta = {"model": canonical_model_name(model_name), "num_classes": num_classes,
            "dataset": canonical_dataset_name(data.spec.dataset), "seed": seed,
            "batch_size": batch_size, "data": asdict(data.spec), "train": cfg.plain(),
            **(extra_meta or {})}
    meta["config_hash"] = config_hash(meta)
    resume_path = (Path(f"{ckpt_path}.resume-{meta['config_hash']}.pt") if resume is True
                   else Path(resume) if resume else None)
    t0 = time.perf_counter()
    history = engine.fit(model, loader, cfg, loss_fn=loss_fn,
                         evaluate=evaluate, resume_path=resume_path,
                         on_epoch_end=None if on_epoch_end is None else (
                             lambda epoch, record: on_epoch_end(epoch, record, model)),
                         desc=f"{meta['model']}/{meta['dataset']}")
    seconds = time.perf_counter() - t0
    final = history[-1] if history else {}
    meta.update({"epochs_done": final.get("epoch", 0), "test_acc": final.get("test_acc"),
                 "val_acc": final.get("val_acc"), "train_seconds_this_process": seconds,
                 "n_train": len(data.retain_idx), "n_forget": len(data.forget_idx),
                 "world_size": distributed.world_size()})
    if finish is not None:
        finish(model, meta, history)
    if distributed.is_main():
        engine.save_checkpoint(ckpt_path, model, meta)
        if resume_path is not None and resume_path.exists():
            resume_path.unlink()  # finished: the checkpoint is the record now
    distributed.barrier()
    return model, meta, history


def cache_path(role: str, key: dict, *, model_name: str, dataset: str) -> Path:
    """Where the model `key` describes lives: CHECKPOINT_DIR/<role>/<model>_<dataset>_<hash>.pt."""
    return checkpoint_dir() / role / f"{model_name}_{dataset}_{config_hash(key)}.pt"


def cached_model(role: str, key: dict, *, model_name: str, dataset: str, device,
                 train: Callable[[Path, dict], tuple[torch.nn.Module, dict]]):
    """The one owner of a trained model kept for reuse (base models, retrain references):
    its path (`cache_path`), the lookup, the training when it is missing and the reuse.
    `train(path, extra_meta)` trains and writes `path` (engine.save_checkpoint) with
    `extra_meta` in its meta: the key, which every later lookup checks (`_load_cached`).
    Returns (model in eval mode, meta with `cached`, path).

    Several processes (jobs of a sweep, two launches of one list) may want the same model at
    once: the training runs under the file lock of `path`, after a second look, so it is
    trained by one of them and written by that one alone; the others wait and load it."""
    path = cache_path(role, key, model_name=model_name, dataset=dataset)
    if not path.is_file():
        with exclusive(path):
            if not path.is_file():
                model, meta = train(path, {"cache_key": _plain(key)})
                return model.eval(), {**meta, "cached": False}, path
    model, meta = _load_cached(path, key, model_name, device)
    return model, {**meta, "cached": True}, path


def _plain(key: dict) -> dict:
    return json.loads(json.dumps(key, sort_keys=True, default=str))


def _load_cached(path: Path, key: dict, model_name: str, device):
    """A cached model, verified: readable, fitting its architecture, finite, made for `key`."""
    try:
        state_dict, meta = engine.load_checkpoint(path)
        if type(meta.get("num_classes")) is not int:
            raise UserError("its meta records no number of classes")
        model = get_model(model_name, meta["num_classes"]).to(device)
        engine.load_weights(model, state_dict, path)
        engine.check_finite(model, "its weights")
    except UserError as e:
        raise UserError(f"cached model {path} is damaged ({e}); delete it to train it again") from None
    why = _key_mismatch(meta, key, model_name)
    if why:
        raise UserError(f"cached model {path} was not made for this lookup ({why}): it was replaced "
                        "or copied there; delete it to train the right one")
    return model.eval(), meta


def _key_mismatch(meta: dict, key: dict, model_name: str) -> str | None:
    """What differs between the key a cached model records and the one it is looked up with.
    Models cached before the key was recorded are checked on what their meta always held:
    architecture, seed and recipe."""
    want = _plain(key)
    if "cache_key" in meta:
        got = meta["cache_key"] if isinstance(meta["cache_key"], dict) else {}
    else:
        recipe = want.get("recipe", {}).get("train", {})
        got = {"model": canonical_model_name(str(meta.get("model"))), "seed": meta.get("seed"),
               "recipe": {f: (meta.get("train") or {}).get(f) for f in recipe}}
        want = {"model": canonical_model_name(model_name), "seed": want.get("seed"),
                "recipe": recipe}
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if not differ:
        return None
    k = differ[0]
    return f"{k}: recorded {json.dumps(got.get(k))[:80]}, looked up {json.dumps(want.get(k))[:80]}"

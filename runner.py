"""Running validated experiments: the shared models (base, retrain references) trained once
and cached, one run per (experiment, seed), and the result files.

`Runner.run(exp, index, seed)` returns the run's record: the method's metrics (the forget
set's own: SalUn's UA/RA/TA/MIA, or the corrective paper's), Avg. Gap to the retrain
reference where it is defined, timings, the experiment's config and the git commit.
`run_list` writes one JSON line per run to runs.jsonl, then summary.csv / summary.md (mean
± std over seeds). A run is recorded once: running the same list again skips the runs
already recorded and does only the rest. A run whose loss or weights become non-finite is
recorded as diverged (null metrics, `diverged` says where) and the list goes on.

Several processes may work on one list at once (the jobs of a launch, launcher.py; a second
command on the same list): a run is run under its lock (`run_lock`) by one of them, and a
job writes its record to jobs/<hash>.json, which `merge_records` puts into runs.jsonl in the
list's order; shared models are trained under their cache's lock (training.py).

A run interrupted mid-way (killed, preempted, timed out) resumes from its last epoch: its
training state is kept in jobs/<hash>.resume.pt (engine.fit) and its saliency mask in
jobs/<hash>.mask.pt until its record is written.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import torch

import engine
import metrics as MX
import unlearning
from cli import RunLogger
from datasets import balanced_subset, write_index_json
from experiments import Experiment
from methods import recipe_from_meta, retrain_from_scratch, train_from_scratch
from models import get_model
from reporting import read_jsonl, summarize, to_json, write_jsonl, write_tables
from saliency import load_mask, mask_fraction, save_mask, saliency_mask
from storage import exclusive, set_aside_torn_tail
from training import PreparedData, cache_path, cached_model, prepare_data, recipe_key

METRICS = ["UA", "RA", "TA", "MIA", "MIA_RF", "gap", "Acc_corr", "Acc_retain", "ASR", "acc_Sm",
           "acc_Sf", "time_s"]
HEADERS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA", "MIA_RF": "MIA-RF",
           "gap": "Avg. Gap", "Acc_corr": "Acc_corr", "Acc_retain": "Acc_retain", "ASR": "ASR",
           "acc_Sm": "acc S_m", "acc_Sf": "acc S_f", "time_s": "time (s)"}


def digest(idx: torch.Tensor) -> str:
    return hashlib.sha1(idx.cpu().numpy().tobytes()).hexdigest()[:12]


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)


class Runner:
    def __init__(self, device, out_dir: Path, amp):
        self.device, self.out_dir, self.amp = device, out_dir, amp
        self.memo: dict = {}  # data splits, manipulations, metrics: computed once per key
        self.bases: dict[str, tuple] = {}  # key -> (model, meta, recipe)
        self.references: dict[str, dict] = {}  # retrain cache path -> metrics

    def cached(self, key, make):
        key = json.dumps(key, sort_keys=True, default=str)
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    # --- data and models -----------------------------------------------------------
    def split(self, spec, seed: int | None) -> PreparedData:
        """prepare_data once per data description (and seed, for a per-seed draw)."""
        return self.cached(["split", dataclasses.asdict(spec), seed],
                           lambda: prepare_data(spec, seed=0 if seed is None else seed))

    def data(self, exp: Experiment, seed: int) -> PreparedData:
        return exp.forget.prepare(self, exp, seed)

    def base_seed(self, exp: Experiment, seed: int | None = None) -> int:
        """base.seed, else the first seed (SalUn: one base for all runs), or the run's seed
        where the forget set trains one base model per seed (manipulated data)."""
        if exp.base_seed is not None:
            return exp.base_seed
        return seed if exp.forget.seed_per_base and seed is not None else exp.seed

    def base_key(self, exp: Experiment, seed: int | None = None) -> dict:
        key = {"role": "base", "model": exp.model,
               "data": dataclasses.asdict(exp.forget.data_spec(exp, with_forget=False)),
               "recipe": recipe_key(exp.base), "seed": self.base_seed(exp, seed)}
        key.update(exp.forget.cache_key(exp, exp.seed if seed is None else seed))
        return key

    def base_path(self, exp: Experiment, seed: int | None = None) -> Path:
        if exp.checkpoint:
            return Path(exp.checkpoint)
        return cache_path("base", self.base_key(exp, seed), model_name=exp.model, dataset=exp.dataset)

    def base_model(self, exp: Experiment, seed: int):
        """(model, meta, recipe) of the original model: the checkpoint, or trained once and
        cached (for manipulated data: the model trained on the run seed's manipulation)."""
        if exp.checkpoint:
            key = exp.checkpoint
            if key not in self.bases:
                sd, meta = engine.load_checkpoint(key, dataset=exp.dataset, model=exp.model)
                model = get_model(exp.model, self.data(exp, exp.seed).num_classes).to(self.device)
                engine.load_weights(model, sd, key)
                recipe = recipe_from_meta(meta) if isinstance(meta.get("train"), dict) else exp.base
                self.bases[key] = (model.eval(), meta, recipe)
            return self.bases[key]
        key = str(self.base_path(exp, seed))
        if key not in self.bases:
            recipe = dataclasses.replace(exp.base, amp=self.amp)
            model, meta, path = cached_model(
                "base", self.base_key(exp, seed), model_name=exp.model, dataset=exp.dataset,
                device=self.device,
                train=lambda path, extra: self._train_base(exp, seed, recipe, path, extra))
            if meta["cached"]:
                acc = meta.get("test_acc")
                print(f"base model: {path} (cached, test acc "
                      f"{f'{acc:.2f}%' if isinstance(acc, float) else 'unknown'})")
            self.bases[key] = (model, meta, exp.base)
        return self.bases[key]

    def _train_base(self, exp: Experiment, seed: int, recipe, path: Path, extra: dict):
        data = self.split(exp.forget.data_spec(exp, with_forget=False), None)
        extra = {"role": "base", **exp.forget.base_meta(self, exp, seed, path), **extra}
        print(f"training the base model -> {path}")
        model, meta = train_from_scratch(exp.model, data, recipe, device=self.device,
                                         seed=self.base_seed(exp, seed), ckpt_path=path,
                                         eval_batch_size=exp.eval_batch_size,
                                         view=exp.forget.view(self, exp, seed), extra_meta=extra)
        print(f"base model: test acc {meta['test_acc']:.2f}%")
        return model, meta

    def setup(self, exp: Experiment, data, seed, recipe, mask=None, cache_key=None,
              resume_path=None) -> unlearning.Setup:
        return unlearning.Setup(
            data=data, model_name=exp.model, device=self.device, seed=seed,
            train=dataclasses.replace(exp.train, amp=self.amp), mask=mask, params=dict(exp.params),
            base=dataclasses.replace(recipe, amp=self.amp), cache_key=cache_key,
            view=exp.forget.view(self, exp, seed), eval_batch_size=exp.eval_batch_size,
            resume_path=resume_path)

    def retrain_key(self, exp: Experiment, data, seed, recipe) -> dict:
        key = {"role": "retrain", "model": exp.model,
               "data": dataclasses.asdict(exp.forget.data_spec(exp, with_forget=False)),
               "recipe": recipe_key(recipe), "seed": seed, "forget": digest(data.forget_idx),
               "n_forget": len(data.forget_idx)}
        key.update(exp.forget.cache_key(exp, seed))  # the retain set may keep manipulated samples
        return key

    def reference_path(self, exp: Experiment, data, seed, recipe) -> Path:
        return cache_path("retrain", self.retrain_key(exp, data, seed, recipe), model_name=exp.model,
                          dataset=exp.dataset)

    def reference_model(self, exp: Experiment, data, seed, recipe) -> tuple[torch.nn.Module, dict, float]:
        """(model, meta, training seconds) of the retrain reference for this forget set and
        seed: trained once, under its cache's lock, else loaded."""
        key = self.retrain_key(exp, data, seed, recipe)

        def announce(path: Path) -> None:
            print(f"training the retrain reference (seed {seed}) -> {path}")
            write_index_json(path.with_name(path.stem + "_forget.json"), data.forget_idx,
                             dataset=exp.dataset, split="train")
        s = self.setup(exp, data, seed, recipe, cache_key=key)
        s.params = {"k": -1}
        with MX.timer(self.device) as t:
            model, meta = retrain_from_scratch(s, before_training=announce)
        return model, meta, meta.get("train_seconds_this_process") if meta.get("cached") else t.seconds

    def reference(self, exp: Experiment, data, seed, recipe) -> tuple[dict, torch.nn.Module | None]:
        """Metrics of the retrain reference for this forget set and seed (trained once, cached)."""
        path = self.reference_path(exp, data, seed, recipe)
        memo = f"{path}|{json.dumps([exp.test_subset, exp.mia_cap, exp.mia_attacks, exp.rf_mia])}"
        if memo in self.references:
            return self.references[memo], None
        model, meta, seconds = self.reference_model(exp, data, seed, recipe)
        result = self.evaluate(model, exp, data, seed)
        result.update({"time_s": seconds, "cached": bool(meta.get("cached")), "checkpoint": str(path)})
        self.references[memo] = result
        return result, model

    # --- the models runs share -------------------------------------------------------
    def base_recipe(self, exp: Experiment, seed: int):
        """The recipe of the run's base model (as `base_model` returns it), without training it."""
        return self.base_model(exp, seed)[2] if exp.checkpoint else exp.base

    def shared_models(self, exp: Experiment, seed: int) -> list[tuple[str, Path]]:
        """(kind, cache path) of the cached models run (exp, seed) uses, which other runs may
        use too: its base model (unless a checkpoint is given) and its retrain reference."""
        out = [] if exp.checkpoint else [("base", self.base_path(exp, seed))]
        if exp.avg_gap or exp.is_reference:  # as in run()
            data = self.data(exp, seed)
            out.append(("reference", self.reference_path(exp, data, seed, self.base_recipe(exp, seed))))
        return out

    def build_shared(self, kind: str, exp: Experiment, seed: int) -> None:
        """Train (or find cached) one of `shared_models(exp, seed)`."""
        if kind == "base":
            self.base_model(exp, seed)
        else:
            self.reference_model(exp, self.data(exp, seed), seed, self.base_recipe(exp, seed))

    # --- evaluation ----------------------------------------------------------------
    def evaluate(self, model, exp: Experiment, data: PreparedData, seed: int) -> dict:
        test_idx = exp.forget.test_indices(data.test)
        if exp.test_subset:
            pick = balanced_subset(data.test.y[test_idx], min(exp.test_subset, len(test_idx)), exp.split_seed)
            test_idx = test_idx[pick]
        return exp.forget.evaluate(self, model, exp, data, seed, test_idx)

    # --- one run -------------------------------------------------------------------
    def run_or_diverge(self, exp: Experiment, index: int, seed: int) -> dict:
        """The run's record; a run that diverged (engine.Diverged, from training the base
        model, the reference or the unlearning) is a record too, with null metrics."""
        try:
            return {**self.run(exp, index, seed), "diverged": None}
        except engine.Diverged as e:
            return {"experiment": index, "name": exp.tag, "method": exp.method_name, "seed": seed,
                    "forget": exp.forget.label(), **{m: None for m in METRICS}, "diverged": str(e),
                    "config": exp.record(), "device": str(self.device), "torch": torch.__version__}

    def run(self, exp: Experiment, index: int, seed: int) -> dict:
        data = self.data(exp, seed)
        base, base_meta, recipe = self.base_model(exp, seed)
        record = {"experiment": index, "name": exp.tag, "method": exp.method_name, "seed": seed,
                  "forget": exp.forget.label(), "n_forget": len(data.forget_idx),
                  "n_retain": len(data.retain_idx), "forget_digest": digest(data.forget_idx)}
        ref = None
        if exp.avg_gap or exp.is_reference:
            ref, ref_model = self.reference(exp, data, seed, recipe)
        if exp.is_reference:
            result = {k: v for k, v in ref.items() if k != "checkpoint"}
            model = ref_model
            if model is None and exp.save_model:
                sd, _ = engine.load_checkpoint(ref["checkpoint"])
                model = get_model(exp.model, data.num_classes).to(self.device)
                engine.load_weights(model, sd, ref["checkpoint"])
            record["reference_checkpoint"] = ref["checkpoint"]
        else:
            model, result = self.unlearn(exp, data, seed, recipe, copy.deepcopy(base), record)
        if ref is not None and exp.forget.has_gap:
            record["ref"] = {k: ref[k] for k in ("UA", "RA", "TA", "MIA", "VA", "VA_forget") if k in ref}
            result["gap"] = MX.avg_gap(result, ref)
        record.update(result)
        record["base"] = {"checkpoint": str(self.base_path(exp, seed)), "test_acc": base_meta.get("test_acc"),
                          **exp.forget.base_facts(self, exp, seed, base, data)}
        record.update(exp.forget.run_facts(exp, data))
        record["config"] = exp.record()
        record["device"], record["torch"] = str(self.device), torch.__version__
        if exp.save_model and model is not None:
            self.save_models(exp, model, base, data, seed, record)
        return record

    def unlearn(self, exp: Experiment, data, seed, recipe, model, record) -> tuple:
        resume_path, mask_path = run_state(self.out_dir, run_id(exp.record(), seed))
        mask_seconds = 0.0
        with MX.timer(self.device) as t:
            mask = None
            if exp.use_mask:
                with MX.timer(self.device) as tm:
                    mask = (load_mask(exp.load_mask, model, self.device) if exp.load_mask else
                            self.saliency(exp, data, seed, recipe, model, mask_path))
                mask_seconds = tm.seconds
            setup = self.setup(exp, data, seed, recipe, mask=mask, resume_path=resume_path)
            model = unlearning.unlearn(model, exp.method, setup)
        with MX.timer(self.device) as te:
            result = self.evaluate(model, exp, data, seed)
        result["time_s"], result["eval_s"] = t.seconds, te.seconds
        if mask is not None:
            result["mask_s"] = mask_seconds
            result["mask_fraction"] = mask_fraction(mask)
            if exp.save_mask and not exp.load_mask:
                p = save_mask(self.out_dir / "masks" / f"{safe_name(exp.tag)}_seed{seed}.pt", mask,
                              threshold=exp.mask_thr, forget_digest=record["forget_digest"])
                record["mask_path"] = str(p)
        return model, result

    def saliency(self, exp: Experiment, data, seed, recipe, model, path: Path) -> dict:
        """The run's saliency mask, of the original model; kept at `path` until the run is
        recorded, so that a resumed run trains under the mask it started with (recomputed on
        a GPU, its near-ties may fall otherwise)."""
        if path.is_file():
            return load_mask(path, model, self.device)
        mask = saliency_mask(model, unlearning.forget_loader(self.setup(exp, data, seed, recipe), salt=7),
                             exp.mask_thr)
        save_mask(path, mask, threshold=exp.mask_thr)
        return mask

    def save_models(self, exp: Experiment, model, base, data, seed, record) -> None:
        path = self.out_dir / "models" / safe_name(exp.tag) / f"seed{seed}.pt"
        spec = dataclasses.asdict(exp.forget.data_spec(exp))
        meta = {"model": exp.model, "num_classes": data.num_classes, "dataset": exp.dataset,
                "data": spec, "method": exp.method_name, "seed": seed,
                "class_to_forget": spec["cf"], "forget_digest": record["forget_digest"],
                "role": "unlearned"}
        engine.save_checkpoint(path, model, meta)
        record["model_path"] = str(path)
        base_path = self.out_dir / "models" / "base" / f"seed{self.base_seed(exp, seed)}.pt"
        with exclusive(base_path):  # runs of a launch share it: the first writes it
            if not base_path.exists():
                engine.save_checkpoint(base_path, base, {
                    "model": exp.model, "num_classes": data.num_classes, "dataset": exp.dataset,
                    "data": dataclasses.asdict(exp.forget.data_spec(exp, with_forget=False)),
                    "method": "base", "class_to_forget": None, "role": "base"})


def plan_lines(exps: list[Experiment], runner: Runner) -> list[str]:
    lines = []
    for i, exp in enumerate(exps, 1):
        base = exp.checkpoint
        if not base:
            p = runner.base_path(exp)
            base = f"{p} ({'cached' if p.is_file() else 'to train'})"
        subset = f" subset {exp.subset}" if exp.subset else ""
        budget = f"steps {exp.train.steps}, " if exp.train.steps else f"epochs {exp.train.epochs}, "
        lines.append(f"{i:>3}. {exp.tag}: {exp.method_name} on {exp.model}/{exp.dataset}{subset}, "
                     f"forget {exp.forget.label()}, lr {exp.train.lr:g}, " + budget +
                     f"mask {exp.mask_thr if exp.use_mask else 'no'}, seeds {exp.seeds}; base {base}")
    return lines


def run_id(config: dict, seed: int) -> str:
    """What names a run in runs.jsonl: its experiment's validated config (`Experiment.record()`
    without `nexp`, which says how many runs there are, not what one is) and its seed. An
    edited experiment is another run."""
    return to_json({"config": {k: v for k, v in config.items() if k != "nexp"}, "seed": seed},
                   sort_keys=True)


def list_runs(exps: list[Experiment]) -> list[tuple[int, Experiment, int, str]]:
    """(experiment number, experiment, seed, run id) of every run of the list, in its order."""
    return [(i, exp, seed, run_id(exp.record(), seed)) for i, exp in enumerate(exps, 1) for seed in exp.seeds]


def job_record(out_dir: Path, rid: str) -> Path:
    """Where the job that runs `rid` writes its record (jobs/<hash of the run id>.json); the
    same name without `.json` is the run's lock, held by whoever runs it."""
    return out_dir / "jobs" / f"{hashlib.sha1(rid.encode()).hexdigest()[:16]}.json"


def run_state(out_dir: Path, rid: str) -> tuple[Path, Path]:
    """(training state, saliency mask) that run `rid` keeps while it runs, beside its record
    (jobs/<hash>.resume.pt, jobs/<hash>.mask.pt): a run killed, preempted or timed out goes on
    from its last epoch, in a job of a relaunch or in main.py run again."""
    stem = job_record(out_dir, rid).with_suffix("")
    return stem.with_name(stem.name + ".resume.pt"), stem.with_name(stem.name + ".mask.pt")


def drop_run_state(out_dir: Path, rid: str) -> None:
    """The run is recorded: what it kept to resume from goes."""
    for path in run_state(out_dir, rid):
        path.unlink(missing_ok=True)


def run_lock(out_dir: Path, rid: str):
    """Held while the run is checked and run: by one process at a time (a job of a launch,
    a second launch of the same list, main.py without a launcher)."""
    return exclusive(job_record(out_dir, rid).with_suffix(""))


def runs_lock(out_dir: Path):
    """Held while runs.jsonl and the summary tables are written."""
    return exclusive(out_dir / "runs")


def record_id(record) -> str | None:
    """The run id of a line of runs.jsonl; None for a line that is not a run's record."""
    if isinstance(record, dict) and isinstance(record.get("config"), dict) and "seed" in record:
        return run_id(record["config"], record["seed"])
    return None


def by_run(records: list) -> dict[str, dict]:
    """The records by run id (a run recorded twice: its last record)."""
    return {rid: r for r in records if (rid := record_id(r)) is not None}


def runs_in(runs_file: Path) -> dict[str, dict]:
    """The runs runs.jsonl holds, by run_id (a torn last line left out)."""
    return by_run(read_jsonl(runs_file))


def in_list_order(records: list, runs: list[tuple[int, Experiment, int, str]]) -> list:
    """`records` with the list's runs put in the list's order (experiment, then seed) in the
    places they take; every other line (another list's run, an earlier record of a run
    recorded twice) stays where it is. So runs recorded in any order (the jobs of a launch,
    a relaunch finishing the runs a first launch lost) end as one process running the list
    writes them."""
    rank: dict[str, int] = {}
    for n, (*_, rid) in enumerate(runs):
        rank.setdefault(rid, n)
    last = {rid: pos for pos, r in enumerate(records) if (rid := record_id(r)) in rank}
    out = list(records)
    for pos, rid in zip(sorted(last.values()), sorted(last, key=rank.__getitem__)):
        out[pos] = records[last[rid]]
    return out


def merge_records(runs: list[tuple[int, Experiment, int, str]], out_dir: Path,
                  new: dict[str, dict] | None = None) -> dict[str, dict]:
    """The recorded runs by run id, after writing into runs.jsonl the records of the list's
    runs it lacks (those jobs wrote, jobs/*.json, and `new`: run id -> record), with the
    list's runs in the list's order (`in_list_order`): the lines one process running the list
    writes. A torn last line (a crash mid-write) is set aside first."""
    runs_file = out_dir / "runs.jsonl"
    with runs_lock(out_dir):
        set_aside_torn_tail(runs_file)
        records = read_jsonl(runs_file)
        have = by_run(records)
        added = {rid: json.loads(job_record(out_dir, rid).read_text()) for *_, rid in runs
                 if rid not in have and job_record(out_dir, rid).is_file()}
        added.update({rid: r for rid, r in (new or {}).items() if rid not in have})
        merged = in_list_order(records + list(added.values()), runs)
        if merged != records:
            write_jsonl(runs_file, merged)
    return by_run(merged)


def unrecorded(runs: list[tuple[int, Experiment, int, str]], recorded) -> list[tuple[int, Experiment, int, str]]:
    """The runs not in `recorded`; a run listed twice once (where it is first listed)."""
    out, seen = [], set(recorded)
    for run in runs:
        if run[3] not in seen:
            seen.add(run[3])
            out.append(run)
    return out


def list_records(runs: list[tuple[int, Experiment, int, str]], recorded: dict[str, dict]) -> list[dict]:
    """The list's recorded runs in its order, numbered and named as in the list (for the summary)."""
    return [{**recorded[rid], "experiment": i, "name": exp.tag} for i, exp, _, rid in runs if rid in recorded]


def run_list(exps: list[Experiment], runner: Runner, *, source: str, log: bool,
             wandb_project: str) -> tuple[list[dict], Path]:
    """Every (experiment, seed) run not yet recorded (in runs.jsonl, or by a job of a launch),
    each record appended to runs.jsonl as it ends; returns the records of the whole list
    (recorded earlier or now), for the summary."""
    runs_file = runner.out_dir / "runs.jsonl"
    runs = list_runs(exps)
    recorded = merge_records(runs, runner.out_dir)
    pending = unrecorded(runs, recorded)
    if len(pending) < len(runs):
        print(f"{len(runs) - len(pending)} of {len(runs)} run(s) already recorded in {runs_file}: skipped")
    started = time.strftime("%Y%m%d_%H%M%S")
    for i, exp, seed, rid in pending:
        with run_lock(runner.out_dir, rid):
            done = merge_records(runs, runner.out_dir)
            if rid in done:  # another process ran it meanwhile
                recorded[rid] = done[rid]
                drop_run_state(runner.out_dir, rid)
                continue
            record = run_one(runner, exp, i, len(exps), seed, started=started, source=source, log=log,
                             wandb_project=wandb_project)
            merge_records(runs, runner.out_dir, {rid: record})
            drop_run_state(runner.out_dir, rid)
        recorded[rid] = record
    return list_records(runs, recorded), runs_file


def run_one(runner: Runner, exp: Experiment, index: int, n_exps: int, seed: int, *, started: str,
            source: str, log: bool, wandb_project: str) -> dict:
    """One run's record (wandb-logged when `log`), `started` naming the command that ran it."""
    print(f"\n=== experiment {index}/{n_exps} '{exp.tag}', seed {seed} ===", flush=True)
    logger = RunLogger(log, wandb_project,
                       f"{exp.method_name}_run_{'M_' if exp.use_mask else ''}{started}_{seed - exp.seed}",
                       {**exp.record(), "tag": exp.tag, "runid": started, "runidx": seed - exp.seed,
                        "source": source})
    record = runner.run_or_diverge(exp, index, seed)
    record["started"] = started
    logger.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
    logger.finish()
    metrics = ", ".join(f"{k}={record[k]:.2f}" for k in METRICS if isinstance(record.get(k), float))
    print("  " + (f"diverged: {record['diverged']}" if record["diverged"] else metrics), flush=True)
    return record


GROUP = ["experiment", "name", "forget"]


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per experiment: n runs, mean ± std of each metric over the runs that did not
    diverge, and (when any did) how many diverged; a metric no run finished reads "diverged"."""
    present = [m for m in METRICS if any(isinstance(r.get(m), (int, float)) for r in records)]
    rows = summarize(records, GROUP, present)
    diverged = Counter(tuple(r.get(k) for k in GROUP) for r in records if r.get("diverged"))
    out = []
    for row in rows:
        n_diverged = diverged[tuple(row[k] for k in GROUP)]
        new = {"experiment": row["experiment"], "method": row["name"], "forget": row["forget"], "n": row["n"]}
        for m in present:
            new[HEADERS[m]] = row.get(m, "diverged" if n_diverged == row["n"] else "")
        if diverged:
            new["diverged"] = n_diverged
        out.append(new)
    return out


def write_summary(records: list[dict], out_dir: Path) -> str:
    with runs_lock(out_dir):
        return write_tables(summary_rows(records), out_dir / "summary")

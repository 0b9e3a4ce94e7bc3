"""A list's runs as jobs, through submitit: `main.py -L FILE --launcher local|slurm`.

Each (experiment, seed) run not yet recorded is one job: a pickled `RunJob` that rebuilds
the Runner in the job's process, runs that one run and writes its record to
jobs/<hash>.json (atomically) under the run's lock (runner.run_lock), so a run is never run
twice, also by two launches of one list at once, and re-launching a list runs only what
is missing.

  local  up to --max-parallel jobs at once on this machine (submitit's LocalExecutor), each
         on one GPU of its own (CUDA_VISIBLE_DEVICES), or --jobs-per-gpu to a GPU; without
         GPUs, on the CPU, each with --threads (default: the cores shared out). The command
         waits for the jobs, then merges.
  slurm  one job array (sbatch through submitit) with --slurm-partition, --gpus-per-job,
         --cpus-per-job, --timeout-min, --max-parallel (the array's parallelism) and any
         sbatch option (--slurm-extra KEY=VALUE); a last small job merges. The command
         returns once the jobs are submitted.

A job preempted or past --timeout-min is checkpointed and requeued by submitit (the jobs
are Checkpointable); its run goes on from its last epoch (the run's resume file,
jobs/<hash>.resume.pt, runner.run_state), as does the run of a job killed and relaunched.

Shared models first: a base model or retrain reference that two or more of the runs to
launch use and that is not cached yet gets a job of its own, before them (local: the runs
start when these jobs have ended; Slurm: the runs' array depends on theirs, `afterany`, so
a failed one is tried again by the first run that needs it). So no run job sits on a GPU
waiting for another's training. These are jobs, not work of the launching command,
because on a cluster that command runs on a login node, without GPUs; it only loads the
data to name the retrain references (their cache keys hold the forget set's digest). What
guarantees "trained once" is the cache's file lock (training.cached_model): whoever trains
a model holds it, and everyone else waits and loads the file; it holds across launches
and machines sharing CHECKPOINT_DIR.

Files, beside runs.jsonl (RESULTS_DIR/main/<stem>, on a disk the jobs share):
  jobs/<hash>.json       one run's record, as its job wrote it
  jobs/<hash>.resume.pt  the run's training state while it runs (.mask.pt: its saliency mask)
  jobs/submitted.jsonl   one line per job submitted: what it runs, its id, its launcher
  jobs/logs/             submitit's pickles and each job's stdout / stderr
`merge` adds the job records runs.jsonl lacks, with the list's runs in the list's order,
and writes the summary tables: the lines and rows one process running the list writes
(runner.merge_records), whatever order the jobs ended in.
`status_lines` says per run (and shared model) done / running / failed, with a failed
job's last error line.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import time
from collections import Counter, deque
from pathlib import Path

import torch

try:
    import submitit
    from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths, pickle_load
    from submitit.helpers import Checkpointable
except ImportError:  # only launching jobs needs submitit: a list still runs in one process without it
    submitit = None
    Checkpointable = object

from cli import resolve_device
from constants import REPO_ROOT, UserError, cache_dir, checkpoint_dir, data_root, results_dir
from experiments import Experiment
from reporting import append_jsonl, read_jsonl, write_json
from runner import (Runner, drop_run_state, job_record, list_records, list_runs, merge_records, run_id, run_lock,
                    run_one, runs_in, unrecorded, write_summary)
from storage import exclusive

LAUNCHERS = ("local", "slurm")
SLURM_ONLY = ("slurm_partition", "gpus_per_job", "cpus_per_job", "slurm_extra")
LOCAL_ONLY = ("jobs_per_gpu",)
LAUNCH_ONLY = ("max_parallel", "timeout_min")
TIMEOUT_MIN = 720  # default time limit of a job; past it, it is checkpointed and requeued
CPUS_PER_JOB = 4
POLL_S = 0.2  # how often the local launcher looks at its jobs


def add_args(p) -> None:
    g = p.add_argument_group("the runs as jobs (submitit; docs/launching.md)")
    g.add_argument("--launcher", default=None, help="local | slurm: each (experiment, seed) run one job")
    g.add_argument("--max-parallel", type=int, default=None,
                   help="jobs at once (local: default GPUs x --jobs-per-gpu, 1 on CPU; slurm: the array's)")
    g.add_argument("--timeout-min", type=int, default=None,
                   help=f"a job's time limit, minutes (default {TIMEOUT_MIN}); then it is requeued, resuming")
    g.add_argument("--jobs-per-gpu", type=int, default=None, help="local: jobs sharing a GPU (default 1)")
    g.add_argument("--slurm-partition", default=None, help="slurm: the partition (default: the cluster's)")
    g.add_argument("--gpus-per-job", type=int, default=None, help="slurm: GPUs per job (default 1)")
    g.add_argument("--cpus-per-job", type=int, default=None,
                   help=f"slurm: CPUs per job, and its torch threads (default {CPUS_PER_JOB})")
    g.add_argument("--slurm-extra", action="append", default=None, metavar="KEY=VALUE",
                   help="slurm: any sbatch option, repeatable (account=abc, qos=high, mem=32G; KEY alone: a flag)")
    g.add_argument("--status", action="store_true",
                   help="per run of the list: done / running / failed (with the last error line)")
    g.add_argument("--merge", action="store_true",
                   help="the job records into runs.jsonl and the summary tables (done at a launch's end)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_args(args) -> None:
    """Refuse launch flags that do not fit together, before anything is submitted."""
    if args.launcher is not None and args.launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{args.launcher}': use --launcher local or --launcher slurm")
    if (args.launcher or args.status) and submitit is None:
        raise UserError(f"{'--launcher' if args.launcher else '--status'} needs submitit, which is not "
                        "installed: pip install -r requirements.txt")
    if args.status and args.merge:
        raise UserError("--status and --merge are two commands: give one")
    if (args.status or args.merge) and args.launcher:
        raise UserError(f"{'--status' if args.status else '--merge'} launches nothing: drop --launcher")
    for names, needs, what in ((SLURM_ONLY, ("slurm",), "--launcher slurm"),
                               (LOCAL_ONLY, ("local",), "--launcher local"),
                               (LAUNCH_ONLY, LAUNCHERS, "--launcher local or slurm")):
        for name in names:
            if getattr(args, name) is not None and args.launcher not in needs:
                raise UserError(f"{_flag(name)} goes with {what}")
    for name in ("max_parallel", "timeout_min", "jobs_per_gpu", "cpus_per_job"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"{_flag(name)} must be at least 1, got {getattr(args, name)}")
    if args.gpus_per_job is not None and args.gpus_per_job < 0:
        raise UserError(f"--gpus-per-job must be 0 or more, got {args.gpus_per_job}")
    sbatch_options(args.slurm_extra)
    if args.launcher and args.device and ":" in args.device:
        raise UserError(f"--device {args.device} with --launcher: each job is given its GPU; use --device cuda")


def sbatch_options(items: list[str] | None) -> dict:
    """--slurm-extra KEY=VALUE (KEY alone: a flag) as submitit's additional_parameters."""
    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise UserError(f"--slurm-extra {item!r}: write an sbatch option as KEY=VALUE (e.g. qos=high)")
        out[key] = value if value else True
    return out


# --- jobs ------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    """What every job of a launch needs to rebuild its Runner (pickled into each job)."""
    exps: list[Experiment]
    out_dir: Path
    source: str
    started: str
    device: str | None
    amp: bool | None
    threads: int | None
    log: bool
    wandb_project: str
    env: dict[str, str]  # the launching command's data, checkpoint and cache folders

    def runner(self) -> Runner:
        os.environ.update(self.env)  # the launch's folders, whatever the job's environment says
        if self.threads:
            torch.set_num_threads(self.threads)
        return Runner(resolve_device(self.device), self.out_dir, self.amp)


class Job(Checkpointable):
    """A job's callable. Checkpointable: when preempted or timed out, submitit requeues the
    same callable (its `checkpoint`)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def label(self) -> dict:
        raise NotImplementedError


class RunJob(Job):
    """One (experiment, seed) run, its record written to jobs/<hash>.json; run again (requeued,
    relaunched) it goes on from its last epoch (runner.run_state)."""

    def __init__(self, ctx: Context, index: int, seed: int):
        super().__init__(ctx)
        self.index, self.seed = index, seed
        self.rid = run_id(ctx.exps[index - 1].record(), seed)

    def label(self) -> dict:
        return {"kind": "run", "run": job_record(self.ctx.out_dir, self.rid).stem,
                "name": f"{self.index}. {self.ctx.exps[self.index - 1].tag}, seed {self.seed}"}

    def __call__(self) -> str:
        runner = self.ctx.runner()
        exp, out = self.ctx.exps[self.index - 1], self.ctx.out_dir
        with run_lock(out, self.rid):
            if job_record(out, self.rid).is_file() or self.rid in runs_in(out / "runs.jsonl"):
                print("recorded already (by another job or command): nothing to do")
                drop_run_state(out, self.rid)  # left by a job stopped between its record and this
                return "recorded already"
            record = run_one(runner, exp, self.index, len(self.ctx.exps), self.seed,
                             started=self.ctx.started, source=self.ctx.source, log=self.ctx.log,
                             wandb_project=self.ctx.wandb_project)
            write_json(job_record(out, self.rid), record)
            drop_run_state(out, self.rid)
        return "done"


class SharedModelJob(Job):
    """A base model or retrain reference several runs use, trained (or found cached)."""

    def __init__(self, ctx: Context, kind: str, index: int, seed: int, path: Path):
        super().__init__(ctx)
        self.kind, self.index, self.seed, self.path = kind, index, seed, path

    def label(self) -> dict:
        return {"kind": self.kind, "model": str(self.path), "name": f"{self.kind} model {self.path.name}"}

    def __call__(self) -> str:
        self.ctx.runner().build_shared(self.kind, self.ctx.exps[self.index - 1], self.seed)
        return "done"


class MergeJob(Job):
    """The last job of a Slurm launch: runs.jsonl and the summary tables."""

    def label(self) -> dict:
        return {"kind": "merge", "name": "merge"}

    def __call__(self) -> str:
        merge_and_report(self.ctx.exps, self.ctx.out_dir, self.ctx.source)
        return "done"


def plan(ctx: Context) -> tuple[list[RunJob], list[SharedModelJob]]:
    """The runs to launch (those not recorded) and the shared models to train before them:
    those not cached that two or more of these runs use."""
    pending = [run for run in unrecorded(list_runs(ctx.exps), runs_in(ctx.out_dir / "runs.jsonl"))
               if not job_record(ctx.out_dir, run[3]).is_file()]
    planner = Runner(torch.device("cpu"), ctx.out_dir, None)  # paths and forget sets; trains nothing
    users: dict[tuple[str, Path], list[tuple[int, int]]] = {}
    for i, exp, seed, _ in pending:
        for kind, path in planner.shared_models(exp, seed):
            users.setdefault((kind, path), []).append((i, seed))
    shared = [SharedModelJob(ctx, kind, *who[0], path) for (kind, path), who in users.items()
              if len(who) > 1 and not path.is_file()]
    return [RunJob(ctx, i, seed) for i, _, seed, _ in pending], shared


def note_submission(out_dir: Path, fn: Job, job, launcher: str) -> None:
    manifest = out_dir / "jobs" / "submitted.jsonl"
    with exclusive(manifest.with_suffix("")):  # two launches may submit at once
        append_jsonl(manifest, {**fn.label(), "job_id": str(job.job_id), "launcher": launcher,
                                "folder": str(job.paths.folder), "at": time.strftime("%Y-%m-%d %H:%M:%S")})


# --- launching -------------------------------------------------------------------------

def launch(args, exps: list[Experiment], out_dir: Path, stem: str) -> int:
    """Launch the list's missing runs as jobs; 0 when (local) every run is recorded at the
    end or (slurm) the jobs are submitted, 1 when local jobs failed."""
    slots = local_slots(args) if args.launcher == "local" else []
    threads = args.threads or (max(1, (os.cpu_count() or 1) // len(slots)) if slots
                               else args.cpus_per_job or CPUS_PER_JOB)
    ctx = Context(exps, out_dir.resolve(), stem, time.strftime("%Y%m%d_%H%M%S"), args.device, args.amp,
                  threads, not args.no_log, args.wandb_project,
                  {"DATA_ROOT": str(data_root().resolve()), "CHECKPOINT_DIR": str(checkpoint_dir().resolve()),
                   "CACHE_DIR": str(cache_dir().resolve()), "RESULTS_DIR": str(results_dir().resolve())})
    runs, shared = plan(ctx)
    print(f"{len(runs)} run(s) to launch as {args.launcher} jobs, after {len(shared)} shared model(s)")
    if args.dry_run:
        print("dry run: everything validated, nothing submitted")
        return 0
    if not runs:  # all recorded: the tables, as a run of the whole list ends
        merge_and_report(exps, out_dir, stem)
        return 0
    # the jobs unpickle this repository's classes: it must be on their path, wherever they start
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    folder = out_dir / "jobs" / "logs"
    timeout = args.timeout_min or TIMEOUT_MIN
    if args.launcher == "slurm":
        submit_slurm(shared, runs, MergeJob(ctx), slurm_parameters(args, stem, timeout), folder, out_dir)
        return 0
    failures = run_local(shared, slots, folder, timeout, out_dir)
    failures += run_local(runs, slots, folder, timeout, out_dir)
    missing = merge_and_report(exps, out_dir, stem)
    if failures:
        print(f"\n{len(failures)} job(s) failed:\n  " + "\n  ".join(failures))
    if missing:
        print(f"{missing} run(s) not recorded: run the same command again to finish them "
              "(--status says which, and why)")
    return 1 if missing else 0


def local_slots(args) -> list[int | None]:
    """A GPU number per job slot of this machine (each GPU --jobs-per-gpu times, round-robin,
    so fewer jobs spread over all GPUs), or --max-parallel CPU slots (None) without GPUs."""
    if resolve_device(args.device).type != "cuda":
        if args.jobs_per_gpu:
            raise UserError("--jobs-per-gpu needs GPUs, and this machine shows none (or --device cpu)")
        return [None] * (args.max_parallel or 1)
    slots = visible_gpus() * (args.jobs_per_gpu or 1)
    if args.max_parallel and args.max_parallel > len(slots):
        raise UserError(f"--max-parallel {args.max_parallel} is more than the {len(slots)} GPU slot(s) here "
                        f"({len(slots) // (args.jobs_per_gpu or 1)} GPU(s) x {args.jobs_per_gpu or 1} "
                        "job(s) per GPU): raise --jobs-per-gpu, or lower --max-parallel")
    return slots[:args.max_parallel or len(slots)]


def visible_gpus() -> list[int]:
    """The GPU numbers jobs may be given: CUDA_VISIBLE_DEVICES's, or all."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return list(range(torch.cuda.device_count()))
    try:
        return [int(g) for g in listed.split(",") if g.strip()]
    except ValueError:
        raise UserError(f"CUDA_VISIBLE_DEVICES={listed}: --launcher local needs GPU numbers there "
                        "(0,1,...), not UUIDs") from None


def run_local(fns: list[Job], slots: list[int | None], folder: Path, timeout_min: int,
              out_dir: Path) -> list[str]:
    """Run the jobs on this machine, one per free slot, each seeing only its slot's GPU;
    returns a line per job that failed."""
    executor = submitit.LocalExecutor(folder=folder)
    executor.update_parameters(timeout_min=timeout_min)
    queue, free, running, failures = deque(fns), deque(slots), {}, []
    try:
        while queue or running:
            while queue and free:
                gpu, fn = free.popleft(), queue.popleft()
                executor.update_parameters(gpus_per_node=0 if gpu is None else 1,
                                           visible_gpus=() if gpu is None else (gpu,))
                job = executor.submit(fn)
                note_submission(out_dir, fn, job, "local")
                running[job] = (gpu, fn)
            time.sleep(POLL_S)
            for job in [j for j in running if j.done()]:
                gpu, fn = running.pop(job)
                free.append(gpu)
                state, why = outcome(job.paths) or ("failed", killed(job.paths))
                line = f"{fn.label()['name']} (job {job.job_id})" + (f": {why}" if why else "")
                print(f"{state:<6} {line}  [{len(fns) - len(queue) - len(running)}/{len(fns)} ended]", flush=True)
                if state == "failed":
                    failures.append(line)
    except KeyboardInterrupt:
        for job in running:
            job.cancel(check=False)
        raise
    return failures


def slurm_parameters(args, stem: str, timeout_min: int) -> dict:
    """submitit's SlurmExecutor parameters (sbatch options) for the run jobs."""
    gpus = 1 if args.gpus_per_job is None else args.gpus_per_job
    return {"job_name": f"unlearn-{stem}", "partition": args.slurm_partition, "time": timeout_min,
            "gpus_per_node": gpus or None, "cpus_per_task": args.cpus_per_job or CPUS_PER_JOB,
            "array_parallelism": args.max_parallel or 256,
            # a preempted job goes back to the queue (submitit requeues timed-out ones itself)
            "additional_parameters": {"requeue": True, **sbatch_options(args.slurm_extra)},
            "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]}


def submit_slurm(shared: list[Job], runs: list[Job], merge_job: Job, parameters: dict, folder: Path,
                 out_dir: Path) -> None:
    """The shared models' array, the runs' array after it, then the merge job after that."""
    try:
        executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
        raise UserError("--launcher slurm needs Slurm here (no srun found): run it on the cluster") from None
    executor.update_parameters(**parameters)
    after = None
    try:
        for fns in (shared, runs):
            if fns:
                if after:
                    executor.update_parameters(dependency=f"afterany:{after}")
                jobs = executor.submit_array(fns)
                for fn, job in zip(fns, jobs):
                    note_submission(out_dir, fn, job, "slurm")
                after = jobs[0].job_id.split("_")[0]
                print(f"submitted {len(fns)} {'shared-model' if fns is shared else 'run'} job(s): array {after}")
        executor.update_parameters(gpus_per_node=None, cpus_per_task=1, dependency=f"afterany:{after}")
        job = executor.submit(merge_job)
    except (FailedJobError, FailedSubmissionError) as e:
        raise UserError(f"sbatch refused the jobs ({last_line(str(e))}); the arrays above, if any, "
                        "stay submitted") from None
    note_submission(out_dir, merge_job, job, "slurm")
    print(f"merge job {job.job_id} writes runs.jsonl and the summary when they have ended; follow "
          "them with the same main.py -L command and --status instead of --launcher")


# --- merge and status ---------------------------------------------------------------

def merge_and_report(exps: list[Experiment], out_dir: Path, stem: str) -> int:
    """Merge the job records into runs.jsonl, write and print the summary; the number of
    the list's runs not recorded."""
    runs = list_runs(exps)
    recorded = merge_records(runs, out_dir)
    records = list_records(runs, recorded)
    missing = len(unrecorded(runs, recorded))
    if not records:
        print(f"{stem}: no run of the list is recorded in {out_dir} yet")
        return missing
    md = write_summary(records, out_dir)
    print(f"\n{stem}: {len(records)} run(s) recorded, {missing} missing; mean ± std over seeds "
          f"(results: {out_dir / 'runs.jsonl'})\n")
    print(md)
    return missing


def last_line(text: str) -> str:
    """The last non-empty line of a log or traceback (a progress bar's last state too)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1][:300] if lines else ""


def outcome(paths: JobPaths) -> tuple[str, str] | None:
    """("done", "") or ("failed", its last error line) for a job that ended in Python; None
    when it has written no result (yet)."""
    if not paths.result_pickle.is_file():
        return None
    kind, value = pickle_load(paths.result_pickle)  # ("success", str) or ("error", traceback)
    return ("done", "") if kind == "success" else ("failed", last_line(str(value)))


def killed(paths: JobPaths) -> str:
    log = paths.stderr.read_text(errors="replace") if paths.stderr.is_file() else ""
    return f"killed (no result); last log line: {last_line(log) or '(none)'}"


def job_state(sub: dict) -> tuple[str, str]:
    """What a submitted job is doing, from its files (and, for a local job, its process)."""
    paths = JobPaths(sub["folder"], sub["job_id"])
    ended = outcome(paths)
    if ended:
        return ended
    if sub["launcher"] == "local":
        try:
            os.kill(int(sub["job_id"]), 0)  # a local job's id is its process's
            return "running", ""
        except ProcessLookupError:
            return "failed", killed(paths)
        except PermissionError:
            return "running", ""
    return ("running", "") if paths.stdout.is_file() else ("queued", "")


def status_lines(exps: list[Experiment], out_dir: Path) -> list[str]:
    """Per run of the list: done, running, queued, failed (with the last error line), or not
    launched; then the shared-model jobs of the launches."""
    latest: dict[str, dict] = {}
    for sub in read_jsonl(out_dir / "jobs" / "submitted.jsonl"):
        latest[sub.get("run") or sub.get("model") or sub["kind"]] = sub
    recorded = runs_in(out_dir / "runs.jsonl")
    lines, count = [], Counter()
    for i, exp, seed, rid in unrecorded(list_runs(exps), {}):
        sub = latest.get(job_record(out_dir, rid).stem)
        if rid in recorded or job_record(out_dir, rid).is_file():
            state, why = "done", ""
        else:
            state, why = job_state(sub) if sub else ("not launched", "")
        count[state] += 1
        job = f" (job {sub['job_id']})" if sub and state != "done" else ""
        lines.append(f"{state:<12} {i}. {exp.tag}, seed {seed}{job}" + (f": {why}" if why else ""))
    for sub in latest.values():
        if sub["kind"] in ("base", "reference", "merge"):
            state, why = ("done", "") if Path(sub.get("model", "")).is_file() else job_state(sub)
            lines.append(f"{state:<12} {sub['name']} (job {sub['job_id']})" + (f": {why}" if why else ""))
    lines.append(f"{sum(count.values())} run(s): " + ", ".join(f"{n} {s}" for s, n in count.items()))
    return lines

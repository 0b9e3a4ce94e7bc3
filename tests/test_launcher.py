"""main.py -L FILE --launcher local|slurm (launcher.py, submitit): a list's runs as jobs on
tiny data. A local launch with one job killed (SIGKILL) and one preempted (submitit's
USR2: checkpoint and requeue) after their runs' first epoch, then re-launched, ends with
the runs.jsonl (line by line) and summary one process writes, both runs resumed from their
epoch; two launches of one list at once train each shared model once and run
each run once; the Slurm arrays and sbatch options are checked without a cluster; bad
launch flags get one error line and submit nothing."""
import csv
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch

import engine
import launcher
import main
from cli import run_main
from constants import UserError
from models import get_model
from reporting import read_jsonl
from runner import in_list_order, run_id
from training import cached_model

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": "smallcnn", "batch_size": 64, "epochs": 1, "lr": 0.05, "mia_cap": 50, "eval_batch_size": 256,
        "class_to_forget": 1, "rf_mia": False,
        "base": {"epochs": 1, "lr": 0.05, "batch_size": 64, "schedule": "constant"}}
# what a run computes; times, devices, cache flags and checkpoint paths may differ
SAME = ("experiment", "name", "method", "seed", "forget", "n_forget", "n_retain", "forget_digest",
        "UA", "RA", "TA", "VA", "VA_forget", "MIA", "gap", "ref")


def experiment_list(folder: Path, experiments: list[dict], **defaults) -> str:
    path = folder / "list.json"
    path.write_text(json.dumps({"defaults": {**TINY, **defaults}, "experiments": experiments}))
    return str(path)


def launch_command(path: str, out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), "-L", path, "-NL", "--threads", "1", "--out", str(out), *flags]


def jobs_of(out: Path) -> list[dict]:
    """The jobs the launches of `out` submitted (jobs/submitted.jsonl)."""
    return read_jsonl(out / "jobs" / "submitted.jsonl")


def log(job: dict) -> str:
    path = Path(job["folder"]) / f"{job['job_id']}_0_log.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def worker_of(controller: int) -> int:
    """The process a local job runs its Python in: the child of submitit's controller (the
    job id)."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == controller:
                return int(d.name)
        except (OSError, IndexError, ValueError):
            continue
    raise AssertionError(f"job {controller} has no worker process")


def resume_file(out: Path, job: dict) -> Path:
    """Where the run of a run job keeps its training state (runner.run_state)."""
    return out / "jobs" / f"{job['run']}.resume.pt"


def runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def table(out: Path) -> list[dict]:
    with open(out / "summary.csv") as f:
        return [{k: v for k, v in row.items() if k != "time (s)"} for row in csv.DictReader(f)]


def in_one_process(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main.main(argv)
    finally:
        torch.set_num_threads(threads)


def test_a_cached_model_two_want_at_once_is_trained_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path))
    trained, got = [], []

    def train(path, extra):
        trained.append(path)
        time.sleep(0.5)  # the other one asks meanwhile
        model = get_model("smallcnn", 10)
        engine.save_checkpoint(path, model, {"num_classes": 10, **extra})
        return model, {}

    def want():
        got.append(cached_model("base", {"k": 1}, model_name="smallcnn", dataset="cifar10", device="cpu",
                                train=train)[1]["cached"])
    threads = [threading.Thread(target=want) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(trained) == 1 and sorted(got) == [False, True]


def test_a_launch_with_a_killed_and_a_preempted_job_ends_as_one_process(tiny_env, monkeypatch, capsys):
    """3 experiments x 2 seeds, --launcher local --max-parallel 2: one run's job is killed
    (SIGKILL), another's preempted (USR2: submitit checkpoints and requeues it, and it runs
    again), each once its run has saved its first epoch. The launch exits 1 naming the lost
    run, --status says so; the same command again runs that run alone; both signalled runs
    go on from the epoch they saved; runs.jsonl then holds, line by line and in order, what
    one process writes, and the summary its rows. (The launches run in this process, the
    jobs in their own.)"""
    path = experiment_list(tiny_env, [{"method": "ft", "tag": "ft"},  # the two signalled: 6 epochs, time to act
                                      {"method": "ga", "lr": 0.001, "tag": "ga", "epochs": 6},
                                      {"method": "rl", "tag": "rl", "epochs": 6}], nexp=2, avg_gap=False)
    assert in_one_process(["-L", path, "-NL", "--threads", "1", "--out", str(tiny_env / "single")]) == 0
    monkeypatch.setenv("CHECKPOINT_DIR", str(tiny_env / "ck_launched"))  # its own base model, from a job
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # which the launch extends
    out = tiny_env / "launched"
    argv = ["-L", path, "-NL", "--threads", "1", "--out", str(out)]
    launch = [*argv, "--launcher", "local", "--max-parallel", "2"]
    signals = {"2. ga, seed 0": signal.SIGKILL, "3. rl, seed 1": signal.SIGUSR2}
    hit: dict[str, dict] = {}
    ended = threading.Event()

    def interfere():  # each signal as soon as its run has saved an epoch to resume from
        while len(hit) < len(signals) and not ended.wait(0.05):
            for job in jobs_of(out):
                if job["name"] in signals and job["name"] not in hit and resume_file(out, job).is_file():
                    os.kill(worker_of(int(job["job_id"])), signals[job["name"]])
                    hit[job["name"]] = job
    watcher = threading.Thread(target=interfere)
    watcher.start()
    try:
        code = in_one_process(launch)
    finally:
        ended.set()
        watcher.join()
    stdout = capsys.readouterr().out
    assert len(hit) == 2 and code == 1, stdout[-3000:]
    assert "after 1 shared model(s)" in stdout  # the base model all six runs use
    assert "1 job(s) failed" in stdout and "killed" in stdout, stdout[-3000:]
    requeued = log(hit["3. rl, seed 1"])
    assert requeued.count("=== experiment") == 2 and "resuming from" in requeued  # requeued, resumed, recorded
    assert len(runs(out)) == 5 and resume_file(out, hit["2. ga, seed 0"]).is_file()

    assert in_one_process([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    lost = [line for line in status.splitlines() if "2. ga, seed 0" in line]
    assert lost[0].startswith("failed") and "killed" in lost[0] and "6 run(s): 5 done, 1 failed" in status, status

    assert in_one_process(launch) == 0
    assert "1 run(s) to launch as local jobs, after 0 shared" in capsys.readouterr().out
    relaunched = log(jobs_of(out)[-1])
    assert "resuming from" in relaunched and "ga epoch 1/6" not in relaunched and "ga epoch 6/6" in relaunched
    assert not list((out / "jobs").glob("*.resume.pt"))  # each went with its run's record
    single, launched = runs(tiny_env / "single"), runs(out)
    assert [(r["experiment"], r["seed"]) for r in launched] == [(i, s) for i in (1, 2, 3) for s in (0, 1)]
    for a, b in zip(single, launched):  # line by line: the lost run back in its place
        assert {k: a.get(k) for k in SAME} == {k: b.get(k) for k in SAME}
    assert table(tiny_env / "single") == table(out) and len(table(out)) == 3


@pytest.mark.parametrize("second", [["--launcher", "local", "--max-parallel", "2"], []],
                         ids=["two-launches", "launch-and-plain-main"])
def test_two_processes_on_one_list_at_once_train_each_shared_model_once(tiny_env, second):
    """Two main.py processes started at the same moment on one list and one CHECKPOINT_DIR
    (two launches; or a launch and a plain main.py without --launcher): each shared model
    (the base model and the retrain reference, class 1 seed 0, both runs use) is trained
    once, each run is run once, runs.jsonl holds each run once in the list's order."""
    path = experiment_list(tiny_env, [{"method": "ft"}, {"method": "ga", "lr": 0.001}], nexp=1)
    out = tiny_env / "out"
    cmds = [launch_command(path, out, "--launcher", "local", "--max-parallel", "2"), launch_command(path, out, *second)]
    procs = [subprocess.Popen(cmd, cwd=tiny_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in cmds]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    logs = "".join(p.read_text(errors="replace") for p in (out / "jobs" / "logs").glob("*_log.out"))
    said = logs + "".join(outputs)  # a plain main.py trains in its own process
    assert said.count("training the base model") == 1 and said.count("training the retrain reference") == 1, said
    ck = tiny_env / "checkpoint_dir"
    assert len(list((ck / "base").glob("*.pt"))) == 1 and len(list((ck / "retrain").glob("*.pt"))) == 1
    assert said.count("=== experiment") == 2  # each run run once, by one of the two processes
    assert [(r["experiment"], r["seed"]) for r in runs(out)] == [(1, 0), (2, 0)]


def test_the_merge_puts_the_lists_runs_in_its_order_and_leaves_other_lines_in_place():
    """Runs recorded out of order (a relaunch finishing what a launch lost) take the list's
    order in the places they hold; a line of another list (an edited experiment) and the
    earlier record of a run recorded twice stay where they are."""
    def record(method, seed, n=0):
        return {"config": {"method": method}, "seed": seed, "n": n}
    runs = [(i, None, seed, run_id({"method": m}, seed)) for i, m in ((1, "ft"), (2, "ga")) for seed in (0, 1)]
    other = record("rl", 0)
    lines = [record("ft", 1), other, record("ga", 1), record("ft", 0), record("ga", 0)]
    assert in_list_order(lines, runs) == [record("ft", 0), other, record("ft", 1), record("ga", 0),
                                          record("ga", 1)]
    twice = [record("ft", 0, n=1), record("ft", 1), record("ft", 0, n=2)]
    assert in_list_order(twice, runs) == [record("ft", 0, n=1), record("ft", 0, n=2), record("ft", 1)]


class Stub(launcher.Job):
    def label(self):
        return {"kind": "run", "name": "stub"}

    def __call__(self):
        return "never run"


def test_local_jobs_each_see_their_own_gpu(tiny_env, monkeypatch):
    """Without GPUs here: 2 GPUs stood in for (CUDA_VISIBLE_DEVICES=3,5), 2 jobs per GPU, 3 at
    once; submitit's local controller is replaced by a process that lives 1 s."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    args = main.build_parser().parse_args(["--launcher", "local", "--jobs-per-gpu", "2", "--max-parallel", "3"])
    assert launcher.local_slots(args) == [3, 5, 3]
    args.max_parallel = 5
    with pytest.raises(UserError, match="more than the 4 GPU slot"):
        launcher.local_slots(args)
    started, alive = [], []

    def controller(folder, command, cuda_devices, **_):
        alive[:] = [p for p in alive if p.poll() is None]
        started.append((cuda_devices, len(alive) + 1))
        alive.append(subprocess.Popen(["sleep", "1"]))
        return alive[-1]
    monkeypatch.setattr(submitit.local.local, "start_controller", controller)
    failures = launcher.run_local([Stub(None) for _ in range(6)], [3, 5, 3], tiny_env / "logs", 10, tiny_env)
    assert sorted(gpu for gpu, _ in started) == ["3", "3", "3", "3", "5", "5"]
    assert max(n for _, n in started) == 3 and len(failures) == 6  # no result: nothing really ran


class FakeSbatch:
    """submitit's call of `sbatch FILE`: keeps the script, answers as sbatch does."""
    scripts: list[str] = []

    def __init__(self, command, verbose=True, **_):
        self.command = command

    def __call__(self):
        assert self.command[0] == "sbatch"
        self.scripts.append(Path(self.command[1]).read_text())
        return f"Submitted batch job {1000 + len(self.scripts)}"


def test_slurm_launch_sends_the_arrays_and_sbatch_options(tiny_env, monkeypatch, capsys):
    monkeypatch.setattr(submitit.core.utils, "CommandFunction", FakeSbatch)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # srun "found"
    monkeypatch.setattr(FakeSbatch, "scripts", [])
    path = experiment_list(tiny_env, [{"method": "retrain"}, {"method": "ft"}, {"method": "ga"}], nexp=2)
    out = tiny_env / "out"
    with pytest.raises(SystemExit) as e:
        run_main(main.main, ["-L", path, "-NL", "--out", str(out), "--launcher", "slurm",
                             "--slurm-partition", "gpu", "--gpus-per-job", "1", "--cpus-per-job", "6",
                             "--timeout-min", "90", "--max-parallel", "4", "--slurm-extra", "qos=high",
                             "--slurm-extra", "account=lab", "--slurm-extra", "exclusive"])
    assert e.value.code == 0, capsys.readouterr().err
    shared, run_array, merge = FakeSbatch.scripts
    # 1 base model and 2 retrain references (seeds 0, 1), each used by 3 runs, come first
    assert "#SBATCH --array=0-2%3" in shared and "--dependency" not in shared
    for line in ("--array=0-5%4", "--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=6", "--time=90",
                 "--requeue", "--qos=high", "--account=lab", "--exclusive", "--signal=USR2@90",
                 "--job-name=unlearn-list", "--dependency=afterany:1001"):
        assert f"#SBATCH {line}\n" in run_array, line
    assert f"export PYTHONPATH={REPO}" in run_array and "-m submitit.core._submit" in run_array
    assert "--array" not in merge and "--gpus-per-node" not in merge and "--dependency=afterany:1002" in merge
    calls = []
    for k in range(6):  # each task of the array: one (experiment, seed) run, pickled
        with open(out / "jobs" / "logs" / f"1002_{k}_submitted.pkl", "rb") as f:
            job = pickle.load(f).function
        calls.append((type(job).__name__, job.index, job.seed, job.ctx.threads))
    assert calls == [("RunJob", i, s, 6) for i in (1, 2, 3) for s in (0, 1)]
    assert [j["job_id"] for j in jobs_of(out)] == ["1001_0", "1001_1", "1001_2", *(f"1002_{k}" for k in range(6)),
                                                   "1003"]
    assert not (out / "runs.jsonl").exists() or not runs(out)  # nothing ran here


@pytest.mark.parametrize("flags, message", [
    (["--launcher", "kubernetes"], "unknown launcher 'kubernetes': use --launcher local or --launcher slurm"),
    (["--launcher", "local", "--slurm-partition", "gpu"], "--slurm-partition goes with --launcher slurm"),
    (["--slurm-partition", "gpu"], "--slurm-partition goes with --launcher slurm"),
    (["--launcher", "local", "--max-parallel", "0"], "--max-parallel must be at least 1, got 0"),
    (["--launcher", "slurm", "--max-parallel", "0"], "--max-parallel must be at least 1, got 0"),
    (["--max-parallel", "2"], "--max-parallel goes with --launcher local or slurm"),
    (["--launcher", "slurm", "--jobs-per-gpu", "2"], "--jobs-per-gpu goes with --launcher local"),
    (["--launcher", "slurm", "--slurm-extra", "=x"], "write an sbatch option as KEY=VALUE"),
    (["--launcher", "local", "--device", "cuda:1"], "each job is given its GPU; use --device cuda"),
    (["--launcher", "local", "--device", "cpu", "--jobs-per-gpu", "2"], "--jobs-per-gpu needs GPUs"),
    (["--status", "--launcher", "local"], "--status launches nothing"),
])
def test_bad_launch_flags_get_one_error_line_and_submit_nothing(tiny_env, capsys, flags, message):
    path = experiment_list(tiny_env, [{"method": "ft"}])
    with pytest.raises(SystemExit) as e:
        run_main(main.main, ["-L", path, "-NL", "--out", str(tiny_env / "out"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tiny_env / "out" / "jobs").exists()


def test_main_refuses_torchrun(tiny_env, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        run_main(main.main, ["-L", experiment_list(tiny_env, [{"method": "ft"}])])
    assert e.value.code == 2 and "use --launcher local" in capsys.readouterr().err


def test_without_submitit_a_list_runs_in_process_and_launching_says_what_to_install():
    # GPU images and laptops may lack submitit: only --launcher / --status need it
    block = "import sys, runpy; sys.modules['submitit'] = None; sys.argv = ['main.py'] + sys.argv[1:]; " \
            "runpy.run_path('main.py', run_name='__main__')"
    root = Path(__file__).resolve().parents[1]
    ok = subprocess.run([sys.executable, "-c", block, "--help"], cwd=root, capture_output=True, text=True)
    assert ok.returncode == 0 and "--launcher" in ok.stdout
    bad = subprocess.run([sys.executable, "-c", block, "-L", "exp/resnet18_fast.json", "--launcher", "local"],
                         cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "needs submitit" in bad.stderr and "pip install -r requirements.txt" in bad.stderr

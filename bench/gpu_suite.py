"""Paper scale on one GPU in minutes (issue 15): one command that runs, each part time-boxed,

  (a) the loader bench (ours against ImageFolder + DataLoader, outside-model-compute share,
      one epoch), the same under --compile, and what SalUn's hard mask costs an epoch;
  (b) a ResNet-18 base model by the fast recipe exp/resnet18_fast.json, trained through our
      loader and through the standard torchvision pipeline (parity; bench/parity.py);
  (c) SalUn's class-wise table (Retrain, FT, GA, RL, SalUn, l1-sparse; Avg. Gap against the
      retrain reference) on full CIFAR-10, base and retrain by the fast recipe;
  (d) the same for 10 % random forgetting;
  (e) ResNet-18 trained on all 50,000 images of clean, ops, lsp and l2-ar data, DFR on ops;
  (f) I-BAU on the release models in DATA_ROOT/ibau_release;
  (g) corrective unlearning, poisoning and interclass confusion, at two identified shares;
  (ref, only when named) SalUn's 182-epoch base recipe, the accuracy the fast one is against;

and writes docs/gpu.md (device, versions, each part's figures and seconds) and docs/gpu.json,
rewritten after every step, so a run cut short still reports what it finished. Every part
drives the project's own scripts (generated experiment lists for main.py) as subprocesses.

    python bench/gpu_suite.py                                    # 9 min at most (540 s)
    python bench/gpu_suite.py --budget 420                       # 7 min: parts past it are cut
    python bench/gpu_suite.py --data-npz .gpu/data.npz --report $OUT/gpu.md   # bench/GPU.md
    python bench/gpu_suite.py --parts a b --part-budget a=120
    python bench/gpu_suite.py --tiny                             # tiny data, a CPU, < 2 min (CI)

Budgets (seconds on an H200, docs/gpu.md) are in bench/gpu_parts.py. A part ends when the
budgets up to and including its own run out, so it may use what earlier parts left, and at
the latest when the total (`--budget`) does; a step still running then is stopped (its process
group) and the part reported as cut, with whatever it had written; a part with less than half
its budget left is skipped and says so. Steps of one `together` group (part (e)'s four models,
part (g)'s two lists) run side by side on the GPU. `--tiny` runs the same parts on 40 training
and 20 test images per class (sliced from DATA_ROOT, else synthetic) with SmallCNN and an
epoch or less each.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cli import run_main  # noqa: E402
from constants import UserError, data_root, results_dir  # noqa: E402
from gpu_parts import FULL, PARTS, ROOT, TINY, Context, Step, fmt  # noqa: E402
from reporting import markdown_table, write_json, write_text_atomic  # noqa: E402

TINY_PER_CLASS = {"train": 40, "test": 20}
UNPACK_TO = "/tmp/unlearnbench-data"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PROBE = """
import json, os, platform, PIL, torch, torchvision, datasets
# the decoded pixels' checksums tell whether this machine's JPEG decoding gives this project's
# CPU machines' pixels (docs/ibau.md "On a GPU": same files, another decoder?)
crc = {("train" if train else "test"): datasets.checksum(datasets.load_split("cifar10", train))
       for train in (True, False)}
cuda = torch.cuda.is_available()
print("PROBE " + json.dumps({"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
      "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda if cuda else None, "torch": torch.__version__,
      "torchvision": torchvision.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
      "pillow": PIL.__version__, "cifar10_crc32": crc}))
"""


class Interrupted(Exception):
    """SIGTERM / SIGINT: stop the running step, write the report, exit."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=None,
                   help="parts to run, in the suite's order (default: a to g)")
    p.add_argument("--skip", nargs="+", choices=list(PARTS), default=[], help="parts not to run")
    p.add_argument("--tiny", action="store_true", help="tiny data, SmallCNN: the same code on a CPU in minutes")
    p.add_argument("--budget", type=float, default=None,
                   help="total seconds (default: the data step plus the chosen parts' budgets; 540 for a to g)")
    p.add_argument("--part-budget", action="append", default=[], metavar="PART=SECONDS",
                   help="one part's budget (repeatable), e.g. c=150")
    p.add_argument("--data-npz", default=None,
                   help="unpack this pack_data.py archive first (pack_data.py must lie next to it)")
    p.add_argument("--unpack-to", default=None, help=f"DATA_ROOT for --data-npz (default {UNPACK_TO})")
    p.add_argument("--report", default=None,
                   help="the Markdown report; the JSON goes beside it (default docs/gpu.md; --tiny: WORK/gpu.md)")
    p.add_argument("--work", default=None, help="checkpoints, results, caches, logs, experiment lists "
                   "(default RESULTS_DIR/gpu_suite[_tiny]/<time>)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of every script")
    return p


def part_budgets(args, scale) -> dict:
    budgets = dict(scale.budgets)
    for item in args.part_budget:
        key, _, value = item.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1
        if key not in budgets or seconds <= 0:
            raise UserError(f"--part-budget {item}: expected PART=SECONDS with PART one of "
                            f"{', '.join(budgets)} and SECONDS > 0")
        budgets[key] = seconds
    return budgets


def chosen_parts(args) -> list[str]:
    keys = args.parts or [k for k, p in PARTS.items() if p.default]
    return [k for k in PARTS if k in keys and k not in args.skip]


# --- data ----------------------------------------------------------------------------------------

def write_tiny_data(dst: Path, src: Path) -> None:
    """40 training and 20 test images per class, copied from the real CIFAR-10 (or synthetic
    PNGs where it is absent), and the I-BAU release models when they are there."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in TINY_PER_CLASS.items():
        for c, name in enumerate(CLASSES):
            out = dst / "cifar10" / split / name
            out.mkdir(parents=True, exist_ok=True)
            real = src / "cifar10" / split / name
            if real.is_dir():
                for f in sorted(real.iterdir())[:n]:
                    shutil.copy(f, out / f.name)
                continue
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                img[..., c % 3] = np.clip(img[..., c % 3].astype(int) + 25 * c, 0, 255)
                Image.fromarray(img).save(out / f"{i:04d}.png")
    if (src / "ibau_release").is_dir():
        shutil.copytree(src / "ibau_release", dst / "ibau_release", dirs_exist_ok=True)


def check_archive(npz: Path) -> None:
    if not npz.is_file() or not (npz.parent / "pack_data.py").is_file():
        raise UserError(f"--data-npz {npz}: need the archive and pack_data.py beside it (bench/GPU.md)")


def unpack_step(npz: Path, root: Path) -> Step | None:
    """pack_data.py's unpack, unless every image is unpacked already (a rerun); the release
    models travel beside the archive (bench/GPU.md) and are copied over."""
    import numpy as np

    if (npz.parent / "ibau_release").is_dir():
        shutil.copytree(npz.parent / "ibau_release", root / "ibau_release", dirs_exist_ok=True)
    with np.load(npz) as archive:
        expected = len(archive["c10_split"]) if "c10_split" in archive else None
    there = sum(1 for _ in (root / "cifar10").rglob("*.jpg")) if (root / "cifar10").is_dir() else 0
    if expected is not None and there == expected:
        return None
    return Step("unpack the data", [str(npz.parent / "pack_data.py"), "unpack", str(npz), str(root)], runtime=False)


# --- running steps -------------------------------------------------------------------------------

class Suite:
    def __init__(self, args, ctx: Context, budgets: dict, keys: list, total: float, report: Path, env: dict,
                 argv: list):
        self.args, self.ctx, self.budgets, self.total = args, ctx, budgets, total
        self.report, self.env, self.argv = report, env, argv
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.machine: dict = {}
        self.procs: list[subprocess.Popen] = []
        self.state = "running"
        self.plan: dict[str, float] = {}  # part -> when its budget runs out, earlier parts' savings included
        end = budgets["data"]
        for key in keys:
            end += budgets[key]
            self.plan[key] = end

    def part_deadline(self, key: str) -> float:
        """A part ends when the budgets up to and including its own run out (so it may use
        what the parts before it left unused), and at the latest when the total does."""
        return self.t0 + min(self.plan[key], self.total)

    def command(self, step: Step, side_by_side: int = 1) -> list[str]:
        threads = self.args.threads or (max(1, (os.cpu_count() or 1) // side_by_side) if side_by_side > 1 else None)
        runtime = ["-NL"] + (["--threads", str(threads)] if threads else [])
        return [sys.executable, *step.argv, *(runtime if step.runtime else [])]

    def shown(self, argv: list[str]) -> str:
        text = " ".join(shlex.quote(a) for a in ["python", *argv[1:]])
        return text.replace(str(self.ctx.work), "$WORK").replace(str(ROOT) + "/", "")

    def run_step(self, step: Step, part: str, into: list, deadline: float) -> dict:
        return self.run_steps([step], part, into, deadline)[0]

    def run_steps(self, steps: list, part: str, into: list, deadline: float) -> list[dict]:
        """Run `steps` side by side (one: alone) until each ends or `deadline`; their records
        go into `into` first, so an interrupted suite still lists them."""
        recs, logs = [], []
        try:
            for step in steps:
                argv = self.command(step, len(steps))
                log = self.ctx.work / "logs" / f"{part}_{len(into)}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                rec = {"name": step.name, "command": self.shown(argv), "log": str(log), "status": "running",
                       "started": time.monotonic()}
                if len(steps) > 1:
                    rec["side_by_side"] = len(steps)
                into.append(rec)
                recs.append(rec)
                logs.append(open(log, "w"))
                self.procs.append(subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=logs[-1],
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))  # its group: a cut stops its workers
            running = list(zip(recs, self.procs))
            end = max(deadline, time.monotonic() + 1.0)
            while running:  # each step's seconds end when it does, not when the others do
                time.sleep(0.05)
                for rec, proc in list(running):
                    rc = proc.poll()
                    if rc is None and time.monotonic() < end:
                        continue
                    rec.update(status="cut" if rc is None else "done" if rc == 0 else "failed", rc=rc)
                    rec["seconds"] = time.monotonic() - rec.pop("started")
                    running.remove((rec, proc))
        finally:
            self.stop_child()
            for f in logs:
                f.close()
        for rec in recs:
            if rec["status"] == "failed":
                rec["tail"] = Path(rec["log"]).read_text(errors="replace").splitlines()[-15:]
        return recs

    def stop_child(self) -> None:
        """Stop every step still running (its process group)."""
        procs, self.procs = self.procs, []
        for proc in procs:
            if proc.poll() is not None:
                continue
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break

    # --- the data step and the parts ----------------------------------------------------------

    def prepare_data(self) -> None:
        rec = {"title": "unpack and decode the data", "status": "running", "budget_s": self.budgets["data"],
               "steps": []}
        self.ctx.results["data"] = rec
        t0 = time.monotonic()
        npz = Path(self.args.data_npz).resolve() if self.args.data_npz else None
        source = Path(self.args.unpack_to or UNPACK_TO).resolve() if npz else data_root().resolve()
        unpack = unpack_step(npz, source) if npz else None
        if unpack:  # no cut here: every part needs the data
            self.run_step(unpack, "data", rec["steps"], self.t0 + self.total)
        if self.ctx.tiny:
            write_tiny_data(self.ctx.data_root, source)
        decode = Step("decode CIFAR-10 into the cache", ["-c", PROBE], runtime=False)
        self.run_step(decode, "data", rec["steps"], self.t0 + self.total)
        log = Path(rec["steps"][-1]["log"]).read_text(errors="replace")
        probe = [line for line in log.splitlines() if line.startswith("PROBE ")]
        if probe:
            self.machine = json.loads(probe[-1][len("PROBE "):])
        rec["status"] = "done" if all(s["status"] == "done" for s in rec["steps"]) else "failed"
        rec["seconds"] = time.monotonic() - t0
        self.write()

    def run_part(self, key: str) -> None:
        part = PARTS[key]
        t0 = time.monotonic()
        deadline = self.part_deadline(key)
        budget = deadline - t0
        rec = {"title": part.title, "status": "running", "budget_s": self.budgets[key], "steps": [],
               "figures": {}, "markdown": "", "note": ""}
        self.ctx.results[key] = rec
        if budget < 0.5 * self.budgets[key]:
            rec.update(status="skipped", seconds=0.0,
                       note=f"skipped: {max(0.0, budget):.0f} s of the budget left for it, its own budget "
                            f"is {self.budgets[key]:.0f} s")
            self.write()
            return
        rec["started"] = t0
        steps = part.steps(self.ctx)
        if not steps:
            rec["note"] = "nothing to run here (its inputs are absent)"
        for group in side_by_side(steps):
            if time.monotonic() >= deadline:
                rec["steps"] += [{"name": step.name, "command": self.shown(self.command(step)),
                                  "status": "skipped", "seconds": 0.0} for step in group]
                continue
            self.run_steps(group, key, rec["steps"], deadline)
            rec["seconds"] = time.monotonic() - t0
            self.collect(key)
            self.write()
        statuses = {s["status"] for s in rec["steps"]}
        rec["status"] = ("failed" if "failed" in statuses else "cut" if statuses & {"cut", "skipped"}
                         else "done" if steps else "skipped")
        if rec["status"] == "cut":
            rec["note"] = (rec["note"] + f" cut at its budget of {budget:.0f} s: the figures are what finished").strip()
        rec["seconds"] = time.monotonic() - rec.pop("started")
        self.collect(key)
        self.write()

    def collect(self, key: str) -> None:
        rec = self.ctx.results[key]
        try:
            rec["figures"], rec["markdown"] = PARTS[key].collect(self.ctx, rec["steps"])
        except Exception as e:  # a half-written result must not lose the report
            rec["markdown"] = f"(could not read the results: {type(e).__name__}: {e})\n"

    # --- the report ----------------------------------------------------------------------------

    def write(self) -> None:
        elapsed = time.monotonic() - self.t0
        write_json(self.report.with_suffix(".json"), {
            "argv": self.argv, "tiny": self.ctx.tiny, "started": self.started, "state": self.state,
            "elapsed_s": elapsed, "budget_s": self.total, "machine": self.machine, "work": str(self.ctx.work),
            "parts": self.ctx.results})
        write_text_atomic(self.report, render(self, elapsed))


def side_by_side(steps: list) -> list[list]:
    """The steps in runs: consecutive steps of one `together` group run side by side, the
    others alone."""
    groups: list[list] = []
    for step in steps:
        if groups and step.together and groups[-1][-1].together == step.together:
            groups[-1].append(step)
        else:
            groups.append([step])
    return groups


def fmt_s(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) else "–"


def render(suite: Suite, elapsed: float) -> str:
    m, results = suite.machine, suite.ctx.results
    lines = ["# GPU suite: the papers at scale on one GPU", "",
             f"`python bench/gpu_suite.py {' '.join(suite.argv)}`: {suite.state}, {elapsed:.0f} s of a "
             f"{suite.total:.0f} s budget, started {suite.started}. Written by the suite (after every step).", "",
             f"Machine: {m.get('device', '?')} ({m.get('gpus', 0)} GPU(s), CUDA {m.get('cuda')}), {m.get('cpus', '?')} "
             f"CPU cores; torch {m.get('torch', '?')}, torchvision {m.get('torchvision', '?')}, Python "
             f"{m.get('python', '?')}, Pillow {m.get('pillow', '?')}; the decoded CIFAR-10's CRC-32 "
             f"(`datasets.checksum`) {m.get('cifar10_crc32', '?')}." + (" **--tiny: tiny data, SmallCNN; the figures mean nothing.**"
                                            if suite.ctx.tiny else ""), ""]
    rows = [{"part": k, "what": r["title"], "status": r["status"], "seconds": fmt_s(r.get("seconds")),
             "budget (s)": f"{r['budget_s']:.0f}"} for k, r in results.items()]
    lines += [markdown_table(rows, ["part", "what", "status", "seconds", "budget (s)"])]
    fast = results.get("b", {}).get("figures", {})
    long, ref = results.get("long", {}).get("figures", {}), results.get("ref", {}).get("figures", {})

    def trained(fig, part, minutes):
        return (f"{fmt(fig.get('test_acc'))} % in {fmt_s(fig.get('train_s'))} s" if fig.get("test_acc") is not None
                else f"not run (`--parts {part}`: about {minutes} on an H100)")
    lines += ["## The fast recipe against SalUn's 182-epoch recipe", "",
              f"- `resnet18_fast` (exp/resnet18_fast.json): {fmt(fast.get('test_acc'))} % test accuracy, "
              f"{fmt_s(fast.get('train_s'))} s of training (with per-epoch evaluation)",
              f"- the same over {suite.ctx.scale.long_epochs} epochs: {trained(long, 'long', '1 min')}",
              f"- SalUn's 182 epochs (exp/table1_classwise.json's base): {trained(ref, 'ref', '5 min')}", ""]
    for key, r in results.items():
        if key == "data":
            continue
        lines += [f"## ({key}) {r['title']}", ""]
        if r.get("note"):
            lines += [f"*{r['note']}*", ""]
        lines += [r.get("markdown") or "(nothing finished)", ""]
        steps = [{"command": f"`{s['command']}`", "status": s["status"], "seconds": fmt_s(s.get("seconds"))}
                 for s in r["steps"]]
        lines += [f"`{s['command'][:60]}...` ended with: `{s['tail'][-1]}`" for s in r["steps"] if s.get("tail")]
        if steps:
            lines += [markdown_table(steps, ["command", "status", "seconds"])]
    return "\n".join(lines).rstrip() + "\n"


def child_env(ctx: Context) -> dict:
    return {**os.environ, "DATA_ROOT": str(ctx.data_root), "CHECKPOINT_DIR": str(ctx.work / "checkpoints"),
            "RESULTS_DIR": str(ctx.work / "results"), "CACHE_DIR": str(ctx.work / "cache"),
            "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    scale = TINY if args.tiny else FULL
    budgets = part_budgets(args, scale)
    keys = chosen_parts(args)
    if not keys:
        raise UserError("no part left to run: check --parts and --skip")
    if args.threads is not None and args.threads <= 0:
        raise UserError("--threads must be positive")
    total = args.budget if args.budget is not None else budgets["data"] + sum(budgets[k] for k in keys)
    if total <= 0:
        raise UserError("--budget must be positive")
    if args.unpack_to and not args.data_npz:
        raise UserError("--unpack-to goes with --data-npz")
    if args.data_npz:
        check_archive(Path(args.data_npz).resolve())
    stamp = time.strftime("%Y%m%d_%H%M%S")
    work = Path(args.work or results_dir() / ("gpu_suite_tiny" if args.tiny else "gpu_suite") / stamp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = Path(args.unpack_to or UNPACK_TO).resolve() if args.data_npz else data_root().resolve()
    if args.tiny:
        root = work / "data"  # sliced from the data above by Suite.prepare_data
    report = Path(args.report or (work / "gpu.md" if args.tiny else ROOT / "docs" / "gpu.md")).resolve()
    ctx = Context(tiny=args.tiny, scale=scale, work=work, data_root=root, results={})
    suite = Suite(args, ctx, budgets, keys, total, report, child_env(ctx), sys.argv[1:] if argv is None else list(argv))

    def interrupt(signum, frame):
        raise Interrupted()

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        suite.prepare_data()
        for key in keys:
            if ctx.results["data"]["status"] != "done":  # nothing can run without the data
                ctx.results[key] = {"title": PARTS[key].title, "status": "skipped", "budget_s": budgets[key],
                                    "steps": [], "note": "skipped: the data step failed (see its log)"}
                continue
            suite.run_part(key)
        suite.state = "finished"
    except Interrupted:
        suite.stop_child()
        suite.state = "interrupted"
        now = time.monotonic()
        for rec in [*ctx.results.values(), *(s for r in ctx.results.values() for s in r["steps"])]:
            if rec["status"] == "running":  # what the interrupt stopped
                rec["status"] = "cut"
                rec["seconds"] = now - rec.pop("started", now)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        suite.write()
    print(f"{suite.state} in {time.monotonic() - suite.t0:.0f} s -> {report} and {report.with_suffix('.json')}")
    failed = [k for k, r in ctx.results.items() if r["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (see the report's commands and their logs in {work / 'logs'})")
    return 1 if failed or suite.state != "finished" else 0


if __name__ == "__main__":
    run_main(main)

"""The parts of bench/gpu_suite.py: what each runs (the project's own scripts, with generated
experiment lists) and how its figures are read back from the files those scripts write.

Each part is `Part(key, title, steps, collect)`: `steps(ctx)` returns the commands, built when
the part starts (so a part can use an earlier part's model), `collect(ctx, runs)` returns
(figures, Markdown) from whatever the commands left, also after a cut. `Scale` holds every
size that differs between a GPU run and `--tiny`; the budgets are seconds on one H200 (docs/gpu.md).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECIPE_FILE = ROOT / "exp" / "resnet18_fast.json"
RELEASE = {"cifar10": "badnets_8_02_ckpt.pth", "gtsrb": "gtsrbbadnets_8_02_ckpt.pth"}
DIVERGENCE = "ibau_divergence.json"  # part (f): bench/ibau_divergence.py's figures
POISONS = ("clean", "ops", "lsp", "l2-ar")
DFR_POISON = "ops"
MANIPULATIONS = ("poisoning", "interclasslabelswap")
# the corrective methods, one setting each (the CPU sweep's usual choice on validation)
CORRECTIVE_METHODS = [("EU", {"k": -1}), ("CF", {"k": -1}), ("scrub", {"alpha": 0.1}), ("BadT", {}),
                      ("SSD", {"SSDselectwt": 10.0, "SSDdampening": 10.0})]


@dataclass(frozen=True)
class Scale:
    model: str
    recipe: dict  # on top of exp/resnet18_fast.json's base recipe
    loader: tuple  # bench/loader_bench.py flags
    compile: bool  # also time the loader bench under --compile
    mask: tuple  # bench/mask_bench.py flags
    parity: tuple  # bench/parity.py flags besides the recipe
    unlearn_epochs: int  # cap on the unlearning epochs of the SalUn tables
    table: dict  # keys added to the SalUn tables' experiment lists
    poison_epochs: int
    dfr: tuple  # dfr_step_2.py flags
    ibau: tuple  # defense.py flags
    corrective: dict  # defaults of the corrective lists
    corrective_epochs: int  # the manipulated model's and EU's epochs (the fast recipe's otherwise)
    fractions: tuple  # identified shares of S_m
    ref: tuple  # train.py flags of the 182-epoch reference (its defaults are SalUn's recipe)
    long_epochs: int  # part (long): the fast recipe with this many epochs
    budgets: dict = field(default_factory=dict)  # part -> seconds; "data": unpacking + decoding


FULL = Scale(
    model="resnet18", recipe={},
    loader=("--batch-size", "512", "--steps", "100", "--warmup", "10", "--repeats", "2"),
    compile=True, mask=("--epochs", "1", "--repeats", "2"), parity=(),
    unlearn_epochs=5, table={},
    poison_epochs=6, dfr=("--num-dfr-train", "5000"), ibau=(),
    corrective={"forget_set_size": 500, "unlearn_iters": 100, "batch_size": 512},
    corrective_epochs=6, fractions=(0.1, 1.0), ref=("--model", "resnet18"), long_epochs=40,
    # issue 15's 9 minutes. Run 1 on the H200 (docs/gpu.md, eager steps, 8-epoch models in (e)
    # and (g), one after another) needed 810 s; these are its measured seconds scaled to the
    # CUDA-graph step (now also FT, RL and SalUn), 6-epoch models and (e)'s and (g)'s runs side
    # by side: estimates until a GPU run measures them. A part may use what earlier ones left.
    budgets={"data": 45, "a": 130, "b": 65, "c": 70, "d": 65, "e": 65, "f": 45, "g": 55, "long": 90, "ref": 420})

TINY = Scale(
    model="smallcnn", recipe={"epochs": 1, "batch_size": 64, "lr": 0.05},
    loader=("--batch-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1", "--workers", "0",
            "--epoch"),
    compile=False, mask=("--epochs", "1", "--repeats", "1", "--batch-size", "64"),
    parity=("--workers", "0"),
    unlearn_epochs=1, table={"mia_cap": 100},
    poison_epochs=1, dfr=("--num-dfr-train", "100", "--dfr-steps", "2", "--dfr-iters", "2"),
    ibau=("--n-clean", "100", "--n-rounds", "1", "--n-eval", "100", "--K", "2"),
    corrective={"forget_set_size": 20, "unlearn_iters": 2, "batch_size": 64},
    corrective_epochs=1, fractions=(0.5, 1.0),
    ref=("--model", "smallcnn", "--epochs", "1", "--batch-size", "64"), long_epochs=2,
    budgets={"data": 60, "a": 120, "b": 120, "c": 120, "d": 120, "e": 120, "f": 120, "g": 120, "long": 120, "ref": 120})


@dataclass
class Step:
    name: str
    argv: list  # a script and its flags, run as `python <argv>` in the repository root
    runtime: bool = True  # append the runtime flags (-NL, --threads)
    together: str | None = None  # consecutive steps of one group run side by side (the GPU shared)


@dataclass
class Context:
    tiny: bool
    scale: Scale
    work: Path
    data_root: Path
    results: dict  # part key -> its record so far (status, figures)

    def out(self, *names) -> Path:
        return self.work.joinpath("results", *names)

    def recipe(self) -> dict:
        """The fast recipe (exp/resnet18_fast.json's base), scaled for --tiny."""
        base = json.loads(RECIPE_FILE.read_text())["defaults"]["base"]
        return {**base, **self.scale.recipe}

    def write_list(self, name: str, defaults: dict, experiments: list) -> Path:
        from reporting import write_text_atomic

        return write_text_atomic(self.work / "exp" / f"{name}.json",
                                 json.dumps({"defaults": defaults, "experiments": experiments}, indent=1))


@dataclass
class Part:
    key: str
    title: str
    steps: Callable[[Context], list]
    collect: Callable[[Context, list], tuple]
    default: bool = True


def recipe_flags(recipe: dict) -> list[str]:
    """The recipe as bench/parity.py flags (the file's keys, the suite's scale on top)."""
    names = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "schedule": "--schedule",
             "warmup": "--warmup", "label_smoothing": "--label-smoothing", "weight_decay": "--wd",
             "momentum": "--momentum"}
    out = [x for k, flag in names.items() if k in recipe for x in (flag, str(recipe[k]))]
    return out + (["--nesterov"] if recipe.get("nesterov") else [])


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def read_runs(path: Path) -> list[dict]:
    """main.py's records; a last line cut off by a stopped run is left out."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def fmt(v, digits=2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "–"


def table(rows: list[dict], columns: list[str]) -> str:
    from reporting import markdown_table

    return markdown_table(rows, columns) if rows else "(nothing finished)\n"


# --- (a) the loader bench, compile, the mask's cost -------------------------------------------

LOADER_PATTERNS = {
    "ours_images_per_s": r"ours\s*:\s*([\d.]+) images/s",
    "ours_ms_per_step": r"ours\s*:.*\(([\d.]+) ms/step\)",
    "input_pct": r"input pipeline.*= ([\d.]+) % of step time",
    "outside_compute_pct": r"outside model compute: .*= ([\d.]+) % of step time",
    "standard_images_per_s": r"standard\s*:\s*([\d.]+) images/s",
    "speedup": r"speed-up\s*:\s*([\d.]+)x",
    "epoch_s": r"one epoch measured .*: ([\d.]+) s",
}


def parse_loader_bench(text: str) -> dict:
    out = {}
    for key, pattern in LOADER_PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    return out


def loader_steps(ctx: Context) -> list:
    base = ["bench/loader_bench.py", "--model", ctx.scale.model, *ctx.scale.loader, "--profile"]
    steps = [Step("loader bench, eager", [*base, "--json", str(ctx.out("a", "loader_eager.json"))]),
             Step("mask cost", ["bench/mask_bench.py", "--model", ctx.scale.model, *ctx.scale.mask,
                                "--profile", "--json", str(ctx.out("a", "mask.json"))])]
    if ctx.scale.compile:  # last: its compilation is the longest and the likeliest to be cut
        steps.append(Step("loader bench, --compile", [*base, "--compile", "--skip-standard", "--repeats", "1",
                                                      "--json", str(ctx.out("a", "loader_compile.json"))]))
    return steps


def profile_md(eager: dict, comp: dict) -> str:
    """What stands in the way of the step: bench/step_profile.py's figures as Markdown."""
    lines = []
    for name, fig in (("eager", eager), ("--compile", comp)):
        prof = (fig.get("profile") or {}).get("fit") or {}
        if "gpu_kernel_ms_per_step" in prof:
            lines.append(f"- {name}: GPU kernels {fmt(prof['gpu_kernel_ms_per_step'])} ms of the "
                         f"{fmt(prof['unprofiled_ms_per_step'])} ms step ({fmt(prof['gpu_busy_pct'], 1)} % busy), "
                         f"{fmt(prof['kernels_per_step'], 0)} kernels and {fmt(prof['cpu_ops_per_step'], 0)} "
                         f"aten calls a step.")
        elif "top_ops" in prof:
            lines.append(f"- {name} (CPU): {fmt(prof['cpu_ops_per_step'], 0)} aten calls a step, "
                         f"{fmt(prof['profiled_wall_ms_per_step'])} ms a step under the profiler.")
    prof = (eager.get("profile") or {})
    opt, graph, steps = prof.get("optimizer_s"), prof.get("cuda_graph_s"), eager.get("steps")
    if isinstance(opt, dict) and "fused" in opt and steps:
        lines.append(f"- bare step (no input, no metrics): foreach optimizer {fmt(1000 * opt['foreach'] / steps)} ms, "
                     f"fused {fmt(1000 * opt['fused'] / steps)} ms (used inside the CUDA graph).")
    if isinstance(graph, (int, float)) and steps:
        lines.append(f"- the bare step captured whole in one CUDA graph: {fmt(1000 * graph / steps)} ms "
                     f"(no launch overhead at all).")
    dyn = comp.get("profile", {}).get("dynamo") if comp else None
    if isinstance(dyn, dict) and "stats" in dyn:
        lines.append(f"- torch.compile: {dyn['stats']}, graph breaks {sum(dyn['graph_breaks'].values())}.")
    top = ((eager.get("profile") or {}).get("fit") or {}).get("top_kernels") or []
    md = "\n".join(lines) + "\n"
    if top:
        md += "\nTop kernels of the eager step (ms a step, calls a step):\n\n" + table(
            [{"kernel": k["name"][:70], "ms": fmt(k["ms_per_step"], 3), "calls": fmt(k["calls_per_step"], 1)}
             for k in top[:10]], ["kernel", "ms", "calls"])
    return md


def loader_collect(ctx: Context, runs: list) -> tuple:
    logs = {r["name"]: Path(r["log"]).read_text(errors="replace") for r in runs if Path(r["log"]).is_file()}
    eager = read_json(ctx.out("a", "loader_eager.json")) or parse_loader_bench(logs.get("loader bench, eager", ""))
    comp = (read_json(ctx.out("a", "loader_compile.json"))
            or parse_loader_bench(logs.get("loader bench, --compile", "")))
    mask = read_json(ctx.out("a", "mask.json")) or {}
    figures = {"eager": eager, "compile": comp, "mask": mask}
    targets = [
        ("ours / standard pipeline (images/s)", fmt(eager.get("speedup")) + "×", "≥ 3.0×"),
        ("ours, images/s", fmt(eager.get("ours_images_per_s"), 0), ""),
        ("standard (ImageFolder + DataLoader), images/s", fmt(eager.get("standard_images_per_s"), 0), ""),
        ("outside model compute, % of the step", fmt(eager.get("outside_compute_pct")), "≤ 5 %"),
        ("input pipeline, % of the step", fmt(eager.get("input_pct")), ""),
        ("--compile, images/s", fmt(comp.get("ours_images_per_s"), 0), "> eager"),
        ("one epoch through engine.fit, s", fmt(eager.get("epoch_s")), "≤ 1.0 s"),
        ("one epoch under --compile, s", fmt(comp.get("epoch_s")), ""),
        ("SalUn's mask, % of an epoch (salun vs rl_split)", fmt(mask.get("mask_cost_pct")), "≤ 5 %"),
        ("computing the mask, s", fmt(mask.get("mask_compute_s"), 3), ""),
    ]
    check = mask.get("graph_check")
    if check:  # on CUDA: SalUn's step replayed as a graph against never captured (mask_bench.graph_check)
        targets.append((f"SalUn as a CUDA graph vs never captured ({check['steps']} steps): largest weight "
                        "difference; masked coordinates unchanged",
                        f"{check['max_weight_diff']:.1e}; {check['masked_unchanged']}", "0; True"))
    md = table([{"figure": a, "measured": b, "target": c} for a, b, c in targets], ["figure", "measured", "target"])
    prof = profile_md(eager, comp)
    return figures, md + ("\nWhat stands in the way (`--profile`, bench/step_profile.py):\n\n" + prof
                          if prof.strip() else "")


# --- (b) the fast recipe's base model, parity with torchvision ------------------------------------

def base_checkpoint(ctx: Context) -> Path:
    return ctx.work / "checkpoints" / "base_fast.pt"


def base_steps(ctx: Context) -> list:
    return [Step("fast recipe: ours and the torchvision pipeline",
                 ["bench/parity.py", "--model", ctx.scale.model, "--recipe", str(RECIPE_FILE),
                  *recipe_flags(ctx.scale.recipe), *ctx.scale.parity, "--save", str(base_checkpoint(ctx)),
                  "--json", str(ctx.out("b", "parity.json"))])]


def base_collect(ctx: Context, runs: list) -> tuple:
    res = read_json(ctx.out("b", "parity.json"))
    if not res:
        return {}, "(nothing finished)\n"
    s, r = res["summary"], res["recipe"]
    figures = {"test_acc": s.get("ours_test_acc"), "standard_test_acc": s.get("standard_test_acc"),
               "gap": s.get("gap"), "train_s": s.get("ours_seconds"), "standard_train_s": s.get("standard_seconds"),
               "recipe": r, "n_train": res["n_train"], "checkpoint": res["checkpoint"]}
    rows = [{"pipeline": "ours (train_classifier)", "test acc. (%)": fmt(s.get("ours_test_acc")),
             "seconds": fmt(s.get("ours_seconds"), 1) + " (training + per-epoch evaluation)"},
            {"pipeline": "torchvision ImageFolder + DataLoader", "test acc. (%)": fmt(s.get("standard_test_acc")),
             "seconds": fmt(s.get("standard_seconds"), 1) + " (training)"}]
    md = (f"Recipe `resnet18_fast` ({RECIPE_FILE.relative_to(ROOT)}): {r['epochs']} epochs, batch "
          f"{r['batch_size']}, SGD lr {r['lr']} momentum {r['momentum']}{' nesterov' if r['nesterov'] else ''}, "
          f"wd {r['weight_decay']}, {r['schedule']} schedule, warm-up {r['warmup']}, label smoothing "
          f"{r['label_smoothing']}; {res['n_train']} training images. Parity gap (ours − standard) "
          f"{fmt(s.get('gap'))} points (target: within 0.5).\n\n" + table(rows, list(rows[0])))
    return figures, md


# --- (c), (d) SalUn's tables with the fast recipe --------------------------------------------------

def salun_list(ctx: Context, name: str, forget: dict) -> Path:
    spec = json.loads(RECIPE_FILE.read_text())
    defaults = {k: v for k, v in spec["defaults"].items() if k != "class_to_forget"}
    defaults.update(forget, model=ctx.scale.model, base=ctx.recipe(), nexp=1, **ctx.scale.table)
    if base_checkpoint(ctx).is_file():  # (b)'s model (written whole, at its end): trained once
        defaults["checkpoint"] = str(base_checkpoint(ctx))
    experiments = [{**e, "epochs": min(e["epochs"], ctx.scale.unlearn_epochs)} if "epochs" in e else e
                   for e in spec["experiments"]]
    return ctx.write_list(name, defaults, experiments)


def salun_steps(name: str, forget: dict) -> Callable:
    def steps(ctx: Context) -> list:
        path = salun_list(ctx, name, forget)
        return [Step(f"main.py -L {path.name}", ["main.py", "-L", str(path), "--out", str(ctx.out(name))])]
    return steps


SALUN_COLUMNS = {"UA": "UA", "RA": "RA", "TA": "TA", "MIA": "MIA", "gap": "Avg. Gap", "time_s": "time (s)",
                 "mask_s": "of it the mask (s)"}


def salun_collect(name: str) -> Callable:
    def collect(ctx: Context, runs: list) -> tuple:
        records = read_runs(ctx.out(name, "runs.jsonl"))
        figures = {r["name"]: {k: r.get(k) for k in SALUN_COLUMNS} for r in records}
        rows = [{"method": r["name"], **{h: fmt(r.get(k)) for k, h in SALUN_COLUMNS.items()}} for r in records]
        if not records:
            return figures, "(nothing finished)\n"
        base = records[0]["base"]
        figures["base_test_acc"] = base.get("test_acc")
        where = "part (b)'s model" if base.get("checkpoint") == str(base_checkpoint(ctx)) else "trained by main.py"
        note = (f"Base model ({where}): test acc. {fmt(base.get('test_acc'))} %; {records[0]['forget']}, "
                f"{records[0]['n_forget']} forget / {records[0]['n_retain']} retain images; one seed; the "
                f"unlearning epochs capped at {ctx.scale.unlearn_epochs}.\n\n")
        return figures, note + table(rows, ["method", *SALUN_COLUMNS.values()])
    return collect


# --- (e) ResNet-18 on clean and poisoned data, DFR -------------------------------------------------

POISON_LR = 0.1  # dfr_step_1.py has no warm-up: at the fast recipe's 0.2 the clean model reached
# only 55.8 % in 8 epochs on the H200 (its first epoch's loss above chance's); 0.1 is untested there


def poison_steps(ctx: Context) -> list:
    r = ctx.recipe()
    train = ["--model", ctx.scale.model, "--epochs", str(ctx.scale.poison_epochs), "--lr", str(POISON_LR),
             "--batch-size", str(r["batch_size"]), "--scheduler", "cosine", "--save-every", "-1"]
    # side by side: each process spends seconds starting, loading and evaluating while the
    # others keep the GPU busy; the figures here are accuracies, not speeds
    steps = [Step(f"dfr_step_1.py {p}", ["dfr_step_1.py", p, *train], together="poisons") for p in POISONS]
    dfr = Step(f"dfr_step_2.py {DFR_POISON}", ["dfr_step_2.py", DFR_POISON, "--model", ctx.scale.model,
                                                "--epoch", "-1", "--random-init", *ctx.scale.dfr])
    return steps + [dfr]


def poison_collect(ctx: Context, runs: list) -> tuple:
    figures, rows = {}, []
    for p in POISONS:
        found = sorted(ctx.out("dfr", p).glob("*/train.json"))
        meta = read_json(found[0])["meta"] if found else {}
        figures[p] = {"test_acc": meta.get("test_acc"), "train_s": meta.get("train_seconds_this_process")}
        row = {"training data": p, "clean test acc. (%)": fmt(meta.get("test_acc")),
               "train seconds": fmt(meta.get("train_seconds_this_process"), 1), "after DFR (%)": ""}
        if p == DFR_POISON:
            dfr = sorted(ctx.out("dfr", p).glob("*/num_dfr=*/cached/epoch=*.json"))
            rand = sorted(ctx.out("dfr", p).glob("*/num_dfr=*/cached/random-init.json"))
            after = read_json(dfr[-1])["dfr_test_acc"] if dfr else None
            baseline = read_json(rand[0])["dfr_test_acc"] if rand else None
            figures["dfr"] = {"poison": p, "dfr_test_acc": after, "random_init_dfr_test_acc": baseline}
            row["after DFR (%)"] = f"{fmt(after)} (random net: {fmt(baseline)})"
        rows.append(row)
    md = (f"dfr_step_1.py on all training images, {ctx.scale.poison_epochs} epochs, batch "
          f"{ctx.recipe()['batch_size']}, lr {POISON_LR}, cosine (its own loop: no warm-up or label "
          f"smoothing), the {len(POISONS)} models trained side by side on one GPU (their seconds are "
          f"not one model's speed); DFR (dfr_step_2.py) on the last {DFR_POISON} checkpoint.\n\n")
    return figures, md + table(rows, list(rows[0]))


# --- (f) I-BAU on the release models -------------------------------------------------------------

def ibau_steps(ctx: Context) -> list:
    steps = []
    for dataset, name in RELEASE.items():
        model = ctx.data_root / "ibau_release" / name
        data = ctx.data_root / ("gtsrb/gtsrb32.npz" if dataset == "gtsrb" else "cifar10/test")
        if model.is_file() and data.exists():
            tag = f"release_{dataset}"
            steps.append(Step(f"defense.py {tag}", [
                "defense.py", "--poi-path", str(model), "--dataset", dataset, "--tag", tag, "--out", str(ctx.out("f")),
                "--save", str(ctx.work / "checkpoints" / f"ibau_{dataset}.pt"), *ctx.scale.ibau]))
    if any(s.name == "defense.py release_cifar10" for s in steps) and "--device" not in ctx.scale.ibau:
        # On an H200 the CIFAR-10 model kept ~90 % ASR where a CPU reaches 0.1 % in round 1
        # (docs/ibau.md), and neither TF32, bf16 evaluation, kept denormals, torch 2.11 nor
        # another summation order reproduces that on a CPU: round 1 on this machine's GPU and
        # its CPU, same data and torch, compared stage by stage (δ, the hypergradient, the
        # outcome). First in the part: should the part be cut, this is what tells most
        model = ctx.data_root / "ibau_release" / RELEASE["cifar10"]
        devices = ("cpu", "cpu") if ctx.tiny else ("cuda", "cpu")
        steps.insert(0, Step("ibau_divergence.py release_cifar10", [
            "bench/ibau_divergence.py", "--devices", *devices, "--plain-layers", "--json", str(ctx.out("f", DIVERGENCE)),
            "--", "--poi-path", str(model), "--dataset", "cifar10", *ctx.scale.ibau, "--n-rounds", "1"]))
    return steps


def ibau_collect(ctx: Context, runs: list) -> tuple:
    figures, rows = {}, []
    for dataset, name in RELEASE.items():
        tag = f"release_{dataset}"
        res = read_json(ctx.out("f", f"{tag}.json"))
        if not res:
            continue
        s = res["summary"]
        figures[dataset] = {k: s.get(k) for k in ("acc_before", "asr_before", "acc", "asr", "seconds", "n_clean")}
        figures[dataset]["asr_by_round"] = [r.get("asr") for r in res["rounds"]]
        rows.append({"release model": name, "clean images": s.get("n_clean"), "rounds": len(res["rounds"]) - 1,
                     "ACC before → after": f"{fmt(s['acc_before'])} → {fmt(s['acc'])}",
                     "ASR before → after": f"{fmt(s['asr_before'])} → {fmt(s['asr'])}",
                     "seconds": fmt(s.get("seconds"), 1)})
    ran = {r["name"].split()[-1]: r.get("status") for r in runs if r["name"].startswith("defense.py")}
    absent = [n for d, n in RELEASE.items() if d not in figures and f"release_{d}" not in ran]
    unfinished = [f"{n} ({ran[f'release_{d}']})" for d, n in RELEASE.items()
                  if d not in figures and f"release_{d}" in ran]
    note = (f"Not run (model or data absent under DATA_ROOT): {', '.join(absent)}.\n\n" if absent else "")
    note += (f"Started, no result (see its log: rounds printed before the cut): {', '.join(unfinished)}.\n\n"
             if unfinished else "")
    md = note + table(rows, list(rows[0]) if rows else [])
    divergence = read_json(ctx.out("f", DIVERGENCE))
    if divergence:
        figures["divergence"] = divergence["runs"]
        md += ("\nRound 1 of the CIFAR-10 model on each device of this machine, compared "
               f"(bench/ibau_divergence.py):\n\n{divergence['markdown'].rstrip()}\n")
    return figures, md


# --- (g) corrective unlearning: poisoning, interclass confusion --------------------------------------

def corrective_steps(ctx: Context) -> list:
    steps = []
    for manip in MANIPULATIONS:
        n = ctx.scale.corrective["forget_set_size"]
        defaults = {"model": ctx.scale.model, "dataset": "cifar10", "dataset_method": manip, "nexp": 1,
                    **ctx.scale.corrective, "base": {**ctx.recipe(), "epochs": ctx.scale.corrective_epochs}}
        experiments = [{"unlearn_method": m, "deletion_size": int(round(f * n)), **params,
                        "tag": f"{m} {int(round(100 * f))}%"}
                       for f in ctx.scale.fractions for m, params in CORRECTIVE_METHODS]
        path = ctx.write_list(f"g_{manip}", defaults, experiments)
        steps.append(Step(f"main.py -L {path.name}", ["main.py", "-L", str(path), "--out", str(ctx.out(f"g_{manip}"))],
                          together="manipulations"))  # side by side, as (e)'s models
    return steps


# what each manipulation is measured by (swap: the confused pair's images taken for each other)
CORRECTIVE_COLUMNS = {"poisoning": ("Acc_corr", "Acc_retain", "ASR", "acc_Sf", "time_s"),
                      "interclasslabelswap": ("Acc_corr", "Acc_retain", "swap", "acc_Sf", "time_s")}


def corrective_collect(ctx: Context, runs: list) -> tuple:
    figures, parts = {}, []
    for manip in MANIPULATIONS:
        records = read_runs(ctx.out(f"g_{manip}", "runs.jsonl"))
        if not records:
            continue
        keys = CORRECTIVE_COLUMNS[manip]
        manipulated = records[0]["base"].get("metrics", {})
        figures[manip] = {"manipulated": manipulated, **{r["name"]: {k: r.get(k) for k in keys} for r in records}}
        rows = [{"method": "manipulated model", **{k: fmt(manipulated.get(k)) for k in keys[:3]}}]
        rows += [{"method": r["name"], **{k: fmt(r.get(k)) for k in keys}} for r in records]
        parts.append(f"**{manip}**, |S_m| = {ctx.scale.corrective['forget_set_size']}, manipulated model "
                     f"test acc. {fmt(records[0]['base'].get('test_acc'))} %\n\n" + table(rows, ["method", *keys]))
    note = (f"The {len(MANIPULATIONS)} lists ran side by side on one GPU: time_s is not one method's speed "
            f"alone.\n\n")
    return figures, (note + "\n".join(parts)) if parts else "(nothing finished)\n"


# --- (long), (ref): one train.py run each, the fast recipe stretched and SalUn's 182 epochs ------------

def long_steps(ctx: Context) -> list:
    r = {**ctx.recipe(), "epochs": ctx.scale.long_epochs}
    return [Step(f"train.py (the fast recipe, {r['epochs']} epochs)", [
        "train.py", "--model", ctx.scale.model, *recipe_flags(r), "--out", str(ctx.work / "checkpoints" / "fast_long.pt")])]


def ref_steps(ctx: Context) -> list:
    return [Step("train.py (SalUn's recipe)", ["train.py", *ctx.scale.ref,
                                               "--out", str(ctx.work / "checkpoints" / "ref182.pt")])]


def trained_collect(stem: str, what: Callable[[Context], str]) -> Callable:
    """(figures, Markdown) of the train.py run whose checkpoint is `stem`.pt."""
    def collect(ctx: Context, runs: list) -> tuple:
        meta = (read_json(ctx.out("train", f"{stem}.json")) or {}).get("meta", {})
        figures = {"test_acc": meta.get("test_acc"), "train_s": meta.get("train_seconds_this_process"),
                   "epochs": meta.get("epochs_done")}
        return figures, (f"{what(ctx)}: test acc. {fmt(figures['test_acc'])} % after {figures['epochs'] or 0} "
                         f"epochs, {fmt(figures['train_s'], 1)} s.\n")
    return collect


long_collect = trained_collect("fast_long", lambda ctx: f"`resnet18_fast` with {ctx.scale.long_epochs} epochs "
                                                        "instead of 15 (train.py, the same schedule stretched)")
ref_collect = trained_collect("ref182", lambda ctx: "SalUn's base recipe (train.py defaults: 182 epochs, batch 256, "
                                                    "SGD lr 0.1, ×0.1 at epochs 91 and 136)")


PARTS = {p.key: p for p in [
    Part("a", "loader bench, --compile, SalUn's mask cost", loader_steps, loader_collect),
    Part("b", "ResNet-18 base model by the fast recipe; parity with torchvision", base_steps, base_collect),
    Part("c", "SalUn class-wise forgetting (class 0), full CIFAR-10", salun_steps("c", {"class_to_forget": 0}),
         salun_collect("c")),
    Part("d", "SalUn random forgetting (10 %), full CIFAR-10", salun_steps("d", {"unlearning_rate": 0.1}),
         salun_collect("d")),
    Part("e", "ResNet-18 on clean, ops, lsp, l2-ar; DFR", poison_steps, poison_collect),
    Part("f", "I-BAU on the release models", ibau_steps, ibau_collect),
    Part("g", "corrective unlearning: poisoning, interclass confusion", corrective_steps, corrective_collect),
    Part("long", "the fast recipe over more of issue 15's 60 s", long_steps, long_collect, default=False),
    Part("ref", "SalUn's 182-epoch recipe (the reference to beat)", ref_steps, ref_collect, default=False),
]}

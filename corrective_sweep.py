"""Corrective unlearning: a sweep over the identified fraction |S_f| / |S_m|, and its report.

    python corrective_sweep.py plan --out exp/corrective_poisoning_cpu.json      # the experiment file
    python main.py -L exp/corrective_poisoning_cpu.json -NL                       # run it (main.py)
    python corrective_sweep.py report results/main/corrective_poisoning_cpu/runs.jsonl \\
        --out docs/figures/corrective_poisoning_cpu                              # table + plot

`plan` writes a main.py experiment file: for every fraction, every method and every setting
of its hyper-parameter grid (SSD's (alpha, lambda), SCRUB's alpha), one experiment with
`deletion_size = round(fraction * forget_set_size)` and `nexp` seeds. One manipulated model
per seed serves every fraction and method (main.py caches it).

`report` reads main.py's runs.jsonl and, per method and fraction, picks the setting with the
best validation score, (val Acc_corr + val Acc_retain) / 2 (the validation split is
clean data held out of training, triggered copies of it for poisoning; the test split is
never looked at), per seed (`--select per-seed`, the default) or on the mean over seeds
(`--select mean`), then writes a Markdown/CSV table (mean ± std
over seeds of the chosen setting), the selections as JSON, and a PNG with Acc_corr,
Acc_retain (and ASR for poisoning) against the identified fraction, one line per method,
the manipulated model as a dashed line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import plotting
from cli import run_main
from constants import UserError
from reporting import mean_std, read_jsonl, write_json, write_tables

FAMILY = {"retrain": "EU", "ft": "CF", "scrub": "SCRUB", "badt": "BadT", "ssd": "SSD"}
METHOD_OF = {"EU": "EU", "CF": "CF", "SCRUB": "scrub", "BADT": "BadT", "SSD": "SSD"}
# SSD (SSDselectwt alpha, SSDdampening lambda): the script grid's alpha with lambda = alpha x {0.1, 1}
SSD_GRID = ((1.0, 0.1), (1.0, 1.0), (10.0, 1.0), (10.0, 10.0), (100.0, 10.0), (100.0, 100.0))
SCRUB_ALPHAS = (0.001, 0.1)


def _parse_pairs(text: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple(tuple(float(v) for v in item.split(":")) for item in text.split(","))
    except ValueError:
        raise UserError(f"--ssd-grid takes alpha:lambda pairs separated by commas, got '{text}'") from None
    if not pairs or any(len(p) != 2 or min(p) <= 0 for p in pairs):
        raise UserError(f"--ssd-grid takes positive alpha:lambda pairs, got '{text}'")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="write the experiment file")
    plan.add_argument("--out", required=True, help="experiment JSON to write")
    plan.add_argument("--dataset_method", default="poisoning")
    plan.add_argument("--forget_set_size", type=int, default=100)
    plan.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0])
    plan.add_argument("--methods", nargs="+", default=["EU", "CF", "SCRUB", "BadT", "SSD"])
    plan.add_argument("--ssd-grid", default=",".join(f"{a:g}:{l:g}" for a, l in SSD_GRID),
                      help="SSD settings as alpha:lambda (SSDselectwt:SSDdampening) pairs")
    plan.add_argument("--scrub-alphas", type=float, nargs="+", default=list(SCRUB_ALPHAS))
    plan.add_argument("--seeds", type=int, default=3, help="runs per experiment (seeds 0..N-1)")
    plan.add_argument("--model", default="smallcnn")
    plan.add_argument("--dataset", default="cifar10")
    plan.add_argument("--subset", type=int, default=5000)
    plan.add_argument("--test_subset", type=int, default=2000)
    plan.add_argument("--pretrain_epochs", type=int, default=10)
    plan.add_argument("--pretrain_lr", type=float, default=0.1)
    plan.add_argument("--unlearn_iters", type=int, default=80)
    plan.add_argument("--unlearn_lr", type=float, default=None,
                      help="default: the corrective paper's (0.025; SCRUB 0.0025)")
    plan.add_argument("--batch_size", type=int, default=128)
    rep = sub.add_parser("report", help="select on validation, write the table and the plot")
    rep.add_argument("runs", nargs="+", help="main.py's runs.jsonl (several: an experiment and seed "
                     "found twice keeps its last record, e.g. a sweep resumed in a second invocation)")
    rep.add_argument("--out", required=True, help="output stem: <out>.md/.csv/.json/.png")
    rep.add_argument("--title", default=None)
    rep.add_argument("--select", choices=("per-seed", "mean"), default="per-seed",
                     help="choose the setting per seed on its validation score (default), or one "
                          "setting for all seeds on the mean validation score")
    return p


# ----------------------------------------------------------------------------- plan

def plan_experiments(args) -> dict:
    n = args.forget_set_size
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        raise UserError(f"fractions must be in (0, 1], got {bad[0]}")
    unknown = [m for m in args.methods if m.upper() not in METHOD_OF]
    if unknown:
        raise UserError(f"unknown method '{unknown[0]}': choose from EU, CF, SCRUB, BadT, SSD")
    defaults = {"model": args.model, "dataset": args.dataset, "subset": args.subset,
                "test_subset": args.test_subset, "dataset_method": args.dataset_method,
                "forget_set_size": n, "nexp": args.seeds, "batch_size": args.batch_size,
                "unlearn_iters": args.unlearn_iters,
                "base": {"epochs": args.pretrain_epochs, "lr": args.pretrain_lr,
                         "batch_size": args.batch_size, "schedule": "linear", "warmup": 0.05}}
    grids = {"EU": [{"k": -1}], "CF": [{"k": -1}], "BADT": [{}],
             "SCRUB": [{"alpha": a} for a in args.scrub_alphas],
             "SSD": [{"SSDselectwt": a, "SSDdampening": lam} for a, lam in _parse_pairs(args.ssd_grid)]}
    if args.unlearn_lr is not None:
        defaults["unlearn_lr"] = args.unlearn_lr
    experiments = []
    for frac in args.fractions:
        size = max(1, round(frac * n))
        for m in args.methods:
            for params in grids[m.upper()]:
                setting = ", ".join(f"{k}={v:g}" for k, v in params.items())
                experiments.append({"unlearn_method": METHOD_OF[m.upper()], "deletion_size": size,
                                    "tag": f"{m} [{setting}] |S_f|={size}", **params})
    description = (f"Corrective unlearning sweep (corrective_sweep.py plan): {args.dataset_method} of "
                   f"|S_m|={n} samples of a {args.subset}-image {args.dataset} subset, {args.model}; "
                   f"identified fractions {args.fractions}; methods {args.methods}; {args.seeds} seeds. "
                   "Report: python corrective_sweep.py report <runs.jsonl> --out <stem>.")
    return {"description": description, "defaults": defaults, "experiments": experiments}


# ----------------------------------------------------------------------------- report

def load_runs(paths: list[str]) -> list[dict]:
    """The corrective runs of every file that did not diverge (a setting that diverged cannot
    be selected); a (tag, seed) seen again replaces the earlier one."""
    by_key = {}
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"runs file {path} does not exist")
        for run in read_jsonl(path):
            if run.get("config", {}).get("dataset_method"):
                by_key[(run["name"], run["seed"])] = run
    if not by_key:
        raise UserError(f"{', '.join(paths)}: no corrective (dataset_method) runs")
    runs = [r for r in by_key.values() if not r.get("diverged")]
    if len(runs) < len(by_key):
        print(f"note: {len(by_key) - len(runs)} diverged run(s) left out of the report")
    return runs


SHORT = {"SSDselectwt": "α", "SSDdampening": "λ", "alpha": "α"}


def _setting(run: dict, keys=None) -> str:
    """The run's hyper-parameters (only `keys`, e.g. those its grid varies), short names."""
    params = {k: v for k, v in run["config"]["params"].items() if keys is None or k in keys}
    return " ".join(f"{SHORT.get(k, k)}={v:g}"
                    for k, v in sorted(params.items(), key=lambda kv: SHORT.get(kv[0], kv[0]))) or "-"


def _varying(runs: list[dict]) -> dict[str, set]:
    """Per method, the hyper-parameters that take more than one value in the runs."""
    values: dict[str, dict[str, set]] = {}
    for r in runs:
        for k, v in r["config"]["params"].items():
            values.setdefault(r["method"], {}).setdefault(k, set()).add(v)
    return {m: {k for k, vs in params.items() if len(vs) > 1} for m, params in values.items()}


def _score(run: dict) -> float:
    vals = [run[k] for k in ("val_Acc_corr", "val_Acc_retain") if isinstance(run.get(k), (int, float))]
    if not vals:
        raise UserError("runs carry no validation metrics (val_Acc_corr / val_Acc_retain)")
    return sum(vals) / len(vals)


def select(runs: list[dict], per_seed: bool = True) -> dict:
    """{(method, fraction): (setting(s), [chosen runs])}. per_seed: for every seed the setting
    with the best validation score of that run (each seed is its own manipulated model,
    S_m and validation split, as a practitioner tuning on their own data would); otherwise
    one setting for all seeds, the best mean score over seeds."""
    varying = _varying(runs)
    label = lambda r: _setting(r, varying[r["method"]])  # noqa: E731
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in runs:
        key = (FAMILY.get(r["method"], r["method"]), round(r["deletion_frac"], 4))
        groups.setdefault(key, {}).setdefault(label(r), {})[r["seed"]] = r
    chosen = {}
    for key, settings in groups.items():
        if per_seed:
            seeds = sorted({seed for by_seed in settings.values() for seed in by_seed})
            picks = [max((by_seed[seed] for by_seed in settings.values() if seed in by_seed), key=_score)
                     for seed in seeds]
            names = [label(r) for r in picks]
            chosen[key] = (names[0] if len(set(names)) == 1 else " / ".join(names), picks)
        else:
            best = max(settings, key=lambda s: sum(map(_score, settings[s].values())) / len(settings[s]))
            chosen[key] = (best, list(settings[best].values()))
    return chosen


def _ms(values) -> tuple[float, float] | None:
    vals = [float(v) for v in values if isinstance(v, (int, float))]
    return mean_std(vals) if vals else None


def _fmt(ms) -> str:
    return "" if ms is None else f"{ms[0]:.2f} ± {ms[1]:.2f}"


def manipulated_model(runs: list[dict]) -> dict:
    """Mean ± std over seeds of the manipulated model's metrics (one per seed)."""
    per_seed = {}
    for r in runs:
        per_seed.setdefault(r["seed"], r["base"].get("metrics", {}))
    keys = sorted({k for m in per_seed.values() for k in m})
    return {k: _ms(m.get(k) for m in per_seed.values()) for k in keys} | {"n": len(per_seed)}


def report_rows(chosen: dict, base: dict, metrics: list[str]) -> list[dict]:
    rows = [{"method": "manipulated model", "identified": "-", "setting (val)": "-", "n": base["n"],
             **{m: _fmt(base.get(m)) for m in metrics}, "time (s)": ""}]
    order = {m: i for i, m in enumerate(FAMILY.values())}
    for (method, frac), (setting, runs) in sorted(chosen.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
        rows.append({"method": method, "identified": f"{100 * frac:.0f}%", "setting (val)": setting,
                     "n": len(runs), **{m: _fmt(_ms(r.get(m) for r in runs)) for m in metrics},
                     "time (s)": _fmt(_ms(r.get("time_s") for r in runs))})
    return rows


@plotting.drawn
def plot(chosen: dict, base: dict, metrics: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    methods = list(dict.fromkeys(m for m, _ in sorted(chosen, key=lambda k: list(FAMILY.values()).index(k[0])
                                                                 if k[0] in FAMILY.values() else 99)))
    for ax, metric in zip(axes[0], metrics):
        for method in methods:
            pts = sorted((frac, _ms(r.get(metric) for r in runs)) for (m, frac), (_, runs) in chosen.items()
                         if m == method)
            pts = [(f, ms) for f, ms in pts if ms is not None]
            if pts:
                ax.errorbar([100 * f for f, _ in pts], [ms[0] for _, ms in pts], yerr=[ms[1] for _, ms in pts],
                            marker="o", capsize=3, label=method)
        if base.get(metric) is not None:
            ax.axhline(base[metric][0], color="gray", linestyle="--", label="manipulated model")
        ax.set_xlabel("identified share of S_m (%)")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_xticks(sorted({100 * f for _, f in chosen}))
        low, high = ax.get_ylim()
        ax.set_ylim(max(0.0, low), min(100.0, high))  # percentages: std bars are cut at 0 and 100
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def report(args) -> str:
    runs = load_runs(args.runs)
    kind = runs[0]["config"]["dataset_method"]
    metrics = ["Acc_corr", "Acc_retain"] + (["ASR"] if kind == "poisoning" else [])
    chosen = select(runs, per_seed=args.select == "per-seed")
    base = manipulated_model(runs)
    stem = Path(args.out)
    md = write_tables(report_rows(chosen, base, metrics + ["acc_Sm", "acc_Sf"]), stem)
    write_json(stem.with_suffix(".json"), {
        "runs": [str(r) for r in args.runs], "selection": "per method and fraction, the setting with the best "
        + ("validation score of each seed's run" if args.select == "per-seed" else "mean validation score over seeds")
        + ", score = (val_Acc_corr + val_Acc_retain) / 2",
        "chosen": [{"method": m, "fraction": f, "setting": s, "seeds": [r["seed"] for r in rs],
                    "per_seed": [_setting(r) for r in rs]}
                   for (m, f), (s, rs) in sorted(chosen.items())]})
    cfg = runs[0]["config"]
    title = args.title or (f"{kind}, |S_m|={cfg['forget_set_size']}, {cfg['model']}/{cfg['dataset']}"
                           + (f" subset {cfg['subset']}" if cfg.get("subset") else "")
                           + f", mean ± std over {base['n']} seeds")
    plot(chosen, base, metrics, stem.with_suffix(".png"), title)
    print(md)
    print(f"wrote {stem}.md, {stem}.csv, {stem}.json, {stem}.png")
    return md


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        out = Path(args.out)
        write_json(out, plan_experiments(args))
        print(f"wrote {out} ({len(plan_experiments(args)['experiments'])} experiments x {args.seeds} seeds)")
        return 0
    report(args)
    return 0


if __name__ == "__main__":
    run_main(main)

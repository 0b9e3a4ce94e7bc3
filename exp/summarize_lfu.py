"""Tables of exp/lfu_cpu.sh: DFR (final and peak checkpoint, per seed and mean ± std), orthogonal
projection (clean / poisoned / projected test accuracy and the share of the gap won back), and
linear separability (all probes' curves in RESULTS_DIR/linear_separability.png).
Usage: python exp/summarize_lfu.py [RESULTS_DIR]  (default results/lfu)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plotting import plot_lines  # noqa: E402
from reporting import mean_std, write_tables  # noqa: E402


def load(path: Path):
    return json.loads(path.read_text())


def dfr_table(root: Path) -> str:
    rows, deltas = [], {"final": [], "peak": []}
    for summary in sorted(root.glob("dfr/*/*/num_dfr=*/*/summary.json")):
        s = load(summary)
        run = summary.parents[2].name
        final = len(s["epochs"]) - 1
        gain_final = s["dfr_test_acc"][final] - s["test_acc"][final]
        peak_i = max(range(len(s["epochs"])), key=lambda i: s["dfr_test_acc"][i])
        deltas["final"].append((s["test_acc"][final], s["dfr_test_acc"][final], gain_final))
        deltas["peak"].append((s["test_acc"][peak_i], s["dfr_test_acc"][peak_i],
                               s["dfr_test_acc"][peak_i] - s["test_acc"][peak_i]))
        rows.append({"poison": s["poison"], "run": run, "mode": s["mode"],
                     "final epoch": s["epochs"][final], "test acc": s["test_acc"][final],
                     "after DFR": s["dfr_test_acc"][final], "gain": gain_final,
                     "peak DFR (epoch)": f"{s['dfr_test_acc'][peak_i]:.2f} ({s['epochs'][peak_i]})",
                     "DFR on random init": s.get("random_init_dfr_test_acc")})
    for which, vals in deltas.items():
        if len(vals) > 1:
            cols = list(zip(*vals))
            ms = [mean_std(c) for c in cols]
            rows.append({"poison": "mean ± std", "run": f"{len(vals)} seeds, {which} checkpoint",
                         "test acc": f"{ms[0][0]:.2f} ± {ms[0][1]:.2f}",
                         "after DFR": f"{ms[1][0]:.2f} ± {ms[1][1]:.2f}",
                         "gain": f"{ms[2][0]:.2f} ± {ms[2][1]:.2f}"})
    return write_tables(rows, root / "table_dfr") if rows else ""


def op_table(root: Path) -> str:
    runs = {}
    for f in sorted((root / "orthogonal_projection").glob("*.json")):
        if f.stem.endswith(("_linear",)):
            continue
        r = load(f)
        m = r["meta"]
        runs[(m["poison"], m["project"], m["seed"])] = r["test_acc"]
    rows = []
    seeds = sorted({k[2] for k in runs})
    for poison in sorted({k[0] for k in runs} - {"clean"}):
        full = []
        for s in seeds:
            clean, pois, proj = (runs.get(("clean", False, s)), runs.get((poison, False, s)),
                                 runs.get((poison, True, s)))
            row = {"poison": poison, "seed": s, "clean training": clean, "poison, no projection": pois,
                   "poison, orthogonal projection": proj}
            if None not in (clean, pois, proj):
                row["gap won back (%)"] = 100 * (proj - pois) / (clean - pois) if clean != pois else None
                row["projected − clean"] = proj - clean
                full.append(row)
            rows.append(row)
        if len(full) > 1:
            cols = ("clean training", "poison, no projection", "poison, orthogonal projection",
                    "gap won back (%)", "projected − clean")
            mean = {"poison": poison, "seed": f"mean ± std ({len(full)})"}
            for c in cols:
                m_, sd = mean_std([r[c] for r in full])
                mean[c] = f"{m_:.2f} ± {sd:.2f}"
            rows.append(mean)
    table = write_tables(rows, root / "table_op") if rows else ""
    linear = []
    for f in sorted((root / "orthogonal_projection").glob("*_linear.json")):
        r = load(f)
        linear.append({"poison": r["poison"], "subset": r.get("subset"), "epochs": r["epochs"],
                       "train acc on the poison": r["train_acc"], "clean test acc": r["clean_test_acc"]})
    if linear:
        table += "\n\nStep 1, the bias-free linear model on the poisoned images:\n\n" + \
            write_tables(linear, root / "table_op_linear")
    return table


def sep_table(root: Path) -> str:
    rows = []
    for f in sorted((root / "linear_separability").glob("*.json")):
        r = load(f)
        rows.append({"poison": r["poison"], "n": r["n"], "hidden layers": r["hidden_layers"],
                     "L-BFGS steps": r["steps"], "final train acc": r["final_train_acc"],
                     "seconds": r["seconds"]})
    if rows:
        plot_separability(root)
    return write_tables(rows, root / "table_sep") if rows else ""


def plot_separability(root: Path) -> Path:
    """All probes' training accuracy against the L-BFGS step in one figure."""
    series, styles, colours = {}, {}, {}  # one colour per poison; the subset runs dashed
    for f in sorted((root / "linear_separability").glob("*.json")):
        r = load(f)
        label = "clean images" if r["poison"] == "clean" else r["poison"]
        label += f", {r['hidden_layers']} hidden" if r["hidden_layers"] else ""
        label += f", n={r['n']:,}"
        series[label] = (range(1, len(r["train_acc"]) + 1), r["train_acc"])
        styles[label] = {"color": colours.setdefault(r["poison"], f"C{len(colours)}"),
                         "linestyle": "-" if r["n"] >= 50000 else "--"}
    return plot_lines(root / "linear_separability.png", None, series, "L-BFGS step",
                      "training accuracy (%)", "Linear separability of the perturbations",
                      styles=styles)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/lfu")
    for name, fn in (("DFR", dfr_table), ("Orthogonal projection", op_table),
                     ("Linear separability", sep_table)):
        md = fn(root)
        if md:
            print(f"## {name}\n\n{md}")

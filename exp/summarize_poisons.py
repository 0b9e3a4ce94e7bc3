"""Clean test accuracy after training on each poison (mean ± std over seeds) from the train.py
results of exp/poisons_cpu.sh.

    python exp/summarize_poisons.py results/train [--stem results/poisons_cpu]

Reads <folder>/poisons_cpu_*.json; writes <stem>.csv/.md and prints the table, with the gap to
the clean row (points of clean test accuracy lost) and the final training accuracy (how well
the network fit the poisoned data).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import run_main  # noqa: E402
from constants import UserError  # noqa: E402
from reporting import mean_std, summarize, write_tables  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--stem", default=None, help="output stem (default: <folder>/../poisons_cpu)")
    args = p.parse_args(argv)
    runs = []
    for f in sorted(Path(args.folder).glob("poisons_cpu_*.json")):
        d = json.loads(f.read_text())
        meta, hist = d["meta"], d["history"]
        pz = meta.get("poison") or {"key": "clean"}
        name = pz["key"] + ("-small" if pz.get("recipe") == "small" else "")
        runs.append({"poison": name, "seed": meta["seed"], "test_acc": meta["test_acc"],
                     "train_acc": hist[-1].get("train_acc"), "n_train": meta["n_train"],
                     "epochs": meta["epochs_done"]})
    if not runs:
        raise UserError(f"no poisons_cpu_*.json in {args.folder}")
    order = ["clean", "lsp", "ops", "l2-ar", "error-min-small", "error-max-small"]
    runs.sort(key=lambda r: (order.index(r["poison"]) if r["poison"] in order else 99, r["seed"]))
    rows = summarize(runs, ["poison"], ["test_acc", "train_acc"])
    clean = [r["test_acc"] for r in runs if r["poison"] == "clean"]
    base = mean_std(clean)[0] if clean else None
    for row in rows:
        accs = [r["test_acc"] for r in runs if r["poison"] == row["poison"]]
        row["gap_to_clean"] = None if base is None else f"{base - mean_std(accs)[0]:.1f}"
        row["seeds"] = ",".join(str(r["seed"]) for r in runs if r["poison"] == row["poison"])
    stem = Path(args.stem) if args.stem else Path(args.folder).parent / "poisons_cpu"
    print(write_tables(rows, stem, ["poison", "n", "seeds", "test_acc", "gap_to_clean", "train_acc"]))
    return 0


if __name__ == "__main__":
    run_main(main)

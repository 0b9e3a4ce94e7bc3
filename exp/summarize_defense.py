"""Tables (mean ± std over seeds) from defense.py result files.

    python exp/summarize_defense.py results/ibau_exp [--stem results/ibau_exp/summary]

Writes <stem>.csv/.md (one row per method × clean-set size: final ACC, ASR, R-Acc, DER,
defence wall time) and <stem>_rounds.csv/.md (the same per round / epoch), and prints both.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import run_main  # noqa: E402
from constants import UserError  # noqa: E402
from reporting import summarize, write_tables  # noqa: E402

FINAL = ["acc_before", "asr_before", "acc", "asr", "asr_incl_target", "racc", "der", "seconds"]
ROUND = ["acc", "asr", "racc", "der", "seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("folder")
    p.add_argument("--stem", default=None)
    args = p.parse_args(argv)
    files = sorted(Path(args.folder).glob("*.json"))
    runs, rounds = [], []
    for f in files:
        d = json.loads(f.read_text())
        if "summary" not in d or "rounds" not in d:
            continue
        cfg, s = d["config"], d["summary"]
        key = {"method": s["method"], "n_clean": s["n_clean"],
               "budget": f"{cfg['n_rounds']} rounds" if s["method"] == "ibau" else f"{cfg['epochs']} epochs"}
        runs.append({**key, **s, "seed": cfg["seed"]})
        for r in d["rounds"]:
            rounds.append({**key, "stage": r["stage"], "round": r["round"], **r})
    if not runs:
        raise UserError(f"no defense.py results in {args.folder}")
    stem = Path(args.stem) if args.stem else Path(args.folder) / "summary"
    keys = ["method", "n_clean", "budget"]
    print(write_tables(summarize(runs, keys, FINAL), stem))
    print(write_tables(summarize(rounds, keys + ["stage", "round"], ROUND), f"{stem}_rounds"))
    return 0


if __name__ == "__main__":
    run_main(main)

"""I-BAU tables from defense.py result files: one row per setting (the file names' setting
label, before `_seed`), per-round columns for the rounds asked for, mean ± std over seeds and
the per-seed held-out ASR.

    python exp/summarize_ibau.py results/ibau_release/ablation --rounds 1 3 --out docs/figures/ibau_ablation

Columns per round r: ACC r (held-out clean accuracy), ASR r (held-out, non-target images),
rel. ASR r (the release's figure: triggered copies of the unlearning images, target class
included), |δ| r (the perturbation's L2 norm that round), and the ASR of every seed. Writes
<out>.csv / <out>.md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import run_main  # noqa: E402
from constants import UserError  # noqa: E402
from reporting import mean_std, write_tables  # noqa: E402

SEED = re.compile(r"_seed(\d+)")


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def load(folder: Path) -> dict[str, dict[int, dict]]:
    """setting -> seed -> defense.py result."""
    out: dict[str, dict[int, dict]] = {}
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        if "rounds" not in d:
            continue
        m = SEED.search(f.stem)
        setting = f.stem[:m.start()] if m else f.stem
        out.setdefault(setting, {})[d["config"]["seed"]] = d
    return out


FIELDS = {"ACC": "acc", "ASR": "asr", "rel. ASR": "release_asr", "|δ|": "delta_l2"}


def row(setting: str, runs: dict[int, dict], rounds: list[int], fields: list[str]) -> dict:
    seeds = sorted(runs)
    before = [runs[s]["rounds"][0] for s in seeds]
    out = {"setting": setting, "seeds": ",".join(map(str, seeds)),
           "ACC before": fmt([b["acc"] for b in before]), "ASR before": fmt([b["asr"] for b in before])}
    for r in rounds:
        at = {s: next((x for x in runs[s]["rounds"] if x["stage"] == "ibau" and x["round"] == r), None)
              for s in seeds}
        if any(v is None for v in at.values()):
            continue
        for name in fields:
            out[f"{name} {r}"] = fmt([v[FIELDS[name]] for v in at.values()])
        out[f"ASR {r} per seed"] = " / ".join(f"{v['asr']:.1f}" for v in at.values())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--rounds", type=int, nargs="+", default=[1, 3])
    p.add_argument("--fields", nargs="+", choices=list(FIELDS), default=list(FIELDS),
                   help="per-round columns (default all)")
    p.add_argument("--out", default=None, help="table stem (default <folder>/summary)")
    args = p.parse_args(argv)
    runs = load(Path(args.folder))
    if not runs:
        raise UserError(f"no defense.py results in {args.folder}")
    rows = [row(s, r, args.rounds, args.fields) for s, r in runs.items()]
    print(write_tables(rows, Path(args.out) if args.out else Path(args.folder) / "summary"))
    return 0


if __name__ == "__main__":
    run_main(main)

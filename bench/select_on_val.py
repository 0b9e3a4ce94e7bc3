"""Pick unlearning hyper-parameters on the VALIDATION split, never on test.

    python bench/select_on_val.py results/main/quickstart_tune/runs.jsonl

For each experiment of a main.py run: UA and RA (training forget / retain sets), VA
(validation accuracy without the forgotten class), and the validation Avg. Gap to the retrain
reference over (UA, RA, VA) -- SalUn's Avg. Gap with VA in place of TA and without MIA (its
non-member shadow set is the test split). Lower is better; rows sorted by method, then gap.
"""
import json
import sys
from collections import defaultdict

rows = defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    ref = r.get("ref") or {}
    gap = None
    if all(k in ref for k in ("UA", "RA", "VA")) and "VA" in r:
        gap = sum(abs(r[k] - ref[k]) for k in ("UA", "RA", "VA")) / 3
    rows[(r["method"], r["name"], r["config"]["lr"], r["config"]["epochs"])].append(
        (r["UA"], r["RA"], r.get("VA", float("nan")), r.get("VA_forget", float("nan")), gap))
print(f"{'method':<14}{'name':<30}{'lr':>8}{'ep':>4}{'n':>3}{'UA':>8}{'RA':>8}{'VA':>8}{'VAf':>8}{'valgap':>8}")
table = []
for (method, name, lr, ep), vals in rows.items():
    n = len(vals)
    avg = [sum(v[i] for v in vals) / n if vals[0][i] is not None else float("nan") for i in range(5)]
    table.append((method, avg[4], name, lr, ep, n, avg))
for method, _, name, lr, ep, n, avg in sorted(table, key=lambda t: (t[0], t[1])):
    print(f"{method:<14}{name[:29]:<30}{lr:>8g}{ep:>4}{n:>3}" + "".join(f"{a:8.2f}" for a in avg))

"""Results on disk: JSON (atomic, never NaN), JSON lines, CSV and Markdown tables, mean ± std
rows. The writing itself (atomic files, appends, a full disk) is storage.py's.

Every result record written here (a JSON object, or a line of a JSON-lines file) carries the
git commit of the code that produced it (`commit`; "+dirty" when the checkout had
uncommitted changes, null outside a git checkout).
"""
from __future__ import annotations

import csv
import functools
import io
import json
import math
import subprocess
from pathlib import Path

from constants import UserError
from storage import append_line, complete_lines, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit this code was run from ('+dirty' with uncommitted changes), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _stamped(obj):
    return {**obj, "commit": obj.get("commit", git_commit())} if isinstance(obj, dict) else obj


def finite(obj):
    """`obj` with every NaN or infinite float replaced by None: JSON has no NaN (json.dumps
    would write one anyway, and most readers refuse it)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, **kw) -> str:
    """Valid JSON, always: non-finite floats become null, anything else unknown a string."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kw)


def write_json(path: str | Path, obj) -> Path:
    return write_text_atomic(path, to_json(_stamped(obj), indent=2) + "\n")


def append_jsonl(path: str | Path, obj) -> None:
    """One record as one line; a torn last line is set aside first (storage.append_line)."""
    append_line(path, to_json(_stamped(obj)))


def write_jsonl(path: str | Path, records: list) -> None:
    """The records as a whole JSON-lines file, atomically: each line as append_jsonl writes it."""
    write_text_atomic(path, "".join(to_json(_stamped(r)) + "\n" for r in records))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (a torn last line, not yet set aside, left out)."""
    records = []
    for n, text in complete_lines(path):
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {n} is not valid JSON ({e.msg}): fix or delete that "
                            "line") from None
    return records


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def summarize(runs: list[dict], group_keys: list[str], metric_keys: list[str]) -> list[dict]:
    """One row per group: the group keys, n, and "mean ± std" per metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    rows = []
    for key, members in groups.items():
        row = dict(zip(group_keys, key))
        row["n"] = len(members)
        for m in metric_keys:
            vals = [r[m] for r in members if r.get(m) is not None]
            if vals:
                mu, sd = mean_std(vals)
                row[m] = f"{mu:.2f} ± {sd:.2f}"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """A CSV file (atomic) of `columns` (default: every key of the rows, first seen first)."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())


def write_tables(rows: list[dict], stem: str | Path, columns: list[str] | None = None) -> str:
    """Write `<stem>.csv` and `<stem>.md`; return the Markdown."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    write_csv(f"{stem}.csv", rows, columns)
    md = markdown_table(rows, columns)
    write_text_atomic(f"{stem}.md", md)
    return md

"""Wasserstein distances between per-class embedding distributions, and how they change.

    python wasserstein.py results/features/main/quickstart/models/base \
        results/features/main/quickstart/models/SalUn results/features/main/quickstart/models/Retrain -S 1000

For each feature file: the first S embeddings split by label into per-class empirical
distributions, and the exact W1 distance between every pair of classes (i < j; POT's
`ot.emd2` if installed, else scipy's `wasserstein_distance_nd`), drawn as a heatmap. Files of
the same name in several folders are compared: for every pair of folders (in argument
order) the difference W[later] - W[earlier] is drawn too. Output: <out>/<name>/<folder>.png,
<out>/<name>/delta_<later>_minus_<earlier>.png and the matrices in <out>/<name>/distances.json.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import embeddings as E  # noqa: E402
from cli import run_main  # noqa: E402
from constants import UserError, results_dir  # noqa: E402
from storage import write_text_atomic  # noqa: E402


def build_parser():
    p = E.feature_parser(__doc__, "output folder (default RESULTS_DIR/images/wasserstein)")
    p.add_argument("--backend", choices=["auto", "scipy", "pot"], default="auto")
    return p


def heatmap(matrix, path: Path, title: str, cmap: str, vmin: float, vmax: float, label: str):
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("class j")
    ax.set_ylabel("class i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.samples <= 1:
        raise UserError("-S/--samples must be at least 2")
    out_root = Path(args.out) if args.out else results_dir() / "images" / "wasserstein"
    for stem, members in E.feature_groups(args.folders).items():
        n_classes = max(int(f.y.max()) + 1 for _, f in members)
        mats, names = {}, []
        for folder, f in members:
            name = folder.name if folder.name not in names else str(E.mirror(folder, *E.default_roots())).replace("/", "_")
            names.append(name)
            x, y = f.first(args.samples)
            mats[name] = E.wasserstein_matrix(E.per_class(x, y, n_classes), args.backend)
        finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        dest = out_root / stem
        for name, m in mats.items():
            forget = next((f.forget_class for (_, f), n in zip(members, names) if n == name), None)
            title = f"W1 between classes: {name}/{stem}" + (f" (forgot {forget})" if forget is not None else "")
            heatmap(m, dest / f"{name}.png", title, "viridis", vmin, vmax, "W1")
        for a, b in itertools.combinations(names, 2):
            delta = mats[b] - mats[a]
            lim = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 1.0
            heatmap(delta, dest / f"delta_{b}_minus_{a}.png", f"W1[{b}] - W1[{a}] ({stem})", "PiYG_r",
                    -lim or -1.0, lim or 1.0, "difference")
        write_text_atomic(dest / "distances.json", json.dumps(
            {"samples": args.samples, "backend": args.backend,
             "matrices": {n: [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in m]
                          for n, m in mats.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)

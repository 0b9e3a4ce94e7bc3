"""t-SNE of feature files: 2D and 3D plots and a rotating 3D GIF.

    python tsne_vis.py results/features/main/quickstart/models/base \
        results/features/main/quickstart/models/SalUn results/features/main/quickstart/models/Retrain -S 500

Folders (or files) come from the arguments. Files with the same name in several folders
(e.g. seed0.json) are embedded by ONE joint t-SNE (cosine metric, as DeepDive), so their maps
are comparable; the first S samples of each are used. The forgotten class (from the files'
metadata, or --highlight) is drawn larger with a dark edge; --proto adds the class
prototypes (magenta X for the forgotten class). Output, mirroring the input folders:
<out>/<folder>/tsne_2D/<name>.png, tsne_3D/<name>.png, tsne_animated/<name>.gif.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import embeddings as E  # noqa: E402
from cli import run_main  # noqa: E402
from constants import DATASETS, UserError, results_dir  # noqa: E402


def build_parser():
    p = E.feature_parser(__doc__, "output root (default RESULTS_DIR/images)")
    p.add_argument("--highlight", type=int, default=None, help="class to emphasise (default: forgotten class)")
    p.add_argument("--proto", action="store_true", help="add the class prototypes to the embedding")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--frames", type=int, default=36, help="frames of the animated GIF")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--method", choices=["auto", "exact", "barnes_hut"], default="auto",
                   help="t-SNE gradient (auto: exact up to 3,000 points)")
    p.add_argument("--no-gif", action="store_true")
    return p


def class_names(feats: E.Features, n: int) -> list[str]:
    info = DATASETS.get(str(feats.meta.get("dataset", "")))
    return list(info.classes) if info and len(info.classes) == n else [str(c) for c in range(n)]


def scatter(ax, pts, labels, highlight, n_classes, names, proto_pts=None, dims=2):
    cmap = plt.get_cmap("tab10" if n_classes <= 10 else "tab20")
    for c in range(n_classes):
        sel = labels == c
        if not sel.any():
            continue
        big = c == highlight
        kw = dict(s=(18 if big else 5) * (2 if dims == 3 else 1), alpha=0.95 if big else 0.6, color=cmap(c % cmap.N),
                  label=names[c], edgecolors="k" if big else "none", linewidths=0.3)
        ax.scatter(*[pts[sel, d] for d in range(dims)], **kw)
    if proto_pts is not None:
        for c, pt in enumerate(proto_pts):
            colour = "magenta" if c == highlight else cmap(c % cmap.N)
            ax.scatter(*[pt[d:d + 1] for d in range(dims)], marker="X", s=120 if c == highlight else 50,
                       color=colour, edgecolors="k", linewidths=0.8)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.samples <= 1:
        raise UserError("-S/--samples must be at least 2")
    out_root = Path(args.out) if args.out else results_dir() / "images"
    groups = E.feature_groups(args.folders)
    for stem, members in groups.items():
        blocks, protos, sizes = [], [], []
        for _, f in members:
            x, _ = f.first(args.samples)
            blocks.append(x)
            sizes.append(len(x))
            if args.proto and f.proto.size:
                protos.append(f.proto)
        n_classes = max(int(f.y.max()) + 1 for _, f in members)
        joint = np.concatenate(blocks + protos)
        emb = {d: E.tsne(joint, d, args.seed, args.perplexity, args.method) for d in (2, 3)}
        offsets = np.cumsum([0] + sizes)
        p_off = offsets[-1]
        for k, (folder, f) in enumerate(members):
            _, y = f.first(args.samples)
            highlight = args.highlight if args.highlight is not None else f.forget_class
            names = class_names(f, n_classes)
            dest = out_root / E.mirror(folder, *E.default_roots())
            proto_sl = None
            if protos:
                start = p_off + k * len(f.proto)
                proto_sl = slice(start, start + len(f.proto))
            title = f"{folder.name}/{stem}" + (f" (forgot class {highlight})" if highlight is not None else "")
            for dims in (2, 3):
                pts = emb[dims][offsets[k]:offsets[k + 1]]
                pp = emb[dims][proto_sl] if proto_sl else None
                fig = plt.figure(figsize=(7, 6))
                ax = fig.add_subplot(projection="3d" if dims == 3 else None)
                scatter(ax, pts, y, highlight, n_classes, names, pp, dims)
                ax.set_title(title)
                ax.legend(loc="upper right", fontsize=6, markerscale=2)
                path = dest / f"tsne_{dims}D" / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=120, bbox_inches="tight")
                if dims == 3 and not args.no_gif:
                    gif = dest / "tsne_animated" / f"{stem}.gif"
                    save_rotation(fig, ax, gif, args.frames)
                    print(f"{gif}")
                plt.close(fig)
                print(f"{path}")
    return 0


def save_rotation(fig, ax, path: Path, frames: int) -> None:
    from PIL import Image

    images = []
    for az in np.linspace(0, 360, frames + 1)[:-1]:
        ax.view_init(elev=20, azim=az)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=70)
        buf.seek(0)
        images.append(Image.open(buf).convert("P", palette=Image.ADAPTIVE))
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=80, loop=0)


if __name__ == "__main__":
    run_main(main)

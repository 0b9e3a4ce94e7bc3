"""Latent-space analysis shared by feature_extraction.py, tsne_vis.py and wasserstein.py:
penultimate features and class prototypes of a checkpoint, feature files, t-SNE, and
Wasserstein distances between per-class embedding distributions.

Feature file (JSON, DeepDive's layout plus provenance): {"all_features": N x D,
"all_labels": N, "indices": N (into the split), "proto": C x D (rows of the final linear
layer, the class "prototypes"), "meta": {checkpoint, model, dataset, method,
class_to_forget, seed, split}}.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import engine
from constants import UserError, results_dir
from models import get_model
from storage import write_text_atomic
from training import DataSpec, make_loader, prepare_data


# ----------------------------------------------------------------------------- extraction

def load_model(path: Path, device, model_name: str | None = None, dataset: str | None = None):
    """(model, meta) from a checkpoint; model/dataset from its meta unless given."""
    sd, meta = engine.load_checkpoint(path, dataset=dataset, model=model_name)
    name = model_name or meta.get("model")
    if not name:
        raise UserError(f"{path} does not record its model: pass --model")
    num_classes = meta.get("num_classes") or _num_classes_from(sd)
    model = get_model(name, num_classes).to(device)
    engine.load_weights(model, sd, path)
    meta = {**meta, "model": name, "dataset": dataset or meta.get("dataset") or "cifar10"}
    return model.eval(), meta


def _num_classes_from(sd: dict) -> int:
    weights = [v for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    if not weights:
        raise UserError("cannot tell the number of classes from the checkpoint")
    return int(weights[-1].shape[0])


def sample_indices(meta: dict, split: str, samples: int, seed: int = 0):
    """(data, split name, indices): `samples` samples of the checkpoint's training pool
    (retain + forget, every class, validation held out) or of the test split, in a seeded
    random order that is the same for every checkpoint of the same data description."""
    d = meta.get("data") or {}
    spec = DataSpec(dataset=meta["dataset"], subset=d.get("subset"), val_frac=d.get("val_frac", 0.1),
                    split_seed=d.get("split_seed", 0))
    data = prepare_data(spec, seed=0)
    pool = data.retain_idx if split == "train" else torch.arange(len(data.test))
    order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    return data, order[:samples]


@torch.no_grad()
def extract(model, data, split: str, indices: torch.Tensor, model_name: str, device,
            batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (model.features) and labels, in the order of `indices`."""
    loader = make_loader(data, split, indices, model_name=model_name, batch_size=batch_size, device=device)
    feats, labels = [], []
    for batch in loader:
        feats.append(model.features(batch.x).float().cpu())
        labels.append(batch.y.cpu())
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def prototypes(model) -> np.ndarray:
    return model.head.weight.detach().float().cpu().numpy()


def write_features(path: Path, feats, labels, indices, proto, meta: dict) -> Path:
    blob = {"all_features": np.round(feats, 5).tolist(), "all_labels": labels.tolist(),
            "indices": [int(i) for i in indices], "proto": np.round(proto, 6).tolist(), "meta": meta}
    return write_text_atomic(path, json.dumps(blob))


# ----------------------------------------------------------------------------- reading

class Features:
    def __init__(self, path: Path):
        try:
            blob = json.loads(Path(path).read_text())
            self.x = np.asarray(blob["all_features"], dtype=np.float64)
            self.y = np.asarray(blob["all_labels"], dtype=np.int64)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path} is not a feature file from feature_extraction.py ({e})") from None
        self.proto = np.asarray(blob.get("proto") or [], dtype=np.float64)
        self.meta = blob.get("meta") or {}
        self.path = Path(path)

    def first(self, n: int | None) -> tuple[np.ndarray, np.ndarray]:
        return (self.x, self.y) if n is None else (self.x[:n], self.y[:n])

    @property
    def forget_class(self):
        return self.meta.get("class_to_forget")


def feature_parser(doc: str, out_help: str):
    """The arguments every analysis script over feature files shares: folders, -S, --out."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="folders of feature files (or single files)")
    p.add_argument("-S", "--samples", type=int, default=200, help="samples per file (default 200)")
    p.add_argument("--out", default=None, help=out_help)
    return p


def feature_groups(folders: list[str]) -> dict[str, list[tuple[Path, Features]]]:
    """{file stem: [(folder, Features), ...]}: files of the same name in several folders
    (e.g. base/seed0.json, SalUn/seed0.json, Retrain/seed0.json) are compared together."""
    groups: dict[str, list] = {}
    for folder in folders:
        folder = Path(folder)
        if folder.is_file():
            files, folder = [folder], folder.parent
        elif folder.is_dir():
            files = sorted(folder.glob("*.json"))
        else:
            raise UserError(f"{folder} does not exist")
        if not files:
            raise UserError(f"no feature files (*.json) in {folder}: run feature_extraction.py first")
        for f in files:
            groups.setdefault(f.stem, []).append((folder, Features(f)))
    return groups


def mirror(path: Path, *roots: Path) -> Path:
    """`path` relative to the first root that contains it (else its name): the output
    folder structure mirrors the input's."""
    p = Path(path).resolve()
    for root in roots:
        try:
            return p.relative_to(Path(root).resolve())
        except ValueError:
            continue
    return Path(p.name)


def default_roots() -> list[Path]:
    return [results_dir() / "features", results_dir(), Path.cwd()]


# ----------------------------------------------------------------------------- analysis

def tsne(x: np.ndarray, dims: int, seed: int, perplexity: float = 30.0, method: str = "auto") -> np.ndarray:
    """scikit-learn t-SNE (cosine metric, PCA init). `auto` uses the exact gradient up to
    3,000 points (scikit-learn's Barnes-Hut is slow in 3D and for small sets) and
    Barnes-Hut above."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(2.0, (len(x) - 1) / 3))
    if method == "auto":
        method = "exact" if len(x) <= 3000 else "barnes_hut"
    return TSNE(n_components=dims, perplexity=perplexity, init="pca", metric="cosine",
                random_state=seed, method=method).fit_transform(x)


def per_class(x: np.ndarray, y: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [x[y == c] for c in range(num_classes)]


def wasserstein(u: np.ndarray, v: np.ndarray, backend: str = "auto") -> float:
    """Exact W1 between two empirical distributions (uniform weights, Euclidean ground cost):
    POT's `ot.emd2` if installed (and backend allows), else scipy's wasserstein_distance_nd."""
    if len(u) == 0 or len(v) == 0:
        return float("nan")
    if backend in ("auto", "pot"):
        try:
            import ot

            cost = ot.dist(u, v, metric="euclidean")
            return float(ot.emd2(np.full(len(u), 1 / len(u)), np.full(len(v), 1 / len(v)), cost))
        except ImportError:
            if backend == "pot":
                raise UserError("--backend pot needs the POT package (pip install pot)") from None
    from scipy.stats import wasserstein_distance_nd

    return float(wasserstein_distance_nd(u, v))


def wasserstein_matrix(classes: list[np.ndarray], backend: str = "auto") -> np.ndarray:
    """C x C matrix of W1 between class distributions; upper triangle only (i < j), NaN below."""
    n = len(classes)
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = wasserstein(classes[i], classes[j], backend)
    return out

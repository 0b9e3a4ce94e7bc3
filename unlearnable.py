"""Learning from unlearnable data (Sandoval-Segura et al., "What Can We Learn from Unlearnable
Datasets?", NeurIPS 2023): the algorithms behind dfr_step_1.py, dfr_step_2.py,
test_linear_separability.py and orthogonal_projection_step_{1,2}.py. The scripts only parse
flags, find files and print; training goes through `engine.fit` and data through
`datasets.BatchLoader`.

  Poisoned data      `poison_overrides`: a poison key (generated and cached on demand by
                     `poisons.poisoned_train_set`) as BatchLoader `replace`/`labels` overrides.
  DFR (§4.2)         `dfr_cached` (default): features of a fixed clean subset computed once in eval
                     mode, then the head refit by full-batch L-BFGS on the cached features; only
                     the head changes. `dfr_augment`: the original procedure (augmented clean
                     batches through engine.fit in train mode, so BatchNorm statistics are
                     re-estimated; every parameter but the head frozen).
  Separability (§4.3) `fit_probe_lbfgs`: full-batch L-BFGS of a linear (or tanh-MLP) probe on the
                     perturbations, with the data kept in host memory and streamed in chunks.
  Orthogonal projection (§4.4, Algorithm 1)
                     `fit_class_weights` (bias-free linear model on the raw poisoned pixels) and
                     `OrthogonalProjection` (X_r = X − X Q Qᵀ with Q an orthonormal basis of the
                     normalised class weights) as the BatchLoader `transform`.
  Training recipe    `CutMixLoss` (a loss_fn for engine.fit, mixing within the batch) and
                     `StrongAugment` (rotation, shear/scale, colour jitter, crop, flip as batch ops).

Fixes against the official code (psandovalsegura/learn-from-unlearnable): DFR's clean subset is
seeded and class-balanced; `--checkpoint_dir` keeps the model folder so step 2 finds step 1's
checkpoints; the separability probe works for any dataset and need not fit on a GPU; the
projection weights are checked for shape; normalisation is the same for train and test with
or without strong augmentation; ortho-projection training saves a checkpoint and a results JSON.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import engine
from constants import UserError, canonical_dataset_name, checkpoint_dir
from datasets import balanced_subset, crop_flip, read_index_json
from reporting import write_json


# --- Poisoned data and where things live -------------------------------------------------------

def add_poison_args(p, what: str = "train on") -> None:
    """The positional poison key and the flags that choose its data (shared by the scripts)."""
    p.add_argument("poison", help=f"poison key to {what}: lsp, ops, ar, l2-ar, cwrandom, regions-4, "
                   "regions-16, l2-regions-4, patches-4, patches-8 (generated on first use and "
                   "cached under CACHE_DIR/poisons), clean (no poison), or any name together with "
                   "--poison-file")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", help="cifar10, cifar100, svhn, gtsrb, or an "
                   "ImageFolder tree DATA_ROOT/<name>/{train,test}")
    g.add_argument("--poison-file", default=None, help="poison in the save_poison format (e.g. an "
                   "imported error-max/error-min poison); default: the cache file of the key")
    g.add_argument("--poison-seed", type=int, default=0, help="seed of a generated poison")
    g.add_argument("--subset", type=int, default=None,
                   help="use a class-balanced subset of N training images (CPU-scale runs)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of --subset")


def add_model_args(p, seed_help: str) -> None:
    """--model, --seed and --val-frac: the network the poisoned data trains (shared by the scripts)."""
    p.add_argument("--model", default="resnet18", help="resnet18, preactresnet18, resnet9, wrn28_10, "
                   "small_vgg, smallcnn, or a timm model name (default: resnet18)")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--val-frac", type=float, default=0.0,
                   help="stratified clean validation split held out of training (default 0: all)")


def add_sgd_args(p, title: str, *, epochs: int, batch_size: int, epochs_help: str = "training epochs"):
    """--epochs, --lr, --batch_size (SGD, the paper's spellings); returns the group for more."""
    o = p.add_argument_group(title)
    o.add_argument("--epochs", type=int, default=epochs, help=f"{epochs_help} (default {epochs})")
    o.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (default 0.1)")
    o.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=batch_size,
                   help=f"batch size (default {batch_size})")
    return o


def poison_overrides(key: str, data, seed: int = 0, path=None) -> tuple[dict, dict]:
    """(BatchLoader overrides putting poison `key` in place of data.retain_idx, poison meta)."""
    import poisons

    images, labels, meta = poisons.poisoned_train_set(key, data.spec.dataset, seed=seed,
                                                      path=path, split=data.train)
    if key == "clean" and path is None:
        return {}, meta
    idx = data.retain_idx
    return {"replace": (idx, images[idx]), "labels": labels}, meta


def run_name(model: str, dataset: str = "cifar10", subset: int | None = None, seed: int = 0) -> str:
    """`<model>` plus -<dataset> (not CIFAR-10), -sub<N> and -seed<S> (not 0)."""
    name = model
    if canonical_dataset_name(dataset) != "cifar10":
        name += f"-{canonical_dataset_name(dataset)}"
    if subset:
        name += f"-sub{subset}"
    if seed:
        name += f"-seed{seed}"
    return name


def dfr_checkpoint_folder(poison: str, model: str, dataset: str = "cifar10",
                          subset: int | None = None, seed: int = 0, root=None) -> Path:
    """<root or CHECKPOINT_DIR>/<poison>/<run_name>/ holding epoch=<e>.pt (e from 0)."""
    return Path(root or checkpoint_dir()) / poison / run_name(model, dataset, subset, seed)


def epoch_checkpoints(folder: Path) -> dict[int, Path]:
    """{epoch: path} of the epoch=<e>.pt files in folder."""
    out = {}
    for p in Path(folder).glob("epoch=*.pt"):
        try:
            out[int(p.stem.split("=", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(out.items()))


def linear_model_path(poison: str, dataset: str = "cifar10", subset: int | None = None,
                      root=None) -> Path:
    """Orthogonal projection step 1's linear model: <CHECKPOINT_DIR>/logistic-regression/<tag>.pt."""
    tag = poison
    if canonical_dataset_name(dataset) != "cifar10":
        tag += f"-{canonical_dataset_name(dataset)}"
    if subset:
        tag += f"-sub{subset}"
    return Path(root or checkpoint_dir()) / "logistic-regression" / f"{tag}.pt"


def milestones_at(epochs: int, fractions=(0.5, 0.75)) -> tuple[int, ...]:
    """int(E·f) for each fraction, as the official scripts (20 → 10, 15; 50 → 25, 37)."""
    return tuple(int(epochs * f) for f in fractions)


# --- Orthogonal projection (Algorithm 1) -------------------------------------------------------

class BiasFreeLinear(nn.Module):
    """Linear(C·H·W → K, bias=False) on flattened raw pixels; state_dict key `fc.weight` as in
    the official logistic-regression checkpoints."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes, bias=False)

    def forward(self, x):
        return self.fc(x.flatten(1))


def fit_class_weights(loader, num_classes: int, epochs: int = 20, lr: float = 0.1, seed: int = 0,
                      device="cpu", desc: str = "linear model") -> tuple[BiasFreeLinear, list[dict]]:
    """Algorithm 1, lines 1–4: a bias-free linear model on the poisoned images as the loader gives
    them (the scripts pass unnormalised [0,1] pixels, no augmentation, no shuffling): plain SGD
    (no momentum, no weight decay), cross-entropy, LR ×0.1 at 50 % and 75 % of the epochs."""
    x0 = loader.images(loader.indices[:1].to(loader.device))
    torch.manual_seed(seed)
    model = BiasFreeLinear(x0[0].numel(), num_classes).to(device)
    cfg = engine.TrainConfig(epochs=epochs, lr=lr, momentum=0.0, weight_decay=0.0,
                             schedule="multistep", milestones=milestones_at(epochs), amp=False,
                             channels_last=False, log_every=10)
    history = engine.fit(model, loader, cfg, loss_fn=_cross_entropy_ftz, desc=desc)
    return model, history


def _cross_entropy_ftz(model: nn.Module, batch):
    logits = flush_denormal_grad(model(batch.x))
    return F.cross_entropy(logits, batch.y), logits, batch.y


def class_basis(weight: torch.Tensor) -> torch.Tensor:
    """Q (d×K, orthonormal columns) spanning the class weight vectors (rows of `weight`, each
    L2-normalised first, as the official `project_data(use_q_matrix=True)`); QR in float64."""
    w = weight.detach().flatten(1).double().cpu()
    norms = w.norm(dim=1, keepdim=True)
    if not torch.isfinite(w).all() or (norms == 0).any():
        raise UserError("the linear model has a zero or non-finite class weight vector; retrain "
                        "orthogonal_projection_step_1.py")
    q, _ = torch.linalg.qr((w / norms).T, mode="reduced")
    return q


def project_out(x_flat: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """X_r = X − X Q Qᵀ (samples as rows): removes the span of Q's columns, nothing else."""
    return x_flat - (x_flat @ q) @ q.T


class OrthogonalProjection:
    """BatchLoader `transform`: project each [0,1] image (flattened) onto the orthogonal
    complement of the class weights. No clipping afterwards (as the original)."""

    def __init__(self, weight: torch.Tensor):
        self.q = class_basis(weight).float()
        self._on = {}

    def __call__(self, x: torch.Tensor, idx=None) -> torch.Tensor:
        q = self._on.get(x.device)
        if q is None:
            q = self._on[x.device] = self.q.to(x.device)
        if x[0].numel() != q.shape[0]:
            raise UserError(f"the linear model has {q.shape[0]} inputs but the images have "
                            f"{x[0].numel()} values; it was trained on other data")
        return project_out(x.flatten(1), q).view_as(x)


def load_class_weights(path: Path, num_classes: int, image_shape) -> torch.Tensor:
    """fc.weight (K×C·H·W) of a step-1 checkpoint (ours, or the official bare state_dict)."""
    sd, _ = engine.load_checkpoint(path)
    w = sd.get("fc.weight")
    d = math.prod(image_shape)
    if w is None or w.shape != (num_classes, d):
        got = tuple(w.shape) if w is not None else f"keys {list(sd)[:4]}"
        raise UserError(f"{path}: expected fc.weight of shape ({num_classes}, {d}), got {got}")
    return w.float()


def save_weight_grid(weight: torch.Tensor, image_shape, path, class_names=None,
                     ncol: int = 10) -> Path:
    """PNG of the class weight vectors as images, each min-max scaled to [0,1] on its own
    (the recovered perturbations), `ncol` per row, any number of classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = weight.shape[0]
    imgs = weight.detach().float().cpu().view(k, *image_shape)
    lo = imgs.flatten(1).min(1)[0].view(-1, 1, 1, 1)
    hi = imgs.flatten(1).max(1)[0].view(-1, 1, 1, 1)
    imgs = (imgs - lo) / (hi - lo).clamp_min(1e-12)
    cols = min(ncol, k)
    rows = -(-k // cols)
    fig = Figure(figsize=(1.1 * cols, 1.25 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        ax.set_axis_off()
        if i < k:
            ax.imshow(imgs[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            name = class_names[i] if class_names and i < len(class_names) else str(i)
            ax.set_title(str(name)[:12], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# --- CutMix and strong augmentation ------------------------------------------------------------

def rand_bbox(h: int, w: int, lam: float, gen: torch.Generator | None = None):
    """CutMix box (Yun et al.): sides √(1−λ)·(H, W), centre uniform, clipped to the image."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, (1,), generator=gen))
    cx = int(torch.randint(w, (1,), generator=gen))
    return (max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w))


class CutMixLoss:
    """engine.fit loss_fn: with probability `prob` (and beta > 0), paste a box of a shuffled copy
    of the batch into it (λ ~ Beta(β, β), then λ set to the exact kept area) and mix the two
    cross-entropies; otherwise plain cross-entropy. Accuracy is reported against the original
    labels, as the official script. Draws from the global torch RNG (CPU), which engine.fit
    saves with its resume state, so a resumed run replays the same boxes."""

    def __init__(self, beta: float = 1.0, prob: float = 0.5):
        if beta < 0 or not 0 <= prob <= 1:
            raise UserError(f"CutMix needs beta >= 0 and prob in [0, 1], got {beta}, {prob}")
        self.beta, self.prob = beta, prob
        self._beta = torch.distributions.Beta(torch.tensor(float(max(beta, 1e-8))),
                                              torch.tensor(float(max(beta, 1e-8))))

    def __call__(self, model, batch):
        x, y = batch.x, batch.y
        if self.beta > 0 and float(torch.rand(())) < self.prob:
            lam = float(self._beta.sample())
            perm = torch.randperm(len(x)).to(x.device)
            h, w = x.shape[-2:]
            r1, r2, c1, c2 = rand_bbox(h, w, lam)
            x = x.clone()
            x[:, :, r1:r2, c1:c2] = x[perm, :, r1:r2, c1:c2]
            lam = 1.0 - (r2 - r1) * (c2 - c1) / (h * w)
            logits = model(x)
            loss = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
            return loss, logits, y
        logits = model(x)
        return F.cross_entropy(logits, y), logits, y


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


@dataclass
class StrongAugment:
    """The official "strong augmentation", as whole-batch tensor ops (same call signature as
    datasets.Augment): RandomRotation(±degrees), RandomAffine(shear ±shear° along x, scale),
    ColorJitter(brightness, contrast, saturation), then crop (zero padding) + horizontal flip.
    Rotation and shear/scale are composed into one affine warp sampled once with nearest
    neighbour and zero fill (torchvision samples twice); the three jitters run in a random order
    per batch (torchvision: per image). Each jitter clamps to [0,1] like torchvision's, which is
    where projected (out-of-range) pixels get clipped, as in the original."""

    degrees: float = 10.0
    shear: float = 10.0
    scale: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    crop: int = 4
    flip: bool = True

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, dev = len(x), x.device

        def uniform(lo, hi):
            return (lo + (hi - lo) * torch.rand(b, generator=gen, dtype=torch.float64))

        ang = torch.deg2rad(uniform(-self.degrees, self.degrees))
        sh = torch.deg2rad(uniform(-self.shear, self.shear))
        sc = uniform(*self.scale)
        rot = torch.stack([torch.stack([ang.cos(), -ang.sin()], 1),
                           torch.stack([ang.sin(), ang.cos()], 1)], 1)
        shear = torch.zeros(b, 2, 2, dtype=torch.float64)
        shear[:, 0, 0], shear[:, 0, 1], shear[:, 1, 1] = 1.0, sh.tan(), 1.0
        forward = sc.view(-1, 1, 1) * shear @ rot  # rotate first, then shear and scale
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, :, :2] = torch.linalg.inv(forward)  # grid_sample maps output -> input
        grid = F.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

        factors = {"b": uniform(1 - self.brightness, 1 + self.brightness),
                   "c": uniform(1 - self.contrast, 1 + self.contrast),
                   "s": uniform(1 - self.saturation, 1 + self.saturation)}
        for i in torch.randperm(3, generator=gen).tolist():
            name = "bcs"[i]
            f = factors[name].to(dev, x.dtype).view(-1, 1, 1, 1)
            if name == "b":
                x = (x * f).clamp(0, 1)
            elif name == "c":
                m = _gray(x).mean((1, 2, 3), keepdim=True)
                x = (f * x + (1 - f) * m).clamp(0, 1)
            else:
                x = (f * x + (1 - f) * _gray(x)).clamp(0, 1)
        if self.crop or self.flip:
            if self.crop:
                x = crop_flip(x, self.crop, gen, self.flip)
            else:
                flips = (torch.rand(b, generator=gen) < 0.5).to(dev)
                x = torch.where(flips[:, None, None, None], x.flip(3), x)
        return x


# --- Deep feature reweighting (§4.2) -----------------------------------------------------------

def dfr_indices(labels: torch.Tensor, n: int, seed: int, path: Path) -> torch.Tensor:
    """The fixed clean DFR subset: read from `path`, or drawn once (class-balanced, seeded) and
    saved there. An existing file of another size is an error, never silently replaced."""
    path = Path(path)
    if path.is_file():
        idx = read_index_json(path, len(labels))
        if len(idx) != n:
            raise UserError(f"{path} holds {len(idx)} indices, not --num_dfr_train {n}; delete it "
                            f"or pass --num_dfr_train {len(idx)}")
        return idx
    idx = balanced_subset(labels, n, seed)
    write_json(path, {"indices": idx.tolist(), "n": n, "seed": seed,
                      "per_class": torch.bincount(labels[idx]).tolist()})
    return idx


@torch.no_grad()
def extract_features(model, loader, amp: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features float32, labels), on the loader's device, model in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    feats, labels = [], []
    with engine.autocast(dev, engine.resolve_amp(amp, dev)):
        for batch in loader:
            feats.append(model.features(batch.x).float())
            labels.append(batch.y)
    model.train(was)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def head_metrics(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) of a linear head on cached features."""
    logits = head(feats)
    return (100.0 * (logits.argmax(1) == labels).float().mean().item(),
            F.cross_entropy(logits, labels).item())


def fit_head_lbfgs(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int = 75,
                   lr: float = 0.5, max_iter: int = 20, weight_decay: float = 0.0) -> list[float]:
    """Refit `head` in place by full-batch L-BFGS on cached features (cross-entropy, plus
    weight_decay/2·‖W‖² when set), starting from its current weights as the original does.
    steps × max_iter mirrors the official 15 epochs × 5 minibatches × 20 iterations."""
    params = [p for p in head.parameters()]
    opt = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter)
    losses = []

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(flush_denormal_grad(head(feats)), labels)
        if weight_decay:
            loss = loss + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad(), flush_denormals():
        for _ in tqdm(range(steps), desc="DFR L-BFGS", leave=False, disable=None):
            losses.append(float(opt.step(closure).detach()))
    return losses


def dfr_cached(model, train_loader, test_loader, *, steps: int = 75, lr: float = 0.5,
               max_iter: int = 20, weight_decay: float = 0.0, amp: bool | None = None) -> dict:
    """DFR with features computed once (eval mode, no augmentation) on the clean subset and the
    test set; only `model.head` changes. Returns the before/after metrics."""
    tr_f, tr_y = extract_features(model, train_loader, amp)
    te_f, te_y = extract_features(model, test_loader, amp)
    head = model.head
    out = _metrics("", head, tr_f, tr_y, te_f, te_y)
    with torch.no_grad():  # a float32 copy even if the model runs in another dtype
        fitted = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                           device=tr_f.device)
        fitted.load_state_dict({k: v.float() for k, v in head.state_dict().items()})
    losses = fit_head_lbfgs(fitted, tr_f, tr_y, steps, lr, max_iter, weight_decay)
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.copy_(getattr(fitted, name).to(p.dtype))
    out.update(_metrics("dfr_", fitted, tr_f, tr_y, te_f, te_y))
    out["dfr_fit_loss"] = losses[-1] if losses else None
    return out


def _metrics(prefix, head, tr_f, tr_y, te_f, te_y) -> dict:
    te_acc, te_loss = head_metrics(head, te_f, te_y)
    tr_acc, tr_loss = head_metrics(head, tr_f, tr_y)
    return {f"{prefix}test_acc": te_acc, f"{prefix}test_loss": te_loss,
            f"{prefix}subset_acc": tr_acc, f"{prefix}subset_loss": tr_loss}


@torch.no_grad()
def loss_and_accuracy(model, loader, amp: bool | None = None) -> tuple[float, float]:
    logits, labels = engine.predict(model, loader, amp)
    return (100.0 * (logits.argmax(1) == labels).float().mean().item(),
            F.cross_entropy(logits, labels).item())


def dfr_augment(model, train_loader, eval_train_loader, test_loader, cfg: engine.TrainConfig) -> dict:
    """The official DFR: augmented clean batches through engine.fit with the model in train mode
    (BatchNorm running statistics are re-estimated on the clean subset; BatchNorm affine and
    every other parameter stay frozen), only the head optimised. engine.fit has no L-BFGS, so
    `cfg` names a first-order optimiser."""
    out = {}
    out["test_acc"], out["test_loss"] = loss_and_accuracy(model, test_loader, cfg.amp)
    out["subset_acc"], out["subset_loss"] = loss_and_accuracy(model, eval_train_loader, cfg.amp)
    head_params = set(id(p) for p in model.head.parameters())
    for p in model.parameters():
        p.requires_grad_(id(p) in head_params)
    engine.fit(model, train_loader, cfg, params=model.head.parameters(), desc="DFR (augment)")
    out["dfr_test_acc"], out["dfr_test_loss"] = loss_and_accuracy(model, test_loader, cfg.amp)
    out["dfr_subset_acc"], out["dfr_subset_loss"] = loss_and_accuracy(model, eval_train_loader, cfg.amp)
    return out


# --- Linear separability of the perturbations (§4.3) ------------------------------------------

def perturbations(poisoned: torch.Tensor, clean: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(poisoned − clean)/255 as float32 N×C×H×W in host memory (what the model saw minus the
    clean image, so clipping and quantisation are included). The official script computes
    clean − poisoned; after the global min-max scaling a linear probe cannot tell the two apart."""
    if poisoned.shape != clean.shape:
        raise UserError(f"poisoned {tuple(poisoned.shape)} and clean {tuple(clean.shape)} differ")
    out = torch.empty(poisoned.shape, dtype=torch.float32)
    for s in range(0, len(clean), chunk):
        out[s:s + chunk] = (poisoned[s:s + chunk].float() - clean[s:s + chunk].float()) / 255
    return out


def min_max_01_(x: torch.Tensor) -> torch.Tensor:
    """One global min-max scaling to [0,1], in place (the official `normalize_01`)."""
    lo, hi = x.min(), x.max()
    if not hi > lo:
        raise UserError("every perturbation value is the same (is the poison the clean data?)")
    return x.sub_(lo).div_(hi - lo)


def make_probe(in_features: int, num_classes: int, hidden_layers: int = 0, width: int = 30) -> nn.Module:
    """Flatten → [Linear(·, width) → Tanh] × hidden_layers → Linear(·, K), with biases."""
    if hidden_layers < 0:
        raise UserError(f"--hidden_layers must be >= 0, got {hidden_layers}")
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(d, width), nn.Tanh()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def fit_probe_lbfgs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 500,
                    lr: float = 0.5, max_iter: int = 20, chunk: int = 16384,
                    progress: Callable[[int, float, float], None] | None = None) -> dict:
    """Full-batch L-BFGS (`steps` calls of .step, each up to `max_iter` iterations, torch's
    default 20 as the official script) on cross-entropy over ALL of (x, y). x stays where it is
    (host memory): every evaluation streams it through the model's device in chunks of `chunk`
    rows and accumulates the exact full-batch gradient, so the set never has to fit on a GPU.
    After each step the training accuracy and loss are measured. Returns the curves."""
    dev = next(model.parameters()).device
    n = len(x)
    yd = y.to(dev)

    def chunks():
        for s in range(0, n, chunk):
            yield x[s:s + chunk].to(dev, non_blocking=True), yd[s:s + chunk]

    return fit_probe_lbfgs_chunks(model, chunks, n, steps=steps, lr=lr, max_iter=max_iter,
                                  progress=progress)


def fit_probe_lbfgs_chunks(model: nn.Module, chunks: Callable, n: int, *, steps: int, lr: float,
                           max_iter: int, progress: Callable[[int, float, float], None] | None = None
                           ) -> dict:
    """fit_probe_lbfgs over any source of the full set: `chunks()` yields (x, y) on the model's
    device and together covers all n samples once."""
    dev = next(model.parameters()).device
    opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max_iter)

    def closure():
        opt.zero_grad()
        total = torch.zeros((), device=dev)
        for xb, yb in chunks():
            loss = F.cross_entropy(flush_denormal_grad(model(xb)), yb, reduction="sum") / n
            loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def measure():
        correct, total = 0, 0.0
        for xb, yb in chunks():
            logits = model(xb)
            correct += int((logits.argmax(1) == yb).sum())
            total += float(F.cross_entropy(logits, yb, reduction="sum"))
        return 100.0 * correct / n, total / n

    accs, losses = [], []
    bar = tqdm(range(steps), desc="L-BFGS", leave=False, disable=None)
    for step in bar:
        with flush_denormals():
            opt.step(closure)
            acc, loss = measure()
        accs.append(acc)
        losses.append(loss)
        bar.set_postfix(acc=f"{acc:.2f}", loss=f"{loss:.3f}")
        if progress is not None:
            progress(step, acc, loss)
    return {"train_acc": accs, "train_loss": losses}


def _zero_denormals(grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(grad.abs() < torch.finfo(grad.dtype).tiny, 0)


def flush_denormal_grad(logits: torch.Tensor) -> torch.Tensor:
    """Near a perfect fit the softmax gradient holds denormal floats (e.g. 2,015 of the
    10,240 entries of a 1024-image batch in orthogonal projection step 1), and the
    weight-gradient matrix product on them runs ~10x slower on x86 CPUs. flush_denormals()
    reaches only the calling thread, not torch's intra-op worker threads, so on CPU the
    logits' gradient is flushed here (what flush-to-zero would do to it). Returns `logits`."""
    if logits.requires_grad and logits.device.type == "cpu":
        logits.register_hook(_zero_denormals)
    return logits


@contextmanager
def flush_denormals():
    """Near a perfect fit the softmax produces denormal floats, which made CPU L-BFGS ~10-40x
    slower; flush them to zero while fitting (CPU only; restored to torch's default after)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


# --- Plots ------------------------------------------------------------------------------------

def plot_lines(path, x, series: dict, xlabel: str, ylabel: str, title: str = "",
               hlines: dict | None = None, styles: dict | None = None) -> Path:
    """A PNG line plot (matplotlib without pyplot: no global state), written atomically.
    `x` is shared by every series; with x=None each series is its own (xs, ys) pair.
    `styles` maps a label to extra `ax.plot` keywords (colour, linestyle, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, ys in series.items():
        xs, ys = ys if x is None else (x, ys)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                **(styles or {}).get(label, {}))
    for label, yv in (hlines or {}).items():
        ax.axhline(yv, linestyle="--", color="grey", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if len(series) + len(hlines or {}) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path

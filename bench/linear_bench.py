"""The linear-model stages of the unlearnable-datasets scripts, each timed our way (data resident
as tensors, whole-batch ops) against the same stage fed by a standard per-sample DataLoader.

  op1     orthogonal projection step 1: orthogonal_projection.fit_class_weights (bias-free
          linear model, plain SGD lr 0.1, batch 1024, no shuffling) on the poisoned training
          images
            ours        BatchLoader over the uint8 poisoned set on the device
            imagefolder torchvision ImageFolder of the poisoned images (PNG) + ToTensor,
                        DataLoader(num_workers); the same fit_class_weights call
            dataset     a per-sample Dataset over the same in-memory uint8 tensor + DataLoader
  linsep  linear separability: linear_separability.fit_probe_lbfgs (full-batch L-BFGS logistic
          regression on the perturbations, chunks of --chunk rows)
            ours        the perturbations as one float tensor, chunks are slices
            dataset     TensorDataset of the same perturbations + DataLoader(batch = chunk,
                        num_workers, persistent): the same closure, chunks from the loader
  dfr     DFR's last-layer fit: dfr.dfr_cached (features of the clean subset and the
          test set computed once, head refit by L-BFGS, before/after accuracies)
            ours        features from the resident split (BatchLoader)
            imagefolder the official procedure's data path: ImageFolder (JPEG) + ToTensor +
                        Normalize, DataLoader; per batch the features, then one L-BFGS step on
                        that batch (epochs x batches = the same number of L-BFGS steps), and
                        the before/after accuracies through the DataLoader
            once        features computed once, but through the ImageFolder DataLoader, then
                        the same fit_head_lbfgs (isolates the input pipeline)

Every variant runs the same model, optimiser and number of steps; the ratio is the standard
variant's seconds over ours. The stages are shortened for a CPU (op1: --op-epochs of the 20;
linsep: --ls-steps of the 500 and a --ls-subset): per-epoch / per-step cost is what is compared.

    python bench/linear_bench.py                       # all three stages
    python bench/linear_bench.py --stages op1 --op-epochs 5
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import engine  # noqa: E402
import poisons  # noqa: E402
from cli import add_runtime_args, run_main, setup_runtime  # noqa: E402
from constants import DATASETS, UserError, cache_dir, data_root, results_dir  # noqa: E402
from datasets import Batch, BatchLoader, balanced_subset, load_split  # noqa: E402
from models import get_model  # noqa: E402
from reporting import write_json  # noqa: E402
from views import TrainingView  # noqa: E402
from dfr import dfr_cached, extract_features, fit_head_lbfgs, head_loss_closure  # noqa: E402
from linear_separability import (fit_probe_lbfgs, fit_probe_lbfgs_chunks, make_probe,  # noqa: E402
                                 min_max_01_, perturbations)
from numerics import flush_denormals  # noqa: E402
from orthogonal_projection import fit_class_weights  # noqa: E402


# ----------------------------------------------------------------------------- standard feeds

class DataLoaderStream:
    """A torch DataLoader as an engine stream, with the two attributes fit_class_weights reads
    (`indices`, `images`) so the very same function runs on it."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device
        self.indices = torch.arange(len(loader.dataset))

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        pass

    def images(self, idx):
        return torch.stack([self.loader.dataset[int(i)][0] for i in idx]).to(self.device)

    def __iter__(self):
        for x, y in self.loader:
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None)


class UInt8Dataset(torch.utils.data.Dataset):
    """Per-sample access to an in-memory uint8 N x C x H x W tensor, as a standard Dataset
    (ToTensor's scaling to [0, 1] per image)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].float().div(255), int(self.y[i])


def dataloader(dataset, batch_size, workers, device, shuffle=False, persistent=False):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=persistent and workers > 0)


def write_imagefolder(images: torch.Tensor, labels: torch.Tensor, classes, folder: Path) -> Path:
    """The poisoned set as PNG files (what a released poison usually is); written once."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file() and int(done.read_text()) == len(images):
        return folder
    print(f"writing {len(images)} PNGs to {folder} (once)")
    arr = images.permute(0, 2, 3, 1).numpy()
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(arr, labels.tolist())):
        Image.fromarray(img).save(folder / classes[y] / f"{i:05d}.png")
    done.write_text(str(len(images)))
    return folder


def timed(fn, device):
    engine.sync(device)
    t0 = time.perf_counter()
    out = fn()
    engine.sync(device)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- stages

def bench_op1(args, device) -> list[dict]:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    split = load_split(args.dataset, True)
    images, labels, _ = poisons.poisoned_train_set(args.poison, args.dataset, split=split)
    k = len(split.classes)
    n = len(images)
    fit = dict(num_classes=k, epochs=args.op_epochs, lr=0.1, seed=0, device=device)
    ours = BatchLoader(split, None, batch_size=1024, shuffle=False, device=device, augment=None,
                       normalize=False, view=TrainingView(torch.arange(n), images, labels))
    t_ours, (m_ours, h_ours) = timed(lambda: fit_class_weights(ours, desc="op1 ours", **fit), device)
    rows = [dict(stage="op1", variant="ours", seconds=t_ours, train_acc=h_ours[-1].get("train_acc"))]

    folder = write_imagefolder(images, labels, split.classes,
                               Path(args.png_dir or cache_dir() / "bench_imagefolder") /
                               f"{args.dataset}-{args.poison}-{n}")
    variants = {"imagefolder": ImageFolder(str(folder), T.ToTensor()),
                "dataset": UInt8Dataset(images, labels)}
    for name, ds in variants.items():
        stream = DataLoaderStream(dataloader(ds, 1024, args.workers, device), device)
        t, (m, h) = timed(lambda: fit_class_weights(stream, desc=f"op1 {name}", **fit), device)
        rows.append(dict(stage="op1", variant=name, seconds=t, train_acc=h[-1].get("train_acc"),
                         ratio=t / t_ours))
    note = f"{n} poisoned ({args.poison}) images, {args.op_epochs} epochs of 20, batch 1024"
    for r in rows:
        r["what"] = note
    return rows


def fit_probe_lbfgs_loader(model, loader, n, *, steps, lr, max_iter) -> dict:
    """linear_separability.fit_probe_lbfgs with the chunks coming from a DataLoader (same closure)."""
    dev = next(model.parameters()).device

    def chunks():
        for xb, yb in loader:
            yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)

    return fit_probe_lbfgs_chunks(model, chunks, n, steps=steps, lr=lr, max_iter=max_iter)


def bench_linsep(args, device) -> list[dict]:
    clean = load_split(args.dataset, True)
    images, labels, _ = poisons.poisoned_train_set(args.poison, args.dataset, split=clean)
    idx = balanced_subset(clean.y, args.ls_subset, 0) if args.ls_subset else torch.arange(len(clean))
    x, y = min_max_01_(perturbations(images[idx], clean.x[idx])), labels[idx]
    k = len(clean.classes)
    lb = dict(steps=args.ls_steps, lr=0.5, max_iter=20)

    def probe():
        torch.manual_seed(0)
        return make_probe(x[0].numel(), k).to(device)

    xd = x.to(device) if device.type == "cuda" else x  # as the script: on the GPU when it fits
    t_ours, c_ours = timed(lambda: fit_probe_lbfgs(probe(), xd, y, chunk=args.chunk, **lb), device)
    loader = dataloader(torch.utils.data.TensorDataset(x, y), args.chunk, args.workers, device,
                        persistent=True)
    t_std, c_std = timed(lambda: fit_probe_lbfgs_loader(probe(), loader, len(y), **lb), device)
    # profile: one L-BFGS evaluation's pass our way (forward + backward over every chunk)
    # against one pass of the DataLoader alone (no model)
    model, yd = probe(), y.to(device)

    def ours_pass():
        for s in range(0, len(y), args.chunk):
            F.cross_entropy(model(xd[s:s + args.chunk]), yd[s:s + args.chunk], reduction="sum").backward()

    def loader_pass():
        for xb, yb in loader:
            xb.to(device), yb.to(device)

    t_pass = min(timed(ours_pass, device)[0] for _ in range(3))
    t_load = min(timed(loader_pass, device)[0] for _ in range(3))
    flops = 2 * 2 * x.numel() * k  # forward and weight gradient of the K-way linear layer
    profile = {"ours_pass_s": t_pass, "ours_gflops": flops / t_pass / 1e9, "dataloader_pass_alone_s": t_load}
    note = (f"{len(y)} perturbations ({args.poison}), {args.ls_steps} L-BFGS steps of 500 "
            f"(max_iter 20), chunk {args.chunk}")
    return [dict(stage="linsep", variant="ours", seconds=t_ours, train_acc=c_ours["train_acc"][-1], what=note,
                 profile=profile),
            dict(stage="linsep", variant="dataset", seconds=t_std, train_acc=c_std["train_acc"][-1],
                 ratio=t_std / t_ours, what=note)]


@torch.no_grad()
def _features(model, loader, device):
    feats, ys = [], []
    for xb, yb in loader:
        feats.append(model.features(xb.to(device, non_blocking=True)).float())
        ys.append(yb.to(device))
    return torch.cat(feats), torch.cat(ys)


@torch.no_grad()
def _accuracy(model, loader, device):
    correct = n = 0
    for xb, yb in loader:
        correct += int((model(xb.to(device)).argmax(1) == yb.to(device)).sum())
        n += len(yb)
    return 100.0 * correct / n


def dfr_per_batch(model, train_dl, test_dl, eval_train_dl, device, *, epochs, max_iter, lr) -> dict:
    """The official DFR's shape, fed by DataLoaders: per batch, features of the frozen network
    (eval mode, no augmentation here), then one L-BFGS step (max_iter iterations) on that batch;
    accuracies before and after through the loaders."""
    model.eval()
    out = {"test_acc": _accuracy(model, test_dl, device), "subset_acc": _accuracy(model, eval_train_dl, device)}
    head = model.head
    opt = torch.optim.LBFGS(head.parameters(), lr=lr, max_iter=max_iter)
    for _ in range(epochs):
        for xb, yb in train_dl:
            with torch.no_grad():
                f = model.features(xb.to(device, non_blocking=True)).float()
            with flush_denormals():
                opt.step(head_loss_closure(opt, head, f, yb.to(device)))
    out.update(dfr_test_acc=_accuracy(model, test_dl, device), dfr_subset_acc=_accuracy(model, eval_train_dl, device))
    return out


def bench_dfr(args, device) -> list[dict]:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    info = DATASETS[args.dataset]
    train, test = load_split(args.dataset, True), load_split(args.dataset, False)
    idx = balanced_subset(train.y, args.num_dfr_train, 0)
    torch.manual_seed(0)
    base = get_model(args.dfr_model, len(train.classes)).to(device).eval()
    if args.dfr_checkpoint:
        sd, _ = engine.load_checkpoint(args.dfr_checkpoint)
        engine.load_weights(base, sd, args.dfr_checkpoint)
    bs = 1024
    batches = -(-len(idx) // bs)
    steps = args.dfr_epochs * batches  # the same number of L-BFGS steps in every variant
    ours_sub = BatchLoader(train, idx, batch_size=bs, device=device)
    ours_test = BatchLoader(test, None, batch_size=bs, device=device)
    t_ours, r_ours = timed(lambda: dfr_cached(copy.deepcopy(base), ours_sub, ours_test, steps=steps,
                                              max_iter=args.dfr_iters, lr=0.5, amp=False), device)

    # profile of ours: the forward passes for the features against the L-BFGS fit itself
    probe = copy.deepcopy(base)
    t_feat, (tr_f, tr_y) = timed(lambda: extract_features(probe, ours_sub, False), device)
    t_feat_test, _ = timed(lambda: extract_features(probe, ours_test, False), device)
    t_fit, _ = timed(lambda: fit_head_lbfgs(probe.head, tr_f, tr_y, steps, 0.5, args.dfr_iters), device)
    profile = {"features_subset_s": t_feat, "features_test_s": t_feat_test, "lbfgs_fit_s": t_fit}

    root = data_root() / args.dataset
    tf = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    train_if, test_if = ImageFolder(str(root / "train"), tf), ImageFolder(str(root / "test"), tf)
    if not torch.equal(torch.tensor(train_if.targets)[idx], train.y[idx]):
        raise UserError(f"{root}/train is not in the order of the decoded split; the subsets would differ")
    sub_if = torch.utils.data.Subset(train_if, idx.tolist())
    mk = lambda ds: dataloader(ds, bs, args.workers, device, persistent=True)  # noqa: E731
    train_dl, eval_dl, test_dl = mk(sub_if), mk(sub_if), mk(test_if)
    t_std, r_std = timed(lambda: dfr_per_batch(copy.deepcopy(base), train_dl, test_dl, eval_dl, device,
                                               epochs=args.dfr_epochs, max_iter=args.dfr_iters, lr=0.5), device)

    def once():
        model = copy.deepcopy(base)
        tr_f, tr_y = _features(model, eval_dl, device)
        te_f, te_y = _features(model, test_dl, device)
        fit_head_lbfgs(model.head, tr_f, tr_y, steps, 0.5, args.dfr_iters)
        with torch.no_grad():
            return {"dfr_test_acc": 100.0 * (model.head(te_f).argmax(1) == te_y).float().mean().item()}

    t_once, r_once = timed(once, device)
    note = (f"{args.dfr_model}, {len(idx)} clean + {len(test)} test images, {steps} L-BFGS steps "
            f"x {args.dfr_iters} iterations ({args.dfr_epochs} epochs x {batches} batches)")
    return [dict(stage="dfr", variant="ours", seconds=t_ours, dfr_test_acc=r_ours["dfr_test_acc"], what=note,
                 profile=profile),
            dict(stage="dfr", variant="imagefolder", seconds=t_std, dfr_test_acc=r_std["dfr_test_acc"],
                 ratio=t_std / t_ours, what=note),
            dict(stage="dfr", variant="once", seconds=t_once, dfr_test_acc=r_once["dfr_test_acc"],
                 ratio=t_once / t_ours, what=note)]


STAGES = {"op1": bench_op1, "linsep": bench_linsep, "dfr": bench_dfr}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--poison", default="lsp", help="generated poison key (op1, linsep)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers")
    p.add_argument("--png-dir", default=None, help="where the poisoned PNG ImageFolder is written "
                   "(default CACHE_DIR/bench_imagefolder)")
    p.add_argument("--op-epochs", type=int, default=2, help="op1 epochs (the stage: 20)")
    p.add_argument("--ls-subset", type=int, default=20000, help="linsep images (0: all)")
    p.add_argument("--ls-steps", type=int, default=2, help="linsep L-BFGS steps (the stage: 500)")
    p.add_argument("--chunk", type=int, default=16384, help="linsep rows per chunk")
    p.add_argument("--dfr-model", default=None, help="default resnet18 on CUDA, smallcnn on CPU")
    p.add_argument("--dfr-checkpoint", default=None, help="weights for the DFR network (default: random init)")
    p.add_argument("--num-dfr-train", type=int, default=5000)
    p.add_argument("--dfr-epochs", type=int, default=15)
    p.add_argument("--dfr-iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the rows here (default RESULTS_DIR/bench/linear_bench.json)")
    add_runtime_args(p)
    args = p.parse_args(argv)
    device = setup_runtime(args)
    if args.dfr_model is None:
        args.dfr_model = "resnet18" if device.type == "cuda" else "smallcnn"
    import torchvision

    header = (f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"threads {torch.get_num_threads()}, DataLoader workers {args.workers}")
    rows = []
    for stage in args.stages:
        rows += STAGES[stage](args, device)
    print("\n" + header)
    for r in rows:
        extra = ", ".join(f"{k} {r[k]:.2f}" for k in ("train_acc", "dfr_test_acc") if r.get(k) is not None)
        ratio = f"  {r['ratio']:6.1f}x ours" if "ratio" in r else ""
        print(f"{r['stage']:<7} {r['variant']:<12} {r['seconds']:8.2f} s{ratio}   ({extra})")
    for r in rows:
        if "profile" in r:
            print(f"{r['stage']} {r['variant']} profile: " + ", ".join(f"{k} {v:.2f}" for k, v in r["profile"].items()))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        print(f"{stage}: {next(r['what'] for r in rows if r['stage'] == stage)}")
    out = Path(args.json) if args.json else results_dir() / "bench" / "linear_bench.json"
    write_json(out, {"header": header, "argv": sys.argv[1:] if argv is None else list(argv), "rows": rows})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

"""Training throughput of this repo's loop against a standard PyTorch input pipeline.

Both feed the same model, batch size, precision and optimizer through engine.fit; only
the input pipeline differs:
  ours      : uint8 split resident on the device, crop/flip/normalise as batch tensor ops
  standard  : torchvision ImageFolder + RandomCrop/RandomHorizontalFlip/ToTensor/Normalize
              per sample, DataLoader(num_workers = cores)
It also splits our step time: the input pipeline alone (batching, crop/flip, normalisation),
the model compute alone (forward, backward and optimizer step on one resident batch, no
bookkeeping), the loop's metrics alone (loss and accuracy accumulated on the device), and
"outside model compute" = our full step minus the bare compute step (not under --compile,
where each would compile once more). On CUDA (or with --epoch) it also times one full
training epoch through engine.fit.

    python bench/loader_bench.py --model smallcnn --batch-size 256 --steps 40
    python bench/loader_bench.py --model resnet18 --batch-size 512 --steps 100   # on a GPU

--profile adds what stands in the way of the step (bench/step_profile.py): a torch.profiler
split of engine.fit's step (GPU-bound or launch-bound, the top kernels), the bare step with
the foreach against the fused optimizer, the bare step in one CUDA graph, and under
--compile torch.compile's graph and graph-break counts; --json writes every figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_profile, also when loaded by path

import torch  # noqa: E402

import engine  # noqa: E402
import step_profile  # noqa: E402
from cli import add_runtime_args, run_main, setup_runtime  # noqa: E402
from constants import DATASETS, UserError, data_root  # noqa: E402
from datasets import Augment, Batch, BatchLoader, load_split  # noqa: E402
from reporting import write_json  # noqa: E402
from models import get_model  # noqa: E402


class DataLoaderStream:
    """A torch DataLoader as an engine stream (what a standard pipeline feeds the loop)."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        for x, y in self.loader:
            yield Batch(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), None)


def standard_loader(folder: Path, batch_size: int, workers: int, pin: bool, mean, std):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(mean, std)])
    return torch.utils.data.DataLoader(ImageFolder(str(folder), tf), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, pin_memory=pin,
                                       drop_last=True, persistent_workers=workers > 0)


def timed_fit(model, stream, cfg, steps, warmup):
    """Images/s over `steps` training steps after `warmup` steps."""
    engine.fit(model, stream, engine.TrainConfig(**{**cfg, "steps": warmup}), desc="warmup")
    engine.sync(next(model.parameters()).device)
    t0 = time.perf_counter()
    engine.fit(model, stream, engine.TrainConfig(**{**cfg, "steps": steps}), desc="timed")
    engine.sync(next(model.parameters()).device)
    return time.perf_counter() - t0


def input_pipeline_seconds(loader, steps, device):
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if i + 1 >= steps:
            break
    engine.sync(device)
    return time.perf_counter() - t0


def metrics_seconds(batch_size: int, num_classes: int, steps: int, device) -> float:
    """engine.fit's per-step bookkeeping (loss, correct, seen accumulated on the device)."""
    logits = torch.randn(batch_size, num_classes, device=device)
    labels = torch.randint(0, num_classes, (batch_size,), device=device)
    loss = logits.logsumexp(1).mean()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)
    engine.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss_sum += loss.detach().float()
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    engine.sync(device)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--skip-standard", action="store_true")
    p.add_argument("--epoch", action="store_true", help="also time one full epoch (default on CUDA)")
    p.add_argument("--repeats", type=int, default=3,
                   help="each timing is the fastest of this many interleaved repeats")
    p.add_argument("--profile", action="store_true", help="also profile the step (bench/step_profile.py)")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--json", help="write every figure to this JSON file")
    add_runtime_args(p)
    args = p.parse_args(argv)
    device = setup_runtime(args)
    info = DATASETS[args.dataset]
    folder = data_root() / args.dataset / "train"
    if not folder.is_dir() and not args.skip_standard:
        raise UserError(f"the standard pipeline reads an ImageFolder at {folder}; set DATA_ROOT "
                        "or pass --skip-standard")
    amp = engine.resolve_amp(args.amp, device)
    cfg = dict(lr=0.05, schedule="constant", amp=args.amp, compile=args.compile, log_every=10**9)
    split = load_split(args.dataset, True)
    ours = BatchLoader(split, batch_size=args.batch_size, shuffle=True, device=device,
                       augment=Augment(), drop_last=True)
    n_img = args.steps * args.batch_size

    import torchvision

    t_ours = t_input = t_compute = t_metrics = t_nograph = float("inf")
    graphs = engine.graph_allowed(engine.TrainConfig(**cfg), device, loss_fn=None, hooks=())
    # under --compile only the step as fit runs it: the op-by-op loop and the bare step would
    # each compile again (another autocast state), minutes that tell nothing about the target
    split_step = not args.compile
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all alike
        torch.manual_seed(0)
        t_ours = min(t_ours, timed_fit(get_model(args.model, info.num_classes).to(device), ours, cfg,
                                       args.steps, args.warmup))
        if graphs and split_step:  # the same loop with its step launched op by op
            torch.manual_seed(0)
            t_nograph = min(t_nograph, timed_fit(get_model(args.model, info.num_classes).to(device), ours,
                                                 {**cfg, "cuda_graph": False}, args.steps, args.warmup))
        t_input = min(t_input, input_pipeline_seconds(ours, args.steps, device))
        if split_step:
            torch.manual_seed(0)
            t_compute = min(t_compute, step_profile.bare_step_seconds(
                get_model(args.model, info.num_classes).to(device), next(iter(ours)), cfg, args.steps, args.warmup))
        t_metrics = min(t_metrics, metrics_seconds(args.batch_size, info.num_classes, args.steps, device))
    figures = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__,
               "torchvision": torchvision.__version__, "model": args.model, "batch_size": args.batch_size,
               "amp": amp, "compile": args.compile, "steps": args.steps, "repeats": args.repeats,
               "ours_ms_per_step": t_ours / args.steps * 1000, "ours_images_per_s": n_img / t_ours,
               "input_ms_per_step": t_input / args.steps * 1000, "input_pct": 100 * t_input / t_ours,
               "metrics_ms_per_step": t_metrics / args.steps * 1000}
    if split_step:
        figures.update(compute_ms_per_step=t_compute / args.steps * 1000,
                       outside_compute_pct=100 * (t_ours - t_compute) / t_ours)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"model {args.model}, batch {args.batch_size}, bf16 autocast {amp}, steps {args.steps}, "
          f"fastest of {args.repeats}")
    print(f"ours      : {n_img / t_ours:9.1f} images/s  ({t_ours / args.steps * 1000:.1f} ms/step)"
          + (", the step as one CUDA graph" if graphs else "") + (", compiled" if args.compile else ""))
    if graphs and split_step:
        print(f"  without the CUDA graph: {n_img / t_nograph:9.1f} images/s  ({t_nograph / args.steps * 1000:.1f} ms/step)")
        figures.update(cuda_graph=True, nograph_images_per_s=n_img / t_nograph,
                       nograph_ms_per_step=t_nograph / args.steps * 1000)
    print(f"  input pipeline (batching + augmentation + normalisation): "
          f"{t_input / args.steps * 1000:.2f} ms/step = {100 * t_input / t_ours:.2f} % of step time")
    print(f"  loop metrics (loss/accuracy accumulation): {t_metrics / args.steps * 1000:.3f} ms/step = "
          f"{100 * t_metrics / t_ours:.2f} % of step time")
    if split_step:
        print(f"  model compute alone (fwd+bwd+optimizer on one resident batch): {t_compute / args.steps * 1000:.1f} "
              f"ms/step; outside model compute: {(t_ours - t_compute) / args.steps * 1000:.2f} ms/step = "
              f"{100 * (t_ours - t_compute) / t_ours:.2f} % of step time")
    if not args.skip_standard:
        std_stream = DataLoaderStream(standard_loader(folder, args.batch_size, args.workers,
                                                      device.type == "cuda", info.mean, info.std), device)
        t_std = float("inf")
        for _ in range(args.repeats):
            torch.manual_seed(0)
            t_std = min(t_std, timed_fit(get_model(args.model, info.num_classes).to(device), std_stream, cfg,
                                         args.steps, args.warmup))
        print(f"standard  : {n_img / t_std:9.1f} images/s  ({t_std / args.steps * 1000:.1f} ms/step, "
              f"ImageFolder + DataLoader, {args.workers} workers)")
        print(f"speed-up  : {t_std / t_ours:.2f}x")
        figures.update(standard_images_per_s=n_img / t_std, speedup=t_std / t_ours, workers=args.workers)
    if device.type == "cuda" or args.epoch:
        torch.manual_seed(0)
        model = get_model(args.model, info.num_classes).to(device)
        engine.fit(model, ours, engine.TrainConfig(**{**cfg, "steps": args.warmup}), desc="warmup")
        engine.sync(device)
        t0 = time.perf_counter()
        engine.fit(model, ours, engine.TrainConfig(**{**cfg, "epochs": 1}), desc="epoch")
        engine.sync(device)
        epoch = time.perf_counter() - t0
        print(f"one epoch measured ({len(ours)} steps, {len(ours) * args.batch_size} images, engine.fit): "
              f"{epoch:.2f} s (at the timed rate: {len(split) / (n_img / t_ours):.2f} s)")
        figures["epoch_s"] = epoch
    if args.profile:
        figures["profile"] = profile(args, ours, cfg, info, device, t_ours / args.steps * 1000)
    if args.json:
        write_json(args.json, figures)
    return 0


def profile(args, ours, cfg: dict, info, device, ms_per_step: float) -> dict:
    """bench/step_profile.py's measurements; one that fails prints why and the rest go on."""
    def make_model():
        return get_model(args.model, info.num_classes).to(device)

    out = {}
    torch.manual_seed(0)
    model = make_model()
    engine.fit(model, ours, engine.TrainConfig(**{**cfg, "steps": args.warmup}), desc="warmup")
    jobs = {}
    if device.type == "cuda":  # under --compile too: both variants share one compilation
        jobs["graph_check"] = lambda: step_profile.graph_check(make_model, ours, cfg, args.profile_steps + 10)
    if args.compile:
        jobs["dynamo"] = step_profile.dynamo_summary
    else:  # the bare-step variants run eager: measured once, in the eager run
        jobs["optimizer_s"] = lambda: step_profile.optimizer_ab(make_model, next(iter(ours)), cfg, args.steps,
                                                                args.warmup, device)
        jobs["cuda_graph_s"] = lambda: step_profile.graphed_compute_seconds(make_model(), next(iter(ours)), cfg,
                                                                            args.steps, device)
    # last: once the profiler has run, CUPTI slows every later launch in this process
    jobs["fit"] = lambda: step_profile.profile_fit(model, ours, cfg, args.profile_steps, ms_per_step, device)
    for name, job in jobs.items():
        try:
            out[name] = job()
        except Exception as e:  # a diagnostic, not the benchmark: report and go on
            print(f"profile {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    if isinstance(out.get("cuda_graph_s"), float):
        print(f"  one CUDA graph per step would take the step from {ms_per_step:.2f} to "
              f"{out['cuda_graph_s'] / args.steps * 1000:.2f} ms plus the input pipeline")
    return out


if __name__ == "__main__":
    run_main(main)

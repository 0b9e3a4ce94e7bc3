"""What SalUn's hard mask costs an epoch: the same unlearning run timed without the saliency
mask (rl_split: per epoch one pass over the forget set with random labels, then one over the
retain set) and with it (salun: rl_split under the mask), on the same model, data, batch
size and device; and the mask's computation (one pass over the forget set) on its own.

    python bench/mask_bench.py --model resnet18                      # on a GPU
    python bench/mask_bench.py --model smallcnn --subset 2000 --threads 2

The model is freshly initialised (the cost does not depend on what it has learnt). A first
rl_split epoch warms the device up and is not counted; each timing is the fastest of
`--repeats`, the two variants interleaved. The issue's target: the mask costs at most 5 %
of an epoch.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_profile, also when loaded by path

import torch  # noqa: E402

import engine  # noqa: E402
import metrics as MX  # noqa: E402
import step_profile  # noqa: E402
import unlearning  # noqa: E402
from cli import add_runtime_args, run_main, setup_runtime  # noqa: E402
from constants import UserError  # noqa: E402
from reporting import write_json  # noqa: E402
from saliency import saliency_mask  # noqa: E402
from training import DataSpec, build_model, prepare_data  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--subset", type=int, default=0, help="class-balanced training subset (0: all)")
    p.add_argument("--class-to-forget", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1, help="epochs per timing")
    p.add_argument("--batch-size", type=int, default=256, help="SalUn's unlearning batch size")
    p.add_argument("--mask-thr", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true",
                   help="also profile 20 steps of each: where the masked step's extra time goes")
    add_runtime_args(p)
    return p


def timed_unlearn(model, method: str, setup) -> float:
    with MX.timer(setup.device) as t:
        unlearning.unlearn(copy.deepcopy(model), method, setup)
    return t.seconds


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.epochs, args.repeats, args.batch_size) <= 0:
        raise UserError("--epochs, --repeats and --batch-size must be positive")
    device = setup_runtime(args)
    data = prepare_data(DataSpec(args.dataset, args.subset or None, 0.1, 0, cf=args.class_to_forget))
    model = build_model(args.model, data.num_classes, device, 0)
    train = dataclasses.replace(unlearning.UNLEARN_DEFAULTS, epochs=args.epochs, lr=0.013,
                                batch_size=args.batch_size, amp=args.amp, compile=args.compile)
    plain = unlearning.Setup(data=data, model_name=args.model, device=device, seed=0, train=train)
    timed_unlearn(model, "rl_split", dataclasses.replace(plain, train=dataclasses.replace(train, epochs=1)))
    with MX.timer(device) as t:
        mask = saliency_mask(model, unlearning.forget_loader(plain, salt=7), args.mask_thr)
    mask_seconds = t.seconds
    masked = dataclasses.replace(plain, mask=mask)
    rl = salun = float("inf")
    for _ in range(args.repeats):
        rl = min(rl, timed_unlearn(model, "rl_split", plain))
        salun = min(salun, timed_unlearn(model, "salun", masked))
    cost = 100 * (salun - rl) / rl
    out = {"model": args.model, "device": str(device), "epochs": args.epochs, "batch_size": args.batch_size,
           "n_forget": len(data.forget_idx), "n_retain": len(data.retain_idx),
           "rl_epoch_s": rl / args.epochs, "salun_epoch_s": salun / args.epochs,
           "mask_cost_pct": cost, "mask_compute_s": mask_seconds,
           "mask_compute_pct_of_epoch": 100 * mask_seconds / (rl / args.epochs)}
    print(f"{args.model} on {device}: an epoch of rl_split {out['rl_epoch_s']:.3f} s, of salun (masked) "
          f"{out['salun_epoch_s']:.3f} s: the mask costs {cost:.1f} % of an epoch (target <= 5 %); "
          f"computing the mask {mask_seconds:.3f} s")
    if engine.graph_allowed(train, device, loss_fn=None, hooks=()):
        out["graph_check"] = graph_check(model, masked)
    if args.profile:
        out["profile"] = profile_steps(model, plain, masked, device)
    if args.json:
        write_json(args.json, out)
    return 0


def graph_check(model, masked, steps: int = 40) -> dict:
    """SalUn's step replayed as a CUDA graph against the same step never captured (the same
    fused optimizer, so the same arithmetic), from the same weights: the largest weight
    difference, and whether every masked coordinate kept its original bits."""
    setup = dataclasses.replace(masked, train=dataclasses.replace(masked.train, steps=steps))
    with step_profile.never_captured():
        eager = dict(unlearning.unlearn(copy.deepcopy(model), "salun", setup).named_parameters())
    graphed = dict(unlearning.unlearn(copy.deepcopy(model), "salun", setup).named_parameters())
    original = dict(model.named_parameters())
    diff = max((graphed[n] - eager[n]).abs().max().item() for n in original)
    kept = all(torch.equal(graphed[n].detach()[~masked.mask[n].bool()], p.detach()[~masked.mask[n].bool()])
               for n, p in original.items())
    print(f"salun as a CUDA graph against never captured, {steps} steps from the same weights: largest weight "
          f"difference {diff:.2e}; masked coordinates kept their bits: {kept}")
    return {"steps": steps, "max_weight_diff": diff, "masked_unchanged": kept}


def profile_steps(model, plain, masked, device, steps: int = 20) -> dict:
    """torch.profiler over `steps` steps of rl_split and of salun: host calls, kernels and
    the operators whose time the mask adds."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out, tables = {}, {}
    for name, setup in (("rl_split", plain), ("salun", masked)):
        setup = dataclasses.replace(setup, train=dataclasses.replace(setup.train, steps=steps))
        with profile(activities=acts) as prof:
            timed_unlearn(model, name, setup)
        ka = prof.key_averages()
        cpu = {e.key: e for e in ka if e.device_type == torch.autograd.DeviceType.CPU}
        kernels = [e for e in ka if e.device_type != torch.autograd.DeviceType.CPU]
        out[name] = {"aten_calls_per_step": sum(e.count for k, e in cpu.items() if k.startswith("aten::")) / steps,
                     "kernels_per_step": sum(e.count for e in kernels) / steps,
                     "kernel_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1000 / steps}
        tables[name] = cpu
    extra = sorted(((k, (e.count - (tables["rl_split"][k].count if k in tables["rl_split"] else 0)) / steps,
                     (e.self_cpu_time_total - (tables["rl_split"][k].self_cpu_time_total
                                               if k in tables["rl_split"] else 0)) / 1000 / steps)
                    for k, e in tables["salun"].items()), key=lambda r: -r[2])[:12]
    out["salun_extra_ops"] = [{"op": k[:80], "calls_per_step": c, "cpu_ms_per_step": t} for k, c, t in extra]
    print(f"profile, {steps} steps each: rl_split {out['rl_split']}; salun {out['salun']}")
    print("  what salun's step adds (host calls/step, self CPU ms/step):")
    for r in out["salun_extra_ops"]:
        print(f"    {r['calls_per_step']:7.1f}  {r['cpu_ms_per_step']:7.3f}  {r['op']}")
    return out


if __name__ == "__main__":
    run_main(main)

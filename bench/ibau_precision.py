"""Does I-BAU's result hang on arithmetic a GPU does differently from a CPU? On an H200 the
release CIFAR-10 model kept ~90 % held-out ASR over four rounds at the defaults, where the
CPU's run of the same seed falls to 0.1 % in round 1 (docs/gpu.md, docs/ibau.md). This runs
defense.py on the CPU with one GPU habit at a time put in:

  --tf32 forward    every convolution's inputs (images or activations, and weights) rounded to
                    TF32, 10 mantissa bits, to nearest: the forward pass as cuDNN computes it
                    with TF32 on (its default for convolutions on Ampere and later)
  --tf32 all        the same also for the two convolutions of every backward pass (input
                    gradient: its incoming gradient and the weights; weight gradient: the
                    incoming gradient and the inputs), which I-BAU's hypergradient
                    differentiates again
  --keep-denormals  denormal floats kept, as a GPU keeps them (defense.py flushes them on the
                    CPU, where arithmetic on them is ~100x slower: expect a slow run)
  --eval-bf16       ACC and ASR measured under bf16 autocast, engine.predict's default on CUDA
  --reorder SEED    every convolution's and linear layer's output (forward, and the backward
                    convolutions the hypergradient differentiates) moved by about one unit in
                    the last place, drawn from SEED: what summing in another order (a GPU
                    kernel's reduction tree) does to float32 results. Different SEEDs are
                    different machines computing the same function; if some of them keep the
                    backdoor, the outcome hangs on rounding, not on any one habit

Everything after `--` goes to defense.py unchanged:

    python bench/ibau_precision.py --tf32 all -- --poi-path ../shared/data/ibau_release/badnets_8_02_ckpt.pth \\
        --dataset cifar10 --n-rounds 2 --device cpu --tag tf32_all -NL

Rounding is straight-through (x + (round(x) - x).detach()): the value is rounded, autograd
sees the identity, so the double backward of the hypergradient stays defined. TF32 in cuDNN
keeps float32 accumulation; so does this (the rounded operands go to float32 kernels).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from constants import UserError  # noqa: E402

TF32_DROPPED_BITS = 13  # float32 keeps 23 mantissa bits, TF32 10
FLOAT32_ULP = 2.0 ** -23  # float32's spacing above 1


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """`x` with its float32 values rounded to the nearest TF32 value (ties away from zero),
    straight-through for autograd; other dtypes unchanged."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        return x
    half, keep = 1 << (TF32_DROPPED_BITS - 1), ~((1 << TF32_DROPPED_BITS) - 1)
    bits = x.detach().view(torch.int32)
    rounded = ((bits + half) & keep).view(torch.float32)
    return x + (rounded - x.detach())


def reordered(fn, generator: torch.Generator):
    """`fn` whose float32 result is scaled by (1 + ε), ε ~ N(0, 1 ulp) per element drawn from
    `generator`: about a one-ulp change, the size of a different summation order's.
    Straight-through, like tf32_round: autograd sees `fn` itself."""
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if out.dtype != torch.float32:
            return out
        eps = torch.randn(out.shape, generator=generator).mul_(FLOAT32_ULP).to(out.device)
        return out + (out.detach() * eps)
    return wrapped


@contextlib.contextmanager
def gpu_habits(tf32: str = "off", keep_denormals: bool = False, eval_bf16: bool = False,
               reorder: int | None = None):
    """Within the block: convolutions' operands rounded to TF32 (`tf32` "forward", or "all"
    for the backward convolutions too), denormals kept, evaluation under bf16 autocast,
    convolutions' and linear layers' results moved by about an ulp (`reorder`: the seed)."""
    import engine
    import ibau

    saved = [(owner, name, getattr(owner, name)) for owner, name in (
        (F, "conv2d"), (F, "conv_transpose2d"), (ibau, "conv_weight_grad"), (engine, "predict"),
        (F, "linear"), (torch, "set_flush_denormal"))]
    if reorder is not None:  # inside the TF32 rounding below: operands rounded, kernel, result moved
        gen = torch.Generator().manual_seed(reorder)
        F.conv2d, F.conv_transpose2d, F.linear = (reordered(f, gen) for f in (F.conv2d, F.conv_transpose2d, F.linear))
        ibau.conv_weight_grad = reordered(ibau.conv_weight_grad, gen)
    conv2d, conv_t, weight_grad = F.conv2d, F.conv_transpose2d, ibau.conv_weight_grad
    predict = engine.predict
    if tf32 != "off":
        F.conv2d = lambda x, w, *a, **k: conv2d(tf32_round(x), tf32_round(w), *a, **k)
    if tf32 == "all":  # I-BAU's convolutions run their backward through these (ibau._Conv2dExplicitBackward)
        F.conv_transpose2d = lambda g, w, *a, **k: conv_t(tf32_round(g), tf32_round(w), *a, **k)
        ibau.conv_weight_grad = lambda g, x, w, *a: weight_grad(tf32_round(g), tf32_round(x), tf32_round(w), *a)
    if keep_denormals:
        torch.set_flush_denormal(False)
        torch.set_flush_denormal = lambda on: True  # defense.py and ibau.py ask for flushing: refused
    if eval_bf16:
        engine.predict = lambda model, loader, amp=None: predict(model, loader, amp=True)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tf32", choices=("off", "forward", "all"), default="off")
    p.add_argument("--keep-denormals", action="store_true")
    p.add_argument("--eval-bf16", action="store_true")
    p.add_argument("--reorder", type=int, default=None, metavar="SEED")
    args = p.parse_args(ours)
    if not rest:
        raise UserError("give defense.py's flags after `--`, e.g. -- --poi-path MODEL --device cpu -NL")
    if "--device" not in rest or rest[rest.index("--device") + 1] != "cpu":
        raise UserError("this emulates GPU arithmetic on the CPU: pass --device cpu after `--`")
    import defense

    with gpu_habits(args.tf32, args.keep_denormals, args.eval_bf16, args.reorder):
        return defense.main(rest)


if __name__ == "__main__":
    from cli import run_main

    run_main(main)

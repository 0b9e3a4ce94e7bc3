"""What stands between a training step and its model compute: profiles for issue 15's targets.

Used by `bench/loader_bench.py --profile`; every function prints what it finds and returns
plain figures, and none of them changes how the project trains:

- `profile_fit`: torch.profiler around a few `engine.fit` steps. On CUDA the kernels' summed
  time per step against the unprofiled step time says whether the step is GPU-bound (kernels
  fill the step: what is left to remove is kernels, named in the table) or launch-bound
  (the GPU waits for Python and the dispatcher: CUDA graphs or fewer, fused kernels help).
- `optimizer_ab`: the bare compute step with torch's foreach optimizer against the fused
  one (what engine.fit uses inside its CUDA graph).
- `graphed_compute_seconds`: the same bare step captured whole in one CUDA graph (forward,
  loss, backward, optimizer), the floor a step reaches without any launch overhead.
- `dynamo_summary`: torch.compile's graph and graph-break counts (recompiles show here).
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

import engine


def _device_us(event) -> float:
    return float(getattr(event, "self_device_time_total", 0.0) or 0.0)


def profile_fit(model, stream, cfg: dict, steps: int, ms_per_step: float, device, rows: int = 15) -> dict:
    """Profile `steps` steps of engine.fit (after the caller's warm-up); print the top kernels
    (CUDA) or operators (CPU) and the step's split. `ms_per_step`: the unprofiled step time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tc = engine.TrainConfig(**{**cfg, "steps": steps})
    engine.sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        engine.fit(model, stream, tc, desc="profile")
        engine.sync(device)
    wall_ms = (time.perf_counter() - t0) * 1000 / steps
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type != torch.autograd.DeviceType.CPU]
    out = {"steps": steps, "profiled_wall_ms_per_step": wall_ms, "unprofiled_ms_per_step": ms_per_step,
           "cpu_ops_per_step": sum(e.count for e in averages if e.device_type == torch.autograd.DeviceType.CPU
                                   and e.key.startswith("aten::")) / steps}
    if kernels:
        gpu_ms = sum(_device_us(e) for e in kernels) / 1000 / steps
        out.update(gpu_kernel_ms_per_step=gpu_ms, kernels_per_step=sum(e.count for e in kernels) / steps,
                   gpu_busy_pct=100 * gpu_ms / ms_per_step)
        top = sorted(kernels, key=_device_us, reverse=True)[:rows]
        out["top_kernels"] = [{"name": e.key[:90], "ms_per_step": _device_us(e) / 1000 / steps,
                               "calls_per_step": e.count / steps} for e in top]
        print(f"profile (engine.fit, {steps} steps): GPU kernels {gpu_ms:.2f} ms/step over "
              f"{out['kernels_per_step']:.0f} kernels = {out['gpu_busy_pct']:.1f} % of the unprofiled "
              f"{ms_per_step:.2f} ms step; {out['cpu_ops_per_step']:.0f} aten ops/step on the host; "
              f"under the profiler {wall_ms:.2f} ms/step")
        print("  top kernels by GPU time (ms/step, calls/step):")
        for k in out["top_kernels"]:
            print(f"    {k['ms_per_step']:7.3f}  {k['calls_per_step']:5.1f}  {k['name']}")
    else:
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
        out["top_ops"] = [{"name": e.key[:90], "ms_per_step": e.self_cpu_time_total / 1000 / steps,
                           "calls_per_step": e.count / steps} for e in top]
        print(f"profile (engine.fit, {steps} steps, CPU): {out['cpu_ops_per_step']:.0f} aten ops/step, "
              f"{wall_ms:.2f} ms/step under the profiler")
        print("  top operators by self CPU time (ms/step, calls/step):")
        for k in out["top_ops"]:
            print(f"    {k['ms_per_step']:7.3f}  {k['calls_per_step']:5.1f}  {k['name']}")
    return out


def _bare_step(model, x, y, opt, amp: bool, device, cache: bool = True):
    with engine.autocast(device, amp, cache=cache):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _resident(model, batch, device, channels_last: bool):
    x, y = batch.x, batch.y
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def bare_step_seconds(model, batch, cfg: dict, steps: int, warmup: int, fused: bool = False) -> float:
    """Forward + loss + backward + optimizer + scheduler step on one resident batch, launched
    op by op: what engine.fit's step costs without input pipeline, metrics or logging."""
    device = next(model.parameters()).device
    tc = engine.TrainConfig(**{**cfg, "steps": steps})
    amp = engine.resolve_amp(tc.amp, device)
    x, y = _resident(model, batch, device, device.type == "cuda" if tc.channels_last is None else tc.channels_last)
    fwd = torch.compile(model) if tc.compile else model
    opt = engine.make_optimizer(model.parameters(), tc, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.lr_multiplier(tc, steps, steps))
    model.train()

    def step():
        _bare_step(fwd, x, y, opt, amp, device)
        sched.step()

    for _ in range(warmup):
        step()
    engine.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    engine.sync(device)
    return time.perf_counter() - t0


def optimizer_ab(make_model, batch, cfg: dict, steps: int, warmup: int, device) -> dict:
    """Seconds of `steps` bare steps with the foreach optimizer, then with the fused one."""
    out = {}
    for name, fused in (("foreach", False), ("fused", True)):
        torch.manual_seed(0)
        out[name] = bare_step_seconds(make_model(), batch, {**cfg, "compile": False}, steps, warmup, fused=fused)
    print(f"optimizer (bare step, {steps} steps): foreach {out['foreach'] / steps * 1000:.2f} ms/step, "
          f"fused {out['fused'] / steps * 1000:.2f} ms/step")
    return out


def graphed_compute_seconds(model, batch, cfg: dict, steps: int, device) -> float | None:
    """The bare step captured in one CUDA graph and replayed `steps` times (CUDA only)."""
    if device.type != "cuda":
        return None
    tc = engine.TrainConfig(**cfg)
    amp = engine.resolve_amp(tc.amp, device)
    x, y = _resident(model, batch, device, True)
    opt = engine.make_optimizer(model.parameters(), tc)
    model.train()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
        for _ in range(3):
            _bare_step(model, x, y, opt, amp, device, cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # the gradients live in the graph's memory
    loss = engine.capture(graph, lambda: _bare_step(model, x, y, opt, amp, device, cache=False))
    for _ in range(5):
        graph.replay()
    engine.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    engine.sync(device)
    seconds = time.perf_counter() - t0
    print(f"bare step captured in one CUDA graph: {seconds / steps * 1000:.2f} ms/step "
          f"(loss {loss.item():.3f}, finite: {bool(torch.isfinite(loss))})")
    return seconds


@contextlib.contextmanager
def never_captured():
    """engine.fit's step as it would be graphed (the same fused optimizer and autocast
    settings, so the same arithmetic and, under --compile, no second compile), but never
    captured: launched op by op every step."""
    saved, engine.GraphedStep.WARMUP = engine.GraphedStep.WARMUP, 10 ** 9
    try:
        yield
    finally:
        engine.GraphedStep.WARMUP = saved


def graph_check(make_model, stream, cfg: dict, steps: int) -> dict:
    """`steps` steps of engine.fit from the same weights with the step replayed as a CUDA
    graph and launched op by op (never captured): the training loss and the largest weight
    difference."""
    runs = {}
    for name, graph in (("graph", True), ("eager", False), ("eager again", False)):
        torch.manual_seed(0)
        model = make_model()
        with contextlib.nullcontext() if graph else never_captured():
            hist = engine.fit(model, stream, engine.TrainConfig(**{**cfg, "steps": steps}), desc=f"check {name}")
        runs[name] = (hist[-1]["train_loss"], [p.detach().float() for p in model.parameters()])
    def largest_diff(x, y):
        return max(float((a - b).abs().max()) for a, b in zip(runs[x][1], runs[y][1]))

    out = {"steps": steps, "graph_loss": runs["graph"][0], "eager_loss": runs["eager"][0],
           "eager_again_loss": runs["eager again"][0], "max_weight_diff": largest_diff("graph", "eager"),
           "eager_vs_eager_diff": largest_diff("eager again", "eager"),
           "max_weight": max(float(b.abs().max()) for b in runs["eager"][1])}
    print(f"CUDA graph against op by op, {steps} steps from the same weights: training loss "
          f"{out['graph_loss']:.5f} vs {out['eager_loss']:.5f} (op by op again: {out['eager_again_loss']:.5f}); "
          f"largest weight difference {out['max_weight_diff']:.2e} (op by op twice: {out['eager_vs_eager_diff']:.2e}; "
          f"largest weight {out['max_weight']:.2f})")
    return out


def dynamo_summary() -> dict:
    """torch.compile's counters in this process: graphs compiled, graph breaks."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    stats = {k: int(v) for k, v in counters["stats"].items()}
    breaks = {k[:80]: int(v) for k, v in counters["graph_break"].items()}
    print(f"torch.compile: {stats}; graph breaks: {sum(breaks.values())} {breaks if breaks else ''}")
    return {"stats": stats, "graph_breaks": breaks}

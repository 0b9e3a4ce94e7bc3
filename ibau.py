"""I-BAU (Zeng et al., ICLR 2022, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient") as the official release implements it.

One round:
  (a) fit one universal perturbation δ (1×C×H×W, from zero) with SGD(lr=10), one step per
      batch over one pass, minimising −CE(f(x+δ), ŷ) + 0.001·‖δ‖², ŷ = the model's own
      predictions;
  (b) per batch, one outer step on the weights θ with the implicit hypergradient of
      L_outer(δ, θ) = CE on the batch (true labels) where only int(0.01·B) random images
      get δ, through the fixed-point map Φ(δ, θ) = δ − 0.1·∇δ L_inner(δ, θ),
      L_inner = −CE(f(x₀+δ), y₀) + 0.001·‖δ‖² on the FIRST batch with true labels.
The model stays in eval() mode throughout (BatchNorm frozen, dropout off), as released.

Batches are lists of (x_float, y, ...) tuples (extra fields, e.g. the loader's sample
indices, are ignored) already on the device and in the input space the model
expects (the caller normalises or not); δ lives in that same space.
"""
from __future__ import annotations

import types
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from constants import UserError


def _perturb(x, delta, clamp):
    z = x + delta
    return z if clamp is None else z.clamp(*clamp)


PROJECTIONS = ("end", "step")


def project_l2(delta: torch.Tensor, radius: float | None) -> torch.Tensor:
    """δ · min(1, radius/‖δ‖₂): the L2 ball of the release's notebooks (None = unbounded)."""
    if radius is None:
        return delta
    return delta * (radius / delta.norm()).clamp(max=1.0)


def fit_universal_perturbation(model, batches, lr: float = 10.0, reg: float = 1e-3,
                               radius: float | None = None, clamp=None,
                               optimizer: str = "sgd", projection: str = "end") -> torch.Tensor:
    """Stage (a): δ from zero, one optimiser step per batch, one pass.

    radius: the L2 bound (None = unbounded, the release's defense.py).
    projection: "end" scales δ onto the ball once, after the pass (the release's notebooks,
      which made its published numbers); "step" projects after every step. "step" keeps
      only the last few batches' ascent directions (each step of lr 10 is about as long as
      the ball's radius, so it overwrites most of δ), which is why it fails to find the
      trigger on the release's own models (README, I-BAU ablation).
    clamp: (lo, hi) applied to x+δ (the GTSRB notebook clamps to (0, 1)).
    optimizer: "sgd" (release) or "adam" (the GTSRB notebook uses Adam with lr=1.0)."""
    if not batches:
        raise UserError("I-BAU needs at least one batch of clean unlearning data")
    if projection not in PROJECTIONS:
        raise UserError(f"unknown δ projection '{projection}': use {' or '.join(PROJECTIONS)}")
    x0 = batches[0][0]
    delta = torch.zeros((1, *x0.shape[1:]), device=x0.device, dtype=x0.dtype, requires_grad=True)
    if optimizer not in ("sgd", "adam"):
        raise UserError(f"unknown perturbation optimiser '{optimizer}': use sgd or adam")
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_cls([delta], lr=lr)
    for batch in batches:
        x = batch[0]
        with torch.no_grad():
            y_hat = model(x).argmax(1)
        loss = -F.cross_entropy(model(_perturb(x, delta, clamp)), y_hat) + reg * delta.pow(2).sum()
        # autograd.grad, not backward(): the model's .grad must stay untouched here
        (delta.grad,) = torch.autograd.grad(loss, [delta])
        opt.step()
        if projection == "step":
            with torch.no_grad():
                delta.copy_(project_l2(delta, radius))
    delta = delta.detach()
    return project_l2(delta, radius) if projection == "end" else delta


def make_inner_map(model, x0, y0, step: float = 0.1, reg: float = 1e-3, clamp=None):
    """Φ(δ, θ) = δ − step·∇δ L_inner as a differentiable map fp_map(params, hparams).
    θ enters through the model's own parameters (hparams are those same tensors)."""
    def fp_map(params, hparams):
        (delta,) = params
        loss = -F.cross_entropy(model(_perturb(x0, delta, clamp)), y0) + reg * delta.pow(2).sum()
        (g,) = torch.autograd.grad(loss, [delta], create_graph=True)
        return [delta - step * g]
    return fp_map


def random_subset(batch_size: int, frac: float = 0.01, generator=None,
                  min_count: int = 0) -> torch.Tensor:
    """The int(frac·B) images of a batch that get δ in L_outer (1 of 100 in the release;
    0 for batches under 100, which turns the step into plain fine-tuning, as released).
    min_count raises that floor (defense.py uses 1, so δ always enters the outer loss)."""
    n = min(batch_size, max(int(frac * batch_size), int(min_count)))
    return torch.randperm(batch_size, generator=generator)[:n]


def make_outer_loss(model, x, y, indices, clamp=None):
    """L_outer(δ, θ) = CE(f(x with δ added to x[indices]), y)."""
    sel = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    sel[indices.to(x.device)] = True
    sel = sel.view(-1, *([1] * (x.dim() - 1)))

    def outer_loss(params, hparams):
        (delta,) = params
        return F.cross_entropy(model(torch.where(sel, _perturb(x, delta, clamp), x)), y)
    return outer_loss


def _grads(out, wrt, grad_outputs=None, retain_graph=False):
    """autograd.grad that returns zeros for tensors the output does not depend on."""
    gs = torch.autograd.grad(out, wrt, grad_outputs=grad_outputs, retain_graph=retain_graph,
                             allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]


def fixed_point_hypergradient(params, hparams, K: int, fp_map, outer_loss,
                              tol: float = 1e-10, set_grad: bool = True, parts: dict | None = None):
    """Implicit hypergradient of outer_loss through the fixed point params = fp_map(params, θ).

    v₀ = 0; v ← (∂Φ/∂δ)ᵀv + ∇δ L_outer, K times (early stop when ‖Δv‖ < tol): a truncated
    Neumann series for (I − ∂Φ/∂δ)⁻ᵀ ∇δ L_outer. Then (∂Φ/∂θ)ᵀv + ∇θ L_outer is ADDED to
    θ.grad (set_grad) — accumulation, as the release does — and returned (one entry per
    hparam; None for hparams that do not require grad).
    parts: a dict to receive the direct term ∇θ L_outer ("direct", per live hparam) and the
    norms ‖v_k‖ of the series' iterates ("v_norms"; a host sync each, so only when asked)."""
    params = [p.detach().requires_grad_(True) for p in params]
    hparams = list(hparams)
    live = [h for h in hparams if h.requires_grad]
    loss = outer_loss(params, live)
    grads = _grads(loss, params + live)  # one backward pass for ∇δ and ∇θ
    g_params, g_hparams = grads[:len(params)], grads[len(params):]

    mapped = fp_map(params, live)
    # The first iteration from v₀ = 0 gives v₁ = ∇δL exactly: the release spends a
    # double-backward pass on (∂Φ/∂δ)ᵀ·0; skipping it changes no bit of the result.
    v = list(g_params)
    norms = [torch.sqrt(sum((a ** 2).sum() for a in v))]  # ‖v_k‖, k = 1, 2, ...
    done = norms[0] < tol  # the release's test on ‖v₁ − v₀‖
    for _ in range(0 if done else K - 1):
        prev = v
        jv = _grads(mapped, params, grad_outputs=v, retain_graph=True)
        v = [a + b for a, b in zip(jv, g_params)]
        if parts is not None:
            norms.append(torch.sqrt(sum((a ** 2).sum() for a in v)))
        if torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(v, prev))) < tol:
            break
    hg = [a + b for a, b in zip(_grads(mapped, live, grad_outputs=v), g_hparams)]
    if parts is not None:
        parts.update(direct=[g.detach() for g in g_hparams], v_norms=[float(n) for n in norms])

    if set_grad:
        for h, g in zip(live, hg):
            h.grad = g.detach().clone() if h.grad is None else h.grad + g.detach()
    it = iter(hg)
    return [next(it) if h.requires_grad else None for h in hparams]


def outer_gradient(model, delta, batch, chosen, fp_map, hparams, K: int, clamp=None,
                   parts: dict | None = None) -> float:
    """One outer step's gradient: the hypergradient of L_outer on `batch` (δ added to the
    images `chosen`) accumulated into the hparams' .grad. Returns L_outer."""
    outer = make_outer_loss(model, batch[0], batch[1], chosen, clamp)
    losses = []

    def recorded(params, hp):
        loss = outer(params, hp)
        losses.append(loss.detach())
        return loss

    fixed_point_hypergradient([delta], hparams, K, fp_map, recorded, parts=parts)
    return float(losses[0])


class _Conv2dExplicitBackward(torch.autograd.Function):
    """F.conv2d whose backward is written with differentiable ops (a transposed conv for the
    input gradient). The hypergradient differentiates the backward pass itself; through
    PyTorch's own conv backward, every Hessian-vector product also computes a weight-gradient
    convolution it then throws away (~35 % of each product). Through this one, autograd
    differentiates conv_transpose2d, which computes only what is asked for."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conf
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            size = [(g_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                    + dilation[i] * (weight.shape[2 + i] - 1) + 1 for i in range(2)]
            extra = [x.shape[2 + i] - size[i] for i in range(2)]  # strides that dropped pixels
            g_x = F.conv_transpose2d(g_out, weight, None, stride, padding, extra, groups, dilation)
        if ctx.needs_input_grad[1]:
            g_w = conv_weight_grad(g_out, x, weight, stride, padding, dilation, groups)
        if has_bias and ctx.needs_input_grad[2]:
            g_b = g_out.sum((0, 2, 3))
        return g_x, g_w, g_b, None, None, None, None


def conv_weight_grad(g_out, x, weight, stride, padding, dilation, groups):
    """The weight gradient of F.conv2d (aten's convolution_backward, weight only)."""
    return torch.ops.aten.convolution_backward(g_out, x, weight, None, stride, padding, dilation, False,
                                               [0, 0], groups, [False, True, False])[1]


def _conv2d_explicit(conv, x):
    return _Conv2dExplicitBackward.apply(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                         conv.dilation, conv.groups)


def _affine_batchnorm(bn, x):
    """Eval-mode BatchNorm written as the per-channel affine map it is, x·s + t with
    s = γ/√(σ²+ε) and t = β − μ·s: the same function and the same gradients for γ and β (the
    running statistics are constants in eval mode), but a double backward of a few products
    instead of autograd's general batch-norm double backward."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = bn.weight * scale
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = bn.bias + shift
    return torch.addcmul(shift.view(shape), x, scale.view(shape))


@contextmanager
def fast_double_backward(model):
    """Within the block the model computes the same function (values agree to ~1e-6) with
    layers whose double backward is cheap: every plain zero-padded Conv2d through
    `_Conv2dExplicitBackward`, every eval-mode BatchNorm with running statistics as
    `_affine_batchnorm`; and denormal floats are flushed to zero (a saturated softmax
    makes gradients of ~1e-40, on which CPU arithmetic runs ~100× slower; torch's worker
    threads copy the setting when they start, so a script sets it first thing, as defense.py
    does). Together a round of I-BAU on the release's small VGG takes 0.6× the time."""
    swapped = []
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.padding_mode == "zeros"
                and not isinstance(m.padding, str)):
            swapped.append((m, _conv2d_explicit))
        elif (isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training
              and m.running_var is not None):
            swapped.append((m, _affine_batchnorm))
    for m, fn in swapped:
        m.forward = types.MethodType(fn, m)
    torch.set_flush_denormal(True)
    try:
        yield model
    finally:
        torch.set_flush_denormal(False)
        for m, _ in swapped:
            del m.forward


@contextmanager
def frozen(model):
    """Parameters temporarily without gradients: δ's fit needs none of them."""
    live = [p for p in model.parameters() if p.requires_grad]
    for p in live:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in live:
            p.requires_grad_(True)


def ibau_round(model, batches, outer_opt, K: int = 5, *, inner_step: float = 0.1,
               reg: float = 1e-3, perturb_frac: float = 0.01, delta_lr: float = 10.0,
               delta_optimizer: str = "sgd", radius: float | None = None,
               projection: str = "end", clamp=None,
               generator: torch.Generator | None = None, min_perturbed: int = 0,
               schedule=None, on_step=None, fast_layers: bool = True) -> dict:
    """One I-BAU round: fit δ, then one outer step per batch (zero_grad → hypergradient →
    step). Leaves the model in eval() mode. Returns {"delta", "outer_losses"}.

    generator: CPU torch.Generator choosing the perturbed images of each outer batch.
    min_perturbed: at least this many images per batch get δ (0 = the release, where a
    batch under 100 images gets none and its step is plain fine-tuning).
    schedule: a learning-rate scheduler of outer_opt, stepped after every outer step.
    on_step(i, delta): called after outer step i (from 0), e.g. to follow the weights.
    fast_layers: False runs the model's own layers instead of fast_double_backward's (the
    same function; a check on those layers)."""
    if K < 1:
        raise UserError(f"I-BAU needs K >= 1 fixed-point iterations, got {K}")
    model.eval()
    with (fast_double_backward(model) if fast_layers else nullcontext(model)):
        with frozen(model):
            delta = fit_universal_perturbation(model, batches, lr=delta_lr, reg=reg,
                                               radius=radius, clamp=clamp,
                                               optimizer=delta_optimizer, projection=projection)
        fp_map = make_inner_map(model, batches[0][0], batches[0][1], step=inner_step, reg=reg, clamp=clamp)
        hparams = [p for p in model.parameters() if p.requires_grad]
        losses = []
        for i, batch in enumerate(batches):
            chosen = random_subset(len(batch[0]), perturb_frac, generator, min_perturbed)
            outer_opt.zero_grad()
            losses.append(outer_gradient(model, delta, batch, chosen, fp_map, hparams, K, clamp))
            outer_opt.step()
            if schedule is not None:
                schedule.step()
            if on_step is not None:
                on_step(i, delta)
    return {"delta": delta, "outer_losses": losses}

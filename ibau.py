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

import torch
import torch.nn.functional as F

from constants import UserError


def _perturb(x, delta, clamp):
    z = x + delta
    return z if clamp is None else z.clamp(*clamp)


def fit_universal_perturbation(model, batches, lr: float = 10.0, reg: float = 1e-3,
                               radius: float | None = None, clamp=None,
                               optimizer: str = "sgd") -> torch.Tensor:
    """Stage (a): δ from zero, one optimiser step per batch, one pass.

    radius: L2-ball projection after every step (None = the CLI release, 10 = the notebooks).
    clamp: (lo, hi) applied to x+δ (the GTSRB notebook clamps to (0, 1)).
    optimizer: "sgd" (release) or "adam" (the GTSRB notebook uses Adam with lr=1.0)."""
    if not batches:
        raise UserError("I-BAU needs at least one batch of clean unlearning data")
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
        if radius is not None:
            with torch.no_grad():
                delta.mul_((radius / delta.norm()).clamp(max=1.0))
    return delta.detach()


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
                              tol: float = 1e-10, set_grad: bool = True):
    """Implicit hypergradient of outer_loss through the fixed point params = fp_map(params, θ).

    v₀ = 0; v ← (∂Φ/∂δ)ᵀv + ∇δ L_outer, K times (early stop when ‖Δv‖ < tol): a truncated
    Neumann series for (I − ∂Φ/∂δ)⁻ᵀ ∇δ L_outer. Then (∂Φ/∂θ)ᵀv + ∇θ L_outer is ADDED to
    θ.grad (set_grad) — accumulation, as the release does — and returned (one entry per
    hparam; None for hparams that do not require grad)."""
    params = [p.detach().requires_grad_(True) for p in params]
    hparams = list(hparams)
    live = [h for h in hparams if h.requires_grad]
    loss = outer_loss(params, live)
    g_params = _grads(loss, params, retain_graph=True)
    g_hparams = _grads(loss, live)

    mapped = fp_map(params, live)
    v = [torch.zeros_like(p) for p in params]
    for _ in range(K):
        prev = v
        jv = _grads(mapped, params, grad_outputs=v, retain_graph=True)
        v = [a + b for a, b in zip(jv, g_params)]
        if torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(v, prev))) < tol:
            break
    hg = [a + b for a, b in zip(_grads(mapped, live, grad_outputs=v), g_hparams)]

    if set_grad:
        for h, g in zip(live, hg):
            h.grad = g.detach().clone() if h.grad is None else h.grad + g.detach()
    it = iter(hg)
    return [next(it) if h.requires_grad else None for h in hparams]


def ibau_round(model, batches, outer_opt, K: int = 5, *, inner_step: float = 0.1,
               reg: float = 1e-3, perturb_frac: float = 0.01, delta_lr: float = 10.0,
               delta_optimizer: str = "sgd", radius: float | None = None, clamp=None,
               generator: torch.Generator | None = None, min_perturbed: int = 0) -> dict:
    """One I-BAU round: fit δ, then one outer step per batch (zero_grad → hypergradient →
    step). Leaves the model in eval() mode. Returns {"delta", "outer_losses"}.

    generator: CPU torch.Generator choosing the perturbed images of each outer batch.
    min_perturbed: at least this many images per batch get δ (0 = the release, where a
    batch under 100 images gets none and its step is plain fine-tuning)."""
    if K < 1:
        raise UserError(f"I-BAU needs K >= 1 fixed-point iterations, got {K}")
    model.eval()
    delta = fit_universal_perturbation(model, batches, lr=delta_lr, reg=reg, radius=radius,
                                       clamp=clamp, optimizer=delta_optimizer)
    x0, y0 = batches[0][0], batches[0][1]
    fp_map = make_inner_map(model, x0, y0, step=inner_step, reg=reg, clamp=clamp)
    hparams = [p for p in model.parameters() if p.requires_grad]
    losses = []

    for batch in batches:
        x, y = batch[0], batch[1]
        outer = make_outer_loss(model, x, y, random_subset(len(x), perturb_frac, generator,
                                                         min_perturbed), clamp)

        def recorded(params, hp, outer=outer):
            loss = outer(params, hp)
            losses.append(float(loss.detach()))
            return loss

        outer_opt.zero_grad()
        fixed_point_hypergradient([delta], hparams, K, fp_map, recorded)
        outer_opt.step()
    return {"delta": delta, "outer_losses": losses}

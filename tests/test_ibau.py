import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

import ibau
import backdoor_defense as bd


def toy(seed=0, n=10, scale=0.5):
    """A linear classifier on 1×2×2 'images' (4 inputs, 3 classes), float64."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(scale * torch.randn(3, 4, generator=g, dtype=torch.float64))
        model[1].bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    x = torch.rand(n, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    delta = 0.3 * torch.randn(1, 1, 2, 2, generator=g, dtype=torch.float64)
    return model, x, y, delta


def reference_pieces(x0, y0, x, y, idx, delta, W, b, step, reg):
    """Jacobians of Φ and gradients of L_outer, written independently of ibau.py."""
    def phi(d, W, b):
        d = d.requires_grad_() if not d.requires_grad else d
        loss = -F.cross_entropy((x0 + d).flatten(1) @ W.T + b, y0) + reg * (d ** 2).sum()
        (g,) = torch.autograd.grad(loss, d, create_graph=True)
        return d - step * g

    def l_outer(d, W, b):
        xp = x.clone()
        xp[idx] = xp[idx] + d
        return F.cross_entropy(xp.flatten(1) @ W.T + b, y)

    J = jacobian(phi, (delta, W, b))
    Jd = J[0].reshape(4, 4)
    Jt = torch.cat([J[1].reshape(4, -1), J[2].reshape(4, -1)], 1)  # ∂Φ/∂θ, θ = (W, b)
    gd, gW, gb = jacobian(l_outer, (delta, W, b))
    return Jd, Jt, gd.reshape(4), torch.cat([gW.reshape(-1), gb.reshape(-1)])


def run_hg(model, x0, y0, x, y, idx, delta, K, step, reg):
    fp_map = ibau.make_inner_map(model, x0, y0, step=step, reg=reg)
    outer = ibau.make_outer_loss(model, x, y, idx)
    model.zero_grad(set_to_none=True)
    hg = ibau.fixed_point_hypergradient([delta], list(model.parameters()), K, fp_map, outer)
    return torch.cat([g.reshape(-1) for g in hg])


def test_hypergradient_matches_implicit_function_theorem():
    # reg=1 makes Φ a contraction, so the Neumann series converges and large K must give
    # ∇θL + (∂Φ/∂θ)ᵀ (I − ∂Φ/∂δ)⁻ᵀ ∇δL exactly.
    model, x, y, delta = toy()
    idx = torch.tensor([1, 4, 7])
    W, b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    Jd, Jt, gd, gt = reference_pieces(x[:5], y[:5], x, y, idx, delta, W, b, 0.1, 1.0)
    assert torch.linalg.eigvals(Jd).abs().max() < 0.95
    v = torch.linalg.solve(torch.eye(4, dtype=Jd.dtype) - Jd.T, gd)
    exact = gt + Jt.T @ v
    got = run_hg(model, x[:5], y[:5], x, y, idx, delta, K=400, step=0.1, reg=1.0)
    assert torch.allclose(got, exact, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(gt, exact, atol=1e-4)  # the implicit term actually matters


@pytest.mark.parametrize("K", [1, 3])
def test_truncated_neumann_series_release_setting(K):
    # With the release's reg=0.001, Φ is not a contraction; K steps must equal the explicit
    # truncated sum v = Σ_{i<K} (∂Φ/∂δ)ᵀⁱ ∇δL.
    model, x, y, delta = toy(seed=1, scale=2.0)
    idx = torch.tensor([2])
    W, b = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    Jd, Jt, gd, gt = reference_pieces(x[:5], y[:5], x, y, idx, delta, W, b, 0.1, 1e-3)
    v, term = torch.zeros_like(gd), gd.clone()
    for _ in range(K):
        v, term = v + term, Jd.T @ term
    got = run_hg(model, x[:5], y[:5], x, y, idx, delta, K=K, step=0.1, reg=1e-3)
    assert torch.allclose(got, gt + Jt.T @ v, rtol=1e-8, atol=1e-10)


def test_hypergradient_accumulates_into_grad():
    model, x, y, delta = toy()
    fp_map = ibau.make_inner_map(model, x[:5], y[:5])
    outer = ibau.make_outer_loss(model, x, y, torch.tensor([0]))
    params = list(model.parameters())
    hg = ibau.fixed_point_hypergradient([delta], params, 5, fp_map, outer, set_grad=False)
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    ibau.fixed_point_hypergradient([delta], params, 5, fp_map, outer)
    for p, g in zip(params, hg):
        assert torch.allclose(p.grad, 1 + g)


def test_no_perturbed_images_gives_plain_gradient():
    model, x, y, delta = toy()
    got = run_hg(model, x[:5], y[:5], x, y, torch.tensor([], dtype=torch.long), delta, 5, 0.1, 1e-3)
    loss = F.cross_entropy(model(x), y)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    assert torch.allclose(got, ref)
    assert len(ibau.random_subset(99)) == 0 and len(ibau.random_subset(100)) == 1
    assert len(ibau.random_subset(256)) == 2


def test_fit_universal_perturbation():
    model, x, y, _ = toy(seed=2, scale=3.0)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    # first step from zero: δ₁ = −lr·∇δ[−CE(f(x), ŷ)] (the reg term has zero gradient at 0)
    d1 = ibau.fit_universal_perturbation(model, batches[:1], lr=10.0)
    d = torch.zeros(1, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    y_hat = model(x[:5]).argmax(1)
    (g,) = torch.autograd.grad(-F.cross_entropy(model(x[:5] + d), y_hat), d)
    assert torch.allclose(d1, -10.0 * g)
    assert all(p.grad is None for p in model.parameters())
    d = ibau.fit_universal_perturbation(model, batches, lr=1000.0, radius=0.5)
    assert d.norm() <= 0.5 + 1e-9 and d.shape == (1, 1, 2, 2)
    assert not d.requires_grad


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ELU(),
                                 nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))

    def forward(self, x):
        return self.net(x)


def test_round_keeps_eval_mode_and_bn_stats():
    torch.manual_seed(0)
    model = TinyBN()
    model.train()
    with torch.no_grad():  # non-trivial running stats
        model.net[1].running_mean.uniform_(-0.5, 0.5)
        model.net[1].running_var.uniform_(0.5, 2.0)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(100, 3, 6, 6, generator=g), torch.randint(0, 3, (100,), generator=g),
                torch.arange(100)) for _ in range(2)]  # (x, y, idx) like the loader's Batch
    seen_modes = []
    model.register_forward_pre_hook(lambda m, inp: seen_modes.append(m.training))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = ibau.ibau_round(model, batches, opt, K=2, generator=torch.Generator().manual_seed(1))
    assert not model.training and not any(seen_modes)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert any(not torch.equal(p, weights[k]) for k, p in model.named_parameters())
    assert out["delta"].shape == (1, 3, 6, 6) and len(out["outer_losses"]) == 2
    # --lr-half-life: the schedule is stepped once per outer step (2 batches, half-life 2)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    ibau.ibau_round(model, batches, opt, K=1, schedule=schedule)
    assert opt.param_groups[0]["lr"] == 5e-4
    ibau.ibau_round(model, batches, opt, K=1, schedule=schedule)
    assert opt.param_groups[0]["lr"] == 2.5e-4


def test_fast_double_backward_same_hypergradient():
    # strided, grouped, biased and bias-free convolutions, eval-mode BatchNorm, an odd input
    # size (a stride-2 conv drops a pixel): the explicit-backward conv and the affine
    # BatchNorm must give the hypergradient PyTorch's own layers give
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ELU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(8),
        nn.ELU(), nn.Conv2d(8, 6, 2, stride=2, dilation=1), nn.Flatten(), nn.LazyLinear(4))
    x = torch.rand(6, 3, 11, 11)
    model(x)  # materialise the lazy head
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    model.eval().double()
    x, y = x.double(), torch.tensor([0, 1, 2, 3, 0, 1])
    delta = 0.3 * torch.randn(1, 3, 11, 11, dtype=torch.float64)
    hp = list(model.parameters())

    def hypergradient():
        fp_map = ibau.make_inner_map(model, x[:3], y[:3])
        outer = ibau.make_outer_loss(model, x, y, torch.tensor([1, 4]))
        return ibau.fixed_point_hypergradient([delta], hp, 4, fp_map, outer, set_grad=False)

    plain = hypergradient()
    with ibau.fast_double_backward(model):
        assert all("forward" in vars(m) for m in model.modules()
                   if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
        fast = hypergradient()
    assert not any("forward" in vars(m) for m in model.modules())  # restored
    for a, b in zip(plain, fast):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_min_perturbed_changes_nothing_at_the_release_batch_size():
    # int(0.01·100) = 1 image already: --min-perturbed 1 and 0 draw the same image with the
    # same generator state, so the two ablation rows are the same run bit for bit
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(50):
        assert torch.equal(ibau.random_subset(100, 0.01, g0, 0), ibau.random_subset(100, 0.01, g1, 1))
    assert torch.equal(g0.get_state(), g1.get_state())


def test_summarize_ibau_averages_seeds_per_round(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "summarize_ibau", Path(__file__).resolve().parents[1] / "exp" / "summarize_ibau.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for seed, (acc, asr) in enumerate([(70.0, 1.0), (72.0, 3.0)]):
        rounds = [{"stage": "before", "round": 0, "acc": 77.0 + seed, "asr": 98.0},
                  {"stage": "ibau", "round": 1, "acc": acc, "asr": asr, "release_asr": 2 * asr,
                   "delta_l2": 10.0}]
        (tmp_path / f"setting_seed{seed}.json").write_text(
            json.dumps({"rounds": rounds, "config": {"seed": seed}}))
    assert mod.main([str(tmp_path), "--rounds", "1", "3", "--fields", "ACC", "ASR"]) == 0
    md = (tmp_path / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| setting |"))
    assert "ACC 1" in row and "rel. ASR 1" not in row and "ACC 3" not in row  # round 3 absent
    assert "71.00 ± 1.41" in md and "2.00 ± 1.41" in md and "77.50 ± 0.71" in md
    assert "1.0 / 3.0" in md


def test_auto_projection_follows_the_models_input():
    """auto: the release's raw-pixel small VGG scales δ once (its notebooks); normalising
    models project every step; an explicit choice is kept."""
    assert bd.resolve_projection("auto", "small_vgg") == "end"
    assert bd.resolve_projection("auto", "smallcnn") == "step"
    assert bd.resolve_projection("auto", "resnet18") == "step"
    assert bd.resolve_projection("end", "smallcnn") == "end"
    assert bd.resolve_projection("step", "small_vgg") == "step"
    assert bd.IBAUConfig().projection == "auto"


def test_ibau_rounds_run_in_full_float32_and_leave_the_flags_as_they_were():
    import backdoor_defense as bd

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with bd.full_float32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before

"""Unlearning methods on a tiny separable task (synthetic 8x8 images, 4 classes, SmallCNN)."""
import copy

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import engine
import dataclasses

from test_engine import FakeGraph, cpu_graphs  # noqa: F401 — the CPU stand-in for a CUDA graph

import saliency as S
import unlearning as M
from constants import UserError
from datasets import Split
from training import DataSpec, PreparedData, make_loader, train_classifier

C, SIZE = 4, 8


def _split(n_per_class, seed, train):
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]])
    xs, ys = [], []
    for c in range(C):
        base = colours[c].view(1, 3, 1, 1).float()
        noise = torch.randn(n_per_class, 3, SIZE, SIZE, generator=g) * 25
        xs.append((base + noise).clamp(0, 255).to(torch.uint8))
        ys.append(torch.full((n_per_class,), c))
    return Split(torch.cat(xs), torch.cat(ys), "synthetic", train, [str(c) for c in range(C)])


def make_data(cf=0, unlr=None, seed=0):
    train, test = _split(40, 1, True), _split(20, 2, False)
    n = len(train)
    val = torch.arange(0, n, 10)
    cand = torch.tensor([i for i in range(n) if i % 10])
    if cf is not None:
        forget = cand[train.y[cand] == cf]
    else:
        forget = cand[torch.randperm(len(cand), generator=torch.Generator().manual_seed(seed))[:int(unlr * len(cand))]]
        forget = torch.sort(forget)[0]
    retain = cand[~torch.isin(cand, forget)]
    return PreparedData(train, test, retain, val, forget, DataSpec(dataset="synthetic", cf=cf, unlr=unlr))


RECIPE = engine.TrainConfig(epochs=3, lr=0.05, schedule="constant", amp=False, batch_size=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(2)
    data = make_data()
    full = PreparedData(data.train, data.test, torch.sort(torch.cat([data.retain_idx, data.forget_idx]))[0],
                        data.val_idx, torch.empty(0, dtype=torch.long), DataSpec(dataset="synthetic"))
    model, _, _ = train_classifier("smallcnn", full, RECIPE, device="cpu", seed=0,
                                   ckpt_path=tmp_path_factory.mktemp("ck") / "base.pt")
    return model, data


def forget_acc(model, data):
    ld = make_loader(data, "train", data.forget_idx, model_name="smallcnn", batch_size=256, device="cpu")
    return engine.accuracy_on(model, ld, amp=False)


def setup_for(data, params=None, **train):
    cfg = dict(epochs=2, lr=0.05, batch_size=32, amp=False)
    cfg.update(train)
    return M.Setup(data=data, model_name="smallcnn", seed=0, base=RECIPE, log=lambda m: None,
                   train=dataclasses.replace(M.UNLEARN_DEFAULTS, **cfg), params=params or {})


def mask_for(model, s, threshold):
    return S.saliency_mask(model, M.forget_loader(s, salt=7), threshold)


# hyper-parameters per method for the tiny task (a few steps each)
TINY = {
    "ga_small": dict(lr=0.1, epochs=4),
    "ga": dict(lr=0.05, epochs=2),
    "neggrad_plus": dict(lr=0.05, epochs=2, params={"alpha": 0.5}),
    "ft": dict(lr=0.1, epochs=3),
    "l1_sparse": dict(lr=0.1, epochs=3),
    "boundary_shrink": dict(lr=0.05, epochs=2, params={"bound": 0.6}),
    "boundary_expanding": dict(lr=0.1, epochs=8),
    "iu": dict(params={"alpha": 50.0, "samples": 64}),
}


@pytest.mark.parametrize("name", M.method_names())
def test_each_method_lowers_forget_accuracy(base, name):
    model, data = base
    before = forget_acc(model, data)
    assert before > 90
    s = setup_for(data, **TINY.get(name, {}))
    m = copy.deepcopy(model)
    if M.METHODS[name].forces_mask:
        s.mask = mask_for(m, s, 0.5)
    out = M.unlearn(m, name, s)
    after = forget_acc(out, data)
    assert after < before - 30, f"{name}: forget accuracy {before:.1f} -> {after:.1f}"


def test_mask_keeps_masked_parameters_bit_identical_under_momentum_and_weight_decay(base):
    model, data = base
    m = copy.deepcopy(model)
    s = setup_for(data, lr=0.05, epochs=2, momentum=0.9, weight_decay=5e-4)
    mask = mask_for(m, s, 0.3)
    s.mask = mask
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    seen = []

    def spy(opt, args, kwargs):  # look at the buffers right after each step
        seen.append(opt)

    handle = register_optimizer_step_post_hook(spy)
    try:
        M.unlearn(m, "rl_split", s)
    finally:
        handle.remove()
    moved = 0
    for n, p in m.named_parameters():
        frozen = ~mask[n]
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n  # bit-identical
        moved += int((p.detach() != before[n])[mask[n]].sum())
    assert moved > 0
    opt = seen[-1]
    for n, p in m.named_parameters():
        buf = opt.state[p]["momentum_buffer"]
        assert torch.all(buf[~mask[n]] == 0), n


def test_mask_fraction_is_exact_and_round_trips(base, tmp_path):
    model, data = base
    s = setup_for(data)
    for thr in (0.1, 0.5, 1.0):
        mask = mask_for(model, s, thr)
        total = sum(p.numel() for p in model.parameters())
        assert sum(int(v.sum()) for v in mask.values()) == int(total * thr)
        assert set(mask) == {n for n, _ in model.named_parameters()}
    path = S.save_mask(tmp_path / "m.pt", mask, threshold=1.0)
    again = S.load_mask(path, model)
    assert all(torch.equal(mask[k], again[k]) for k in mask)
    # the official SalUn format: {name: 0/1 float tensor}
    torch.save({k: v.float() for k, v in mask.items()}, tmp_path / "with_0.5.pt")
    assert all(torch.equal(mask[k], v) for k, v in S.load_mask(tmp_path / "with_0.5.pt", model).items())
    with pytest.raises(UserError):
        mask_for(model, s, 0.0)
    with pytest.raises(UserError):
        S.load_mask(tmp_path / "missing.pt")


def test_retrain_never_sees_forget_indices(base, monkeypatch):
    _, data = base
    import datasets

    seen = []
    orig = datasets.BatchLoader.__iter__

    def spy(self):
        for b in orig(self):
            if len(self.y) == len(data.train):  # batches of the training split
                seen.append(b.idx.cpu())
            yield b

    monkeypatch.setattr(datasets.BatchLoader, "__iter__", spy)
    s = setup_for(data)
    model = M.unlearn(None, "retrain", s)
    idx = torch.cat(seen)
    assert len(idx) > 0
    assert not torch.isin(idx, data.forget_idx).any()  # training on retain, evaluating on val
    assert forget_acc(model, data) < 10


def test_random_forgetting_runs_every_iterative_method_on_the_same_signature(base):
    model, _ = base
    data = make_data(cf=None, unlr=0.2)
    for name in ("rl", "rl_split", "ga", "ft"):
        s = setup_for(data, epochs=1)
        out = M.unlearn(copy.deepcopy(model), name, s)
        assert isinstance(out, torch.nn.Module)


def test_aliases_resolve_case_insensitively_but_exact_names_win():
    assert M.resolve("rl")[0].name == "rl"
    assert M.resolve("RL")[0].name == "rl_split"
    assert M.resolve("ga")[0].name == "ga"
    assert M.resolve("GA")[0].name == "ga_small"
    for alias, name in (("ft", "ft"), ("Naive", "ft"), ("naive", "ft"), ("cf", "ft"),
                        ("CF-k", "ft"), ("EU-k", "retrain"), ("eu", "retrain"), ("EU", "retrain"),
                        ("SCRUB", "scrub"), ("BadT", "badt"), ("SSD", "ssd"), ("SalUn", "salun"), ("SALUN", "salun"),
                        ("negGrad+", "neggrad_plus"), ("bs", "boundary_shrink"), ("Be", "boundary_expanding"),
                        ("wfisher", "iu"), ("salun-soft", "salun_soft"), ("RL_SPLIT", "rl_split")):
        assert M.resolve(alias)[0].name == name, alias
    with pytest.raises(UserError, match="ambiguous"):
        M.resolve("Rl")
    with pytest.raises(UserError, match="did you mean 'salun'"):
        M.resolve("salum")
    with pytest.raises(UserError, match="does not take 'alpha'"):
        M.method_params("rl", {"alpha": 1.0})
    assert M.method_params("CF", {"k": 2}) == {"k": 2}
    assert M.method_params("l1_sparse")["alpha"] > 0


def test_last_k_layers_only_move(base):
    model, data = base
    m = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bn_before = m.conv1[0][1].running_mean.clone()
    s = setup_for(data, epochs=1, params={"k": 1})
    M.unlearn(m, "CF", s)
    for n, p in m.named_parameters():
        same = torch.equal(p.detach(), before[n])
        assert same == (not n.startswith("linear")), n
    assert torch.equal(m.conv1[0][1].running_mean, bn_before)  # frozen units stay in eval mode


@pytest.mark.parametrize("name", ["salun", "rl_split", "rl", "ft"])
def test_rl_salun_and_ft_steps_replay_as_one_graph_with_the_eager_numbers(base, cpu_graphs, monkeypatch, name):
    # RL's random labels are drawn as the batches are handed out and SalUn's mask hooks are
    # graph_safe, so on CUDA these steps replay as one CUDA graph (here the CPU stand-in):
    # same weights as the eager loop (with the graph's fused SGD), frozen coordinates untouched
    model, data = base
    runs = []
    for warmup in (10 ** 9, engine.GraphedStep.WARMUP):  # never captured / captured
        monkeypatch.setattr(engine.GraphedStep, "WARMUP", warmup)
        FakeGraph.replays = 0
        s = setup_for(data, momentum=0.9, weight_decay=5e-4)
        m = copy.deepcopy(model)
        if M.METHODS[name].forces_mask:
            s.mask = mask_for(m, s, 0.5)
        runs.append((M.unlearn(m, name, s), FakeGraph.replays))
    (eager, none), (graphed, replays) = runs
    assert none == 0 and replays >= 3
    for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), k
    if name == "salun":
        frozen = {n: ~s.mask[n].bool() for n in s.mask}
        for n, p in graphed.named_parameters():
            assert torch.equal(p.detach()[frozen[n]], dict(model.named_parameters())[n].detach()[frozen[n]]), n

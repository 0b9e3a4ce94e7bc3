"""SalUn's hard mask constraint: the foreach version (saliency.MaskConstraint) trains to the
very same bits as the per-parameter where + copy it replaced, under SGD and Adam."""
import copy

import pytest
import torch

import saliency as S
import unlearning as M
from test_methods import base, mask_for, setup_for  # noqa: F401  (the module's fixture)


class PerParameterConstraint:
    """The constraint as it was: one where + copy, one mul_ per parameter and buffer."""

    def __init__(self, model, mask):
        self.items = [(p, mask[n].bool(), p.detach().clone()) for n, p in model.named_parameters()
                      if not bool(mask[n].all())]
        self.ids = {id(p) for p, _, _ in self.items}

    @torch.no_grad()
    def mask_grads(self, model=None):
        for p, m, _ in self.items:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def restore(self, model=None):
        for p, m, p0 in self.items:
            p.copy_(torch.where(m, p, p0))

    @torch.no_grad()
    def clear_buffers(self, optimizer, *_args):
        for p, m, _ in self.items:
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                buf = (optimizer.state.get(p) or {}).get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == m.shape:
                    buf.mul_(m)


def bits(model):
    return {k: v.detach().clone().view(torch.int32) for k, v in model.state_dict().items()
            if v.dtype == torch.float32}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_foreach_constraint_trains_to_the_same_bits_as_the_per_parameter_one(base, monkeypatch,  # noqa: F811
                                                                             optimizer):
    model, data = base
    lr = 0.05 if optimizer == "sgd" else 1e-3
    s = setup_for(data, lr=lr, epochs=2, momentum=0.9, weight_decay=5e-4, optimizer=optimizer)
    mask = mask_for(copy.deepcopy(model), s, 0.3)
    s.mask = mask
    new = M.unlearn(copy.deepcopy(model), "rl_split", s)
    monkeypatch.setattr(S, "MaskConstraint", PerParameterConstraint)
    old = M.unlearn(copy.deepcopy(model), "rl_split", s)
    a, b = bits(new), bits(old)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    before = dict(model.named_parameters())
    for n, p in new.named_parameters():  # and the frozen coordinates are the base model's bits
        frozen = ~mask[n]
        assert torch.equal(p.detach()[frozen].view(torch.int32), before[n].detach()[frozen].view(torch.int32))


def test_restore_keeps_signed_zeros_and_infinities_bit_for_bit():
    p = torch.nn.Parameter(torch.tensor([-0.0, 0.0, 1.0, -2.0, float("inf"), -float("inf")]))
    p0 = torch.tensor([0.0, -0.0, 5.0, 7.0, 1.0, 2.0])
    mask = {"w": torch.tensor([False, False, False, True, True, True])}
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(p0.clone())
    constraint = S.MaskConstraint(model, mask)
    with torch.no_grad():
        model.w.copy_(p)
    constraint.restore()
    want = torch.where(mask["w"], p.detach(), p0)
    assert torch.equal(model.w.detach().view(torch.int32), want.view(torch.int32))


def test_restore_follows_a_move_to_channels_last():
    """engine.fit turns the model channels_last on CUDA after the constraint is built."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    mask = {n: torch.rand_like(p) < 0.5 for n, p in conv.named_parameters()}
    constraint = S.MaskConstraint(conv, mask)
    w0 = conv.weight.detach().clone()
    conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.weight.add_(1.0)
    constraint.restore()
    m = mask["weight"]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight.detach()[~m], w0[~m]) and torch.equal(conv.weight.detach()[m], w0[m] + 1)

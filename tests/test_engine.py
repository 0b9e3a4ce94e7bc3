import contextlib
import copy
import math

import pytest
import torch

import engine
from constants import UserError
from datasets import Augment, BatchLoader, Split
from models import get_model


def tiny_split(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3] += 100  # a learnable colour cue
    return Split(x, y, "cifar10", True)


def run(tmp_path, resume_path=None, crash_after=None, model_name="small_vgg", amp=False):
    torch.manual_seed(0)
    model = get_model(model_name, 4)
    loader = BatchLoader(tiny_split(), batch_size=16, shuffle=True, seed=0, augment=Augment())
    cfg = engine.TrainConfig(epochs=3, lr=0.05, schedule="cosine", warmup=0.2, amp=amp)

    def crash(epoch, record):
        if crash_after is not None and epoch == crash_after:
            raise KeyboardInterrupt

    history = engine.fit(model, loader, cfg, resume_path=resume_path, on_epoch_end=crash)
    return model, history


def test_resumed_run_ends_bit_identical(tmp_path):
    """Interrupted after epoch 2, then resumed: same weights as never interrupted (CPU).
    small_vgg has dropout, so this also checks that the RNG state is restored."""
    reference, _ = run(tmp_path)
    state = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, resume_path=state, crash_after=2)
    assert state.exists()
    resumed, history = run(tmp_path, resume_path=state)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    model, history = run(tmp_path, model_name="smallcnn", amp=True)
    assert all(math.isfinite(h["train_loss"]) for h in history)


def test_training_learns_a_simple_cue(tmp_path):
    model, history = run(tmp_path, model_name="smallcnn")
    loader = BatchLoader(tiny_split(seed=1), batch_size=64)
    assert engine.accuracy_on(model, loader) > 50  # 4 classes, chance is 25


def test_schedules():
    cfg = engine.TrainConfig(schedule="multistep", milestones=(2, 4), gamma=0.1)
    at = engine.lr_multiplier(cfg, steps_per_epoch=10, total_steps=60)
    assert at(0) == 1 and at(19) == 1 and math.isclose(at(20), 0.1) and math.isclose(at(45), 0.01)
    cos = engine.lr_multiplier(engine.TrainConfig(schedule="cosine", warmup=0.1), 10, 100)
    assert math.isclose(cos(0), 0.1) and math.isclose(cos(9), 1.0) and cos(99) < 0.01
    lin = engine.lr_multiplier(engine.TrainConfig(schedule="linear", final_lr_frac=0.2), 10, 100)
    assert math.isclose(lin(100), 0.2)
    with pytest.raises(UserError, match="unknown schedule"):
        engine.lr_multiplier(engine.TrainConfig(schedule="step"), 10, 100)


def test_iteration_budget_overrides_epochs():
    model = get_model("smallcnn", 4)
    loader = BatchLoader(tiny_split(), batch_size=16)  # 3 batches per epoch
    history = engine.fit(model, loader, engine.TrainConfig(epochs=100, steps=7, lr=0.01))
    assert history[-1]["step"] == 7 and len(history) == 3


def test_checkpoint_round_trip_and_safety(tmp_path):
    model = get_model("smallcnn", 4)
    engine.save_checkpoint(tmp_path / "m.pt", model, {"model": "smallcnn", "acc": 1.5})
    sd, meta = engine.load_checkpoint(tmp_path / "m.pt")
    assert meta == {"model": "smallcnn", "acc": 1.5}
    other = get_model("smallcnn", 4)
    engine.load_weights(other, sd)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(UserError, match="does not fit this model.*shape mismatch"):
        engine.load_weights(get_model("smallcnn", 10), sd)

    torch.save({"net": model.state_dict(), "acc": 84.5, "epoch": 48}, tmp_path / "release.pth")
    sd2, meta2 = engine.load_checkpoint(tmp_path / "release.pth")  # the I-BAU release layout
    assert meta2 == {"acc": 84.5, "epoch": 48} and set(sd2) == set(sd)

    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    torch.save({"state_dict": {}, "meta": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        engine.load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(UserError, match="does not exist"):
        engine.load_checkpoint(tmp_path / "missing.pt")


def test_cuda_graph_only_where_the_step_allows_it():
    cuda, cfg = torch.device("cuda"), engine.TrainConfig()
    assert "cuda_graph" not in engine.TrainConfig.recipe_fields()  # how to run, not what is trained
    assert engine.graph_allowed(cfg, cuda, loss_fn=None, hooks=(None, None))
    assert not engine.graph_allowed(cfg, torch.device("cpu"), loss_fn=None, hooks=(None, None))
    assert not engine.graph_allowed(cfg, cuda, loss_fn=engine.cross_entropy_loss, hooks=(None, None))
    assert not engine.graph_allowed(cfg, cuda, loss_fn=None, hooks=(None, lambda m: None))
    assert engine.graph_allowed(cfg, cuda, loss_fn=None, hooks=(None, engine.graph_safe(lambda m: None)))
    assert engine.graph_allowed(engine.TrainConfig(compile=True), cuda, loss_fn=None, hooks=())
    for changed in ({"cuda_graph": False}, {"optimizer": "adam"}):
        assert not engine.graph_allowed(engine.TrainConfig(**changed), cuda, loss_fn=None, hooks=())


class FakeGraph:
    """A CUDA graph's contract on the CPU: capturing changes nothing; a replay runs the step
    again and writes its outputs into the captured ones (gradients written, not added)."""

    replays = 0

    def replay(self):
        FakeGraph.replays += 1
        self.owner.optimizer.zero_grad(set_to_none=True)
        for old, new in zip(self.out, self.owner.step()):
            old.copy_(new.detach())


def fake_capture(graph, step):
    owner = step.__self__
    saved = (copy.deepcopy(owner.model.state_dict()), copy.deepcopy(owner.optimizer.state_dict()),
             torch.get_rng_state())
    out = tuple(t.detach().clone() for t in step())
    owner.model.load_state_dict(saved[0])
    owner.optimizer.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    owner.optimizer.zero_grad(set_to_none=True)
    graph.owner, graph.out = owner, out
    return out


class FakeStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def cpu_graphs(monkeypatch):
    """engine.fit's CUDA-graph path run on the CPU through FakeGraph."""
    allowed = engine.graph_allowed  # what it decides on CUDA
    monkeypatch.setattr(engine, "graph_allowed", lambda cfg, device, loss_fn, hooks: allowed(
        cfg, torch.device("cuda"), loss_fn=loss_fn, hooks=hooks))
    monkeypatch.setattr(engine, "capture", fake_capture)
    monkeypatch.setattr(FakeGraph, "replays", 0)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def graph_run(cuda_graph: bool, resume_path=None, crash_after=None, compile=False):
    torch.manual_seed(0)
    model = get_model("small_vgg", 4)  # dropout: the RNG must advance as without the graph
    loader = BatchLoader(tiny_split(n=58), batch_size=16, shuffle=True, seed=0, augment=Augment())
    cfg = engine.TrainConfig(epochs=3, lr=0.05, schedule="linear", warmup=0.2, grad_clip=5.0,
                             label_smoothing=0.1, cuda_graph=cuda_graph, compile=compile)

    def crash(epoch, record):
        if crash_after is not None and epoch == crash_after:
            raise KeyboardInterrupt

    return model, engine.fit(model, loader, cfg, resume_path=resume_path, on_epoch_end=crash)


def test_the_graphed_step_trains_exactly_as_the_eager_loop(cpu_graphs, tmp_path):
    # 58 images in batches of 16: three full batches replayed (after 3 warm-up steps), the
    # last of 10 eagerly; the learning rate a tensor the schedule fills from step 4 on
    plain, plain_hist = graph_run(False)
    assert FakeGraph.replays == 0
    graphed, hist = graph_run(True)
    assert FakeGraph.replays == 6  # epoch 1 warms up; epochs 2 and 3 replay their full batches
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in plain_hist]
    assert all(isinstance(h["lr"], float) for h in hist)
    for (k, a), b in zip(plain.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), k
    # and a graphed run stopped after epoch 2 resumes to the same weights (its lr was a tensor)
    state = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        graph_run(True, resume_path=state, crash_after=2)
    resumed, _ = graph_run(True, resume_path=state)
    for (k, a), b in zip(plain.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_compiled_step_is_graphed_after_compiling_in_the_warm_up(cpu_graphs, monkeypatch):
    # under --compile the warm-up steps compile the model and the graph holds the compiled
    # step (aot_eager: dynamo and AOT autograd without a C++ toolchain, quickly); the same
    # weights as the compiled step run eagerly (a capture that never comes)
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager"))
    torch._dynamo.reset()
    monkeypatch.setattr(engine.GraphedStep, "WARMUP", 10 ** 9)
    eager, eager_hist = graph_run(True, compile=True)
    assert FakeGraph.replays == 0
    monkeypatch.setattr(engine.GraphedStep, "WARMUP", 3)
    graphed, hist = graph_run(True, compile=True)
    assert FakeGraph.replays == 6
    assert [h["train_loss"] for h in hist] == [h["train_loss"] for h in eager_hist]
    for (k, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), k

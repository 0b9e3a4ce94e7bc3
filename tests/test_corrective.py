"""Corrective unlearning: manipulations (S_f ⊆ S_m, the retain set keeps S_m \\ S_f, the trigger
after augmentation), SCRUB / BadT / SSD, main.py's corrective keys and the sweep script."""
import copy
import dataclasses
import json

import pytest
import torch

import corrective as C
import engine
import unlearning as U
from constants import DATASETS, UserError
from datasets import Augment, BatchLoader, Split
from training import DataSpec, PreparedData, train_classifier

VALUE = DATASETS["cifar10"].max_normalized


def tiny_split(n=200, seed=0, name="cifar10"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 200, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # never 255: no accidental patch
    y = torch.randint(0, 10, (n,), generator=g)
    return Split(x, y, name, True, [str(i) for i in range(10)])


def tiny_data(n=200):
    train, test = tiny_split(n, 0), tiny_split(50, 1)
    test.train = False
    val = torch.arange(0, n, 10)
    cand = torch.tensor([i for i in range(n) if i % 10])
    return PreparedData(train, test, cand, val, torch.empty(0, dtype=torch.long), DataSpec())


# ----------------------------------------------------------------------------- data layer

@pytest.mark.parametrize("kind", ["poisoning", "interclasslabelswap", "randomlabelswap"])
def test_deletion_set_is_a_nested_subset_of_the_manipulated_set_and_retain_keeps_the_rest(kind):
    base = tiny_data(400)
    manip = C.manipulate(base.train, kind, 40, seed=3, candidates=base.retain_idx, value=VALUE)
    assert len(manip.manip_idx) == 40 and torch.isin(manip.manip_idx, base.retain_idx).all()
    assert not torch.isin(manip.manip_idx, base.val_idx).any()  # validation stays clean
    previous = torch.empty(0, dtype=torch.long)
    for size in (0, 10, 25, 40):
        data = C.with_deletion(base, manip, size, seed=3)
        sf, sm = data.forget_idx, manip.manip_idx
        assert len(sf) == size and torch.isin(sf, sm).all()  # S_f ⊆ S_m
        assert torch.isin(previous, sf).all()  # nested across deletion sizes
        previous = sf
        assert not torch.isin(data.retain_idx, sf).any()
        kept = sm[~torch.isin(sm, sf)]
        assert torch.isin(kept, data.retain_idx).all()  # S_m \ S_f stays in the retain set
        assert torch.equal(torch.sort(torch.cat([data.retain_idx, sf]))[0], base.retain_idx)
    # a different seed draws a different S_m; the same seed the same one
    assert torch.equal(C.manipulate(base.train, kind, 40, seed=3, candidates=base.retain_idx).manip_idx,
                       manip.manip_idx)
    assert not torch.equal(C.manipulate(base.train, kind, 40, seed=4, candidates=base.retain_idx).manip_idx,
                           manip.manip_idx)


def test_manipulated_labels():
    base = tiny_data()
    y = base.train.y
    p = C.manipulate(base.train, "poisoning", 30, seed=0, candidates=base.retain_idx, value=VALUE)
    changed = torch.nonzero(p.labels != y).flatten()
    assert (p.labels[p.manip_idx] == 0).all() and torch.isin(changed, p.manip_idx).all()
    ic = C.manipulate(base.train, "labeltargeted", 10, seed=0, candidates=base.retain_idx)  # the old name
    assert ic.kind == "interclasslabelswap" and ic.classes == (3, 5)
    assert sorted(y[ic.manip_idx].tolist()) == [3] * 5 + [5] * 5
    assert torch.equal(ic.labels[ic.manip_idx], 8 - y[ic.manip_idx])  # 3 <-> 5
    assert torch.equal(torch.nonzero(ic.labels != y).flatten(), ic.manip_idx)
    rs = C.manipulate(base.train, "randomlabelswap", 30, seed=0, candidates=base.retain_idx)
    assert sorted(rs.labels[rs.manip_idx].tolist()) == sorted(y[rs.manip_idx].tolist())  # a permutation
    assert torch.isin(torch.nonzero(rs.labels != y).flatten(), rs.manip_idx).all()
    for bad in (dict(kind="poisoning", n=0), dict(kind="interclasslabelswap", n=11),
                dict(kind="nope", n=4), dict(kind="poisoning", n=5000)):
        with pytest.raises(UserError):
            C.manipulate(base.train, bad["kind"], bad["n"], seed=0, candidates=base.retain_idx)
    with pytest.raises(UserError):
        C.deletion_set(p, 31, seed=0)


def test_trigger_lands_after_augmentation_on_manipulated_samples_only():
    base = tiny_data()
    manip = C.manipulate(base.train, "poisoning", 60, seed=1, candidates=base.retain_idx, value=VALUE)
    loader = BatchLoader(base.train, base.retain_idx, batch_size=64, shuffle=True, seed=5,
                         augment=Augment(crop=4, flip=True), view=manip.view())
    in_sm = torch.zeros(len(base.train), dtype=torch.bool)
    in_sm[manip.manip_idx] = True
    seen = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            corner = batch.x[:, :, -3:, -3:]
            sel = in_sm[batch.idx]
            # exactly the dataset's largest normalised value, in the final corner, whatever the crop
            assert (corner[sel] == VALUE).all()
            assert not (corner[~sel] == VALUE).all(dim=(1, 2, 3)).any()
            assert (batch.y[sel] == 0).all()
            # the pixels next to the patch are augmented image content, not the patch
            assert not (batch.x[sel][:, :, -4, -4] == VALUE).all()
            seen += int(sel.sum())
    assert seen == 3 * 60
    # stamping before the crop would move (or cut) the patch: a padded crop shifts it in most images
    pre = base.train.x[manip.manip_idx].float() / 255
    pre[:, :, -3:, -3:] = 1.0
    moved = Augment(crop=4, flip=True)(pre, torch.Generator().manual_seed(0))
    assert not (moved[:, :, -3:, -3:] == 1.0).all(dim=(1, 2, 3)).all()


# ----------------------------------------------------------------------------- methods

def _learn_poison(tmp_path):
    torch.manual_seed(0)
    base = tiny_data(300)
    manip = C.manipulate(base.train, "poisoning", 40, seed=0, candidates=base.retain_idx, value=VALUE)
    cfg = engine.TrainConfig(epochs=3, lr=0.05, schedule="constant", amp=False)
    model, _, _ = train_classifier("smallcnn", base, cfg, device="cpu", batch_size=64, seed=0,
                                   ckpt_path=tmp_path / "base.pt", resume=False,
                                   view=manip.view())
    return model, base, manip


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    torch.set_num_threads(2)
    return _learn_poison(tmp_path_factory.mktemp("ck"))


def _setup(data, manip, params=None, **train):
    cfg = dict(epochs=1, lr=0.01, batch_size=64, amp=False)
    cfg.update(train)
    return U.Setup(data=data, model_name="smallcnn", seed=0, log=lambda m: None,
                   train=dataclasses.replace(U.UNLEARN_DEFAULTS, **cfg),
                   params=params or {}, view=manip.view())


def test_ssd_dampens_only_parameters_important_to_the_forget_set(poisoned):
    model, base, manip = poisoned
    data = C.with_deletion(base, manip, 20, seed=0)
    m = copy.deepcopy(model)
    s = _setup(data, manip, params={"SSDdampening": 1.0, "SSDselectwt": 10.0})
    params = list(m.parameters())
    before = [p.detach().clone() for p in params]
    imp_f = C.ssd_importance(m, U.forget_loader(s, salt=11), params)
    imp_d = C.ssd_importance(m, U.retain_loader(s, salt=12), params)
    out = U.unlearn(m, "SSD", s)
    assert out is m
    low = changed = 0
    for p, p0, i_f, i_d in zip(params, before, imp_f, imp_d):
        sel = i_f > 10.0 * i_d
        assert torch.equal(p.detach()[~sel], p0[~sel])  # low forget importance: bit-identical
        beta = (i_d[sel] / i_f[sel]).clamp(max=1.0)
        assert torch.allclose(p.detach()[sel], p0[sel] * beta)
        low += int((~sel).sum())
        changed += int((p.detach() != p0).sum())
    assert low > 0 and changed > 0
    # a mask restricts it further; k restricts it to the last layers
    m2 = copy.deepcopy(model)
    s2 = _setup(data, manip, params={"k": 1})
    U.unlearn(m2, "SSD", s2)
    for (n, p), p0 in zip(m2.named_parameters(), before):
        if not n.startswith("linear"):
            assert torch.equal(p.detach(), p0), n


def test_ssd_dampen_formula():
    p = [torch.tensor([1.0, 2.0, 3.0, 4.0])]
    i_f = [torch.tensor([0.0, 1.0, 10.0, 100.0])]
    i_d = [torch.tensor([1.0, 1.0, 1.0, 1.0])]
    assert C.ssd_dampen(p, i_f, i_d, dampening=2.0, select_weight=5.0) == 2
    assert torch.equal(p[0], torch.tensor([1.0, 2.0, 3.0 * 0.2, 4.0 * 0.02]))


def test_scrub_schedule_and_corrective_methods_run(poisoned):
    model, base, manip = poisoned
    forget = BatchLoader(base.train, torch.arange(10), batch_size=5)
    retain = BatchLoader(base.train, torch.arange(10, 40), batch_size=10)
    stream = C.MaxMinStream(forget, retain, max_steps=4)
    tags = [[t for t, _ in stream] for _ in range(3)]
    # the first epoch takes 5 items (2 max + 3 min), so max passes stop after it
    assert tags[0] == ["max"] * 2 + ["min"] * 3 and tags[1] == tags[2] == ["min"] * 3
    data = C.with_deletion(base, manip, 20, seed=0)
    for name, kw in (("scrub", dict(params={"alpha": 0.1}, steps=6)), ("BadT", dict(steps=4)),
                     ("EU", dict(params={"k": 1}, steps=3)), ("CF", dict(params={"k": 1}, steps=3))):
        out = U.unlearn(copy.deepcopy(model), name, _setup(data, manip, **kw))
        assert isinstance(out, torch.nn.Module)
    metrics = C.evaluate(model, data, manip, model_name="smallcnn", batch_size=256, device="cpu", amp=False)
    for key in ("Acc_corr", "Acc_retain", "ASR", "val_Acc_corr", "val_ASR", "acc_Sm", "acc_Sf"):
        assert 0 <= metrics[key] <= 100, key


def test_badt_incompetent_teacher_is_a_seeded_random_init():
    t1 = C.random_init_copy("smallcnn", 10, "cpu", 3)
    t2 = C.random_init_copy("smallcnn", 10, "cpu", 3)
    assert all(torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    assert not any(p.requires_grad for p in t1.parameters())


# ----------------------------------------------------------------------------- main.py

import main  # noqa: E402
from cli import run_main  # noqa: E402


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(main.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_corrective_readme_command_line_is_accepted(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ck"))
    code, out, err = run_cli(["--dataset=CIFAR10", "--num_classes=10", "--model=resnet9", "--pretrain_iters=4000",
                              "--dataset_method=labeltargeted", "--forget_set_size=500", "--deletion_size=250",
                              "--unlearn_method=EU", "--unlearn_iters=4000", "--k=-1", "--dry-run"], capsys)
    assert code == 0, err
    assert "interclasslabelswap |S_m|=500 |S_f|=250" in out and "retrain" in out and "steps 4000" in out
    code, out, err = run_cli(["--dataset_method", "poisoning", "--unlearn_method", "SCRUB", "--dry-run"], capsys)
    assert code == 0 and "lr 0.0025" in out and "|S_f|=500" in out  # SCRUB's lr; S_f = S_m by default


@pytest.mark.parametrize("exp, message", [
    ({"dataset_method": "poison"}, "unknown dataset_method 'poison'"),
    ({"dataset_method": "poisoning", "class_to_forget": 1}, "exactly one forget specifier"),
    ({"dataset_method": "poisoning", "forget_set_size": 10, "deletion_size": 11}, "deletion_size must be between 0"),
    ({"class_to_forget": 1, "deletion_size": 3}, "'deletion_size' only goes with dataset_method"),
    ({"dataset_method": "interclasslabelswap", "forget_set_size": 7}, "even forget_set_size"),
    ({"dataset_method": "poisoning", "num_classes": 100}, "num_classes 100 does not match"),
    ({"dataset_method": "poisoning", "avg_gap": True}, "avg_gap"),
    ({"dataset_method": "poisoning", "method": "ssd", "deletion_size": 0}, "needs deletion_size >= 1"),
    ({"dataset_method": "poisoning", "method": "ssd", "alpha": 1.0}, "does not take 'alpha'"),
])
def test_invalid_corrective_experiments_fail_with_one_line(tmp_path, capsys, exp, message):
    path = tmp_path / "e.json"
    path.write_text(json.dumps([exp]))
    code, _, err = run_cli(["-L", str(path)], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_end_to_end_poisoning_run_caches_the_manipulated_model_per_seed(tiny_env, capsys):
    common = {"model": "smallcnn", "dataset_method": "poisoning", "forget_set_size": 40, "batch_size": 64,
              "unlearn_iters": 3, "eval_batch_size": 256, "nexp": 2,
              "base": {"epochs": 1, "lr": 0.05, "batch_size": 64, "schedule": "constant"}}
    exp = {"defaults": common, "experiments": [
        {"unlearn_method": "SSD", "deletion_size": 10},
        {"unlearn_method": "EU", "k": -1, "deletion_size": 20},
        {"unlearn_method": "CF", "deletion_size": 20, "unlearn_lr": 0.01},
    ]}
    path = tiny_env / "cu.json"
    path.write_text(json.dumps(exp))
    code, out, err = run_cli(["-L", str(path), "-NL", "--device", "cpu"], capsys)
    assert code == 0, err
    runs = [json.loads(line) for line in (tiny_env / "results_dir" / "main" / "cu" / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 6
    for r in runs:
        for key in ("Acc_corr", "Acc_retain", "ASR", "acc_Sm", "acc_Sf", "val_Acc_corr", "time_s"):
            assert isinstance(r[key], float), key
        assert "UA" not in r and "gap" not in r
        assert set(r["base"]["metrics"]) >= {"Acc_corr", "ASR", "Acc_retain"}
    assert runs[0]["deletion_frac"] == 0.25 and runs[2]["deletion_frac"] == 0.5
    assert runs[4]["config"]["lr"] == 0.01 and runs[4]["config"]["steps"] == 3  # aliases
    ck = tiny_env / "checkpoint_dir"
    bases = sorted((ck / "base").glob("*.pt"))
    assert len(bases) == 2  # one manipulated model per seed, shared by every method and |S_f|
    assert runs[0]["base"]["checkpoint"] != runs[1]["base"]["checkpoint"]
    assert runs[0]["base"]["checkpoint"] == runs[2]["base"]["checkpoint"] == runs[4]["base"]["checkpoint"]
    sm = json.loads((ck / "base" / (bases[0].stem + "_manip.json")).read_text())
    assert len(sm["forget"]) == 40 and max(sm["forget"]) < 400  # indexes the full training split
    assert len(list((ck / "retrain").glob("*.pt"))) == 2  # EU (k=-1) per seed
    assert "Acc_corr" in out and "ASR" in out
    code, out, _ = run_cli(["-L", str(path), "-NL", "--device", "cpu", "--nexp", "1"], capsys)
    assert code == 0 and "training the" not in out  # cached


# ----------------------------------------------------------------------------- the sweep

import corrective_sweep  # noqa: E402


def test_sweep_plan_dry_runs_and_report_selects_on_validation(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CHECKPOINT_DIR", str(tmp_path / "ck"))
    plan = tmp_path / "sweep.json"
    with pytest.raises(SystemExit) as e:
        run_main(corrective_sweep.main, ["plan", "--out", str(plan), "--fractions", "0.5", "1.0", "--seeds", "2"])
    assert e.value.code == 0
    exps = json.loads(plan.read_text())["experiments"]
    assert len(exps) == 2 * (1 + 1 + 2 + 1 + 6)
    code, out, err = run_cli(["-L", str(plan), "--dry-run"], capsys)
    assert code == 0, err
    runs = []
    for seed in (0, 1):
        base = {"checkpoint": "b", "metrics": {"Acc_corr": 20.0, "Acc_retain": 60.0, "ASR": 85.0}}
        for frac in (0.5, 1.0):
            for lam, val, test in ((1.0, 50.0, 40.0), (10.0, 30.0, 90.0)):  # the test-best one loses on val
                runs.append({"method": "ssd", "seed": seed, "name": f"SSD {lam} {frac}", "deletion_frac": frac, "base": base,
                             "config": {"dataset_method": "poisoning", "forget_set_size": 100, "model": "smallcnn",
                                        "dataset": "cifar10", "subset": 5000,
                                        "params": {"SSDdampening": lam, "SSDselectwt": 10.0, "k": -1}},
                             "val_Acc_corr": val, "val_Acc_retain": 60.0, "Acc_corr": test + seed,
                             "Acc_retain": 55.0, "ASR": 5.0, "time_s": 1.0})
    runs_file = tmp_path / "runs.jsonl"
    runs_file.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    with pytest.raises(SystemExit) as e:
        run_main(corrective_sweep.main, ["report", str(runs_file), "--out", str(tmp_path / "fig" / "sweep")])
    assert e.value.code == 0
    md = (tmp_path / "fig" / "sweep.md").read_text()
    assert "| λ=1 |" in md and "40.50 ± 0.71" in md and "90.50" not in md
    runs[0]["val_Acc_corr"] = 0.0  # seed 0 now prefers lambda=10 on validation
    runs_file.write_text("\n".join(json.dumps(r) for r in runs) + "\n")
    with pytest.raises(SystemExit) as e:
        run_main(corrective_sweep.main, ["report", str(runs_file), "--out", str(tmp_path / "fig" / "sweep")])
    md = (tmp_path / "fig" / "sweep.md").read_text()
    assert "λ=10 / λ=1" in md and "65.50 ± 34.65" in md  # seed 0: 90, seed 1: 41
    assert "manipulated model" in md and "85.00 ± 0.00" in md
    assert (tmp_path / "fig" / "sweep.png").stat().st_size > 1000

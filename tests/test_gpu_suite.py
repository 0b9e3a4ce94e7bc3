"""bench/gpu_suite.py --tiny: every part runs on tiny data on a CPU and lands in the report
(about 1.5 min on a 2-core CPU); the data travel through pack_data.py's archive where the
tool is there; a part over its budget is cut and says so, one with time to spare leaves it to
the next, grouped steps run side by side; bad flags give one error line."""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DATA_ROOT", "../shared/data")).resolve()
PACK_TOOL = DATA.parent / "tools" / "pack_data.py"
DEFAULT_PARTS = ["a", "b", "c", "d", "e", "f", "g"]


def load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def suite(tmp: Path, *flags) -> tuple[int, dict, str]:
    env = {**os.environ, "RESULTS_DIR": str(tmp / "results"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--tiny", "--work", str(tmp / "work"),
                           "--report", str(tmp / "gpu.md"), "--threads", "1", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp / "gpu.json").read_text()) if (tmp / "gpu.json").is_file() else {}
    return proc.returncode, report, proc.stdout + proc.stderr


def numbers(tree, path=()):
    """(path, value) for every number in a JSON tree (bools left out)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, (*path, i))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def pack_tiny_archive(tmp: Path) -> Path:
    """A pack_data.py archive of a tiny CIFAR-10 slice, made by the real tool (which packs
    <its folder>/../data), with the tool and the release model beside it as bench/GPU.md says."""
    tools, src = tmp / "shared" / "tools", tmp / "shared" / "data" / "cifar10"
    tools.mkdir(parents=True)
    shutil.copy(PACK_TOOL, tools / "pack_data.py")
    for split, n in (("train", 40), ("test", 20)):
        for c in sorted(p.name for p in (DATA / "cifar10" / split).iterdir()):
            (src / split / c).mkdir(parents=True)
            for f in sorted((DATA / "cifar10" / split / c).iterdir())[:n]:
                shutil.copy(f, src / split / c / f.name)
    carry = tmp / ".gpu"
    carry.mkdir()
    subprocess.run([sys.executable, str(tools / "pack_data.py"), "pack", str(carry / "data.npz")], check=True,
                   capture_output=True)
    shutil.copy(PACK_TOOL, carry / "pack_data.py")
    if (DATA / "ibau_release").is_dir():
        shutil.copytree(DATA / "ibau_release", carry / "ibau_release")
    return carry / "data.npz"


def test_tiny_suite_reports_every_part(tmp_path):
    travel = PACK_TOOL.is_file() and (DATA / "cifar10" / "train").is_dir()
    flags = ["--data-npz", str(pack_tiny_archive(tmp_path)), "--unpack-to", str(tmp_path / "unpacked")] if travel else []
    code, report, out = suite(tmp_path, *flags)
    assert code == 0, out
    parts = report["parts"]
    assert list(parts) == ["data", *DEFAULT_PARTS]
    release = (DATA / "ibau_release" / "badnets_8_02_ckpt.pth").is_file()
    for key in DEFAULT_PARTS:
        want = "done" if key != "f" or release else "skipped"
        assert parts[key]["status"] == want, (key, parts[key])
    assert report["machine"]["torch"] and report["machine"]["torchvision"]
    assert set(report["machine"]["cifar10_crc32"]) == {"train", "test"}  # which pixels were decoded
    if travel:
        assert (tmp_path / "unpacked" / "cifar10" / "test").is_dir()
        assert parts["data"]["steps"][0]["name"] == "unpack the data"
    f = {k: parts[k]["figures"] for k in DEFAULT_PARTS}
    assert f["a"]["eager"]["speedup"] > 0 and f["a"]["eager"]["epoch_s"] > 0 and f["a"]["mask"]["mask_cost_pct"] is not None
    assert 0 <= f["b"]["test_acc"] <= 100 and 0 <= f["b"]["standard_test_acc"] <= 100
    for key in ("c", "d"):
        assert {"Retrain", "FT", "GA", "RL", "SalUn", "l1-sparse"} <= set(f[key]), key
        assert f[key]["SalUn"]["gap"] is not None
    assert all(f["e"][p]["test_acc"] is not None for p in ("clean", "ops", "lsp", "l2-ar"))
    assert f["e"]["dfr"]["dfr_test_acc"] is not None
    if release:
        assert f["f"]["cifar10"]["asr"] is not None
        # round 1 on two devices (here the CPU twice) and through the plain layers, compared
        assert len(f["f"]["divergence"]) == 3
        assert all(r["delta_cosine"] is not None for r in f["f"]["divergence"].values())
    assert {"poisoning", "interclasslabelswap"} <= set(f["g"])
    assert len(f["g"]["poisoning"]) == 1 + 10  # the manipulated model, 5 methods x 2 shares
    found = list(numbers(f))
    assert len(found) > 100, "the parts' figures hold numbers"
    assert [p for p, v in found if not math.isfinite(v)] == []
    for key in ["data", *DEFAULT_PARTS]:
        assert math.isfinite(parts[key]["seconds"]) and parts[key]["seconds"] >= 0, key
        assert all(s["status"] == "done" for s in parts[key]["steps"]), (key, parts[key]["steps"])
    assert report["state"] == "finished" and 0 < report["elapsed_s"] < 600
    md = (tmp_path / "gpu.md").read_text()
    assert all(f"## ({k})" in md for k in DEFAULT_PARTS) and "torchvision" in md


def test_the_longer_fast_recipe_part_trains_and_reports(tmp_path):
    code, report, out = suite(tmp_path, "--parts", "long")
    assert code == 0, out
    long = report["parts"]["long"]
    assert long["status"] == "done" and long["figures"]["epochs"] == 2 and 0 <= long["figures"]["test_acc"] <= 100
    assert "--nesterov" in long["steps"][0]["command"]
    assert "the same over 2 epochs: " in (tmp_path / "gpu.md").read_text()


def fake_suite(tmp: Path, monkeypatch, parts: dict, budgets: dict, total=None):
    """A Suite over stand-in parts whose steps sleep: {key: [(seconds, together), ...]}."""
    gpu_suite = load_suite()
    from gpu_parts import Context, Part, Step, TINY

    def steps_of(spec):
        return lambda ctx: [Step(f"sleep {t}", ["-c", f"import time; time.sleep({t})"], runtime=False,
                                 together=together) for t, together in spec]

    monkeypatch.setattr(gpu_suite, "PARTS", {k: Part(k, f"part {k}", steps_of(v), lambda ctx, runs: ({}, ""))
                                             for k, v in parts.items()})
    ctx = Context(tiny=True, scale=TINY, work=tmp, data_root=tmp, results={})
    args = gpu_suite.build_parser().parse_args(["--tiny"])
    budgets = {"data": 0.0, **budgets}
    total = sum(budgets.values()) if total is None else total
    suite = gpu_suite.Suite(args, ctx, budgets, list(parts), total, tmp / "gpu.md", dict(os.environ), [])
    for key in parts:
        suite.run_part(key)
    return ctx.results


def test_a_step_past_its_part_budget_is_cut_and_a_part_with_no_time_left_skipped(tmp_path, monkeypatch):
    res = fake_suite(tmp_path, monkeypatch, {"x": [(60, None), (0, None)], "y": [(0, None)]},
                     {"x": 2.0, "y": 4.0}, total=3.0)
    x, y = res["x"], res["y"]
    assert x["status"] == "cut" and "cut at its budget" in x["note"]
    assert [s["status"] for s in x["steps"]] == ["cut", "skipped"] and x["seconds"] < 15
    assert y["status"] == "skipped" and "its own budget is 4" in y["note"]  # the total ran out
    assert "| x |" in (tmp_path / "gpu.md").read_text()


def test_a_part_may_use_what_earlier_parts_left(tmp_path, monkeypatch):
    # x ends at once: y's 4 s step fits in the 1 s of its own budget plus x's 5 unused
    res = fake_suite(tmp_path, monkeypatch, {"x": [(0, None)], "y": [(4, None)]}, {"x": 5.0, "y": 1.0})
    assert res["x"]["status"] == "done" and res["y"]["status"] == "done"


def test_steps_of_one_group_run_side_by_side(tmp_path, monkeypatch):
    res = fake_suite(tmp_path, monkeypatch, {"x": [(3, "g"), (3, "g"), (0, None)]}, {"x": 60.0})
    x = res["x"]
    assert x["status"] == "done" and [s.get("side_by_side") for s in x["steps"]] == [2, 2, None]
    assert x["seconds"] < 5.5  # two 3 s steps together, not one after the other


@pytest.mark.parametrize("argv, message", [
    (["--part-budget", "z=3"], "--part-budget z=3"),
    (["--part-budget", "a=-1"], "--part-budget a=-1"),
    (["--parts", "a", "--skip", "a"], "no part left"),
    (["--data-npz", "missing.npz"], "need the archive and pack_data.py"),
    (["--unpack-to", "/tmp/x"], "--unpack-to goes with --data-npz"),
])
def test_bad_flags_fail_before_anything_runs(tmp_path, argv, message):
    gpu_suite = load_suite()
    with pytest.raises(gpu_suite.UserError, match=re.escape(message)):
        gpu_suite.main(["--tiny", "--work", str(tmp_path / "w"), *argv])
    assert not (tmp_path / "w").exists()

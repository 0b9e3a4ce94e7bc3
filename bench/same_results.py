"""Do two versions of the code give the same numbers? A refactoring's check.

    python bench/same_results.py run OUT_DIR [NAME ...]   # the small runs below (or those
                                                          # whose name contains a NAME)
    python bench/same_results.py compare A_DIR B_DIR

`run` executes one small run of each script (SmallCNN or the release's small VGG, a few
hundred to a few thousand CIFAR-10 images, one thread, seed 0) with CHECKPOINT_DIR,
RESULTS_DIR and CACHE_DIR inside OUT_DIR (so poisons are generated afresh), then writes OUT_DIR/fingerprint.json: every number of every
result file (times left out) and a SHA-1 of every tensor of every checkpoint. `compare`
lists what differs; exit 1 if anything does. About 8 minutes on a 2-core CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELEASE = "{data}/ibau_release/badnets_8_02_ckpt.pth"
SMALL = ["--model", "smallcnn", "--subset", "1000", "--epochs", "2", "--batch-size", "128",
         "--lr", "0.05", "--schedule", "cosine"]
RT = ["--device", "cpu", "--threads", "1", "-NL"]
COMMANDS = [  # (name, argv); {ck} = CHECKPOINT_DIR, {data} = DATA_ROOT
    ("quickstart seed 0", ["main.py", "-L", "exp/quickstart.json", "--nexp", "1"]),
    ("train clean", ["train.py", *SMALL, "--out", "{ck}/clean.pt"]),
    ("train ops", ["train.py", *SMALL, "--poison", "ops", "--out", "{ck}/ops.pt"]),
    ("train badnets", ["train.py", *SMALL, "--attack", "badnets", "--poison-rate", "0.1",
                       "--target", "0", "--out", "{ck}/badnets.pt"]),
    ("defense ibau (ours)", ["defense.py", "--poi_path", "{ck}/badnets.pt", "--n_clean", "200",
                             "--n_rounds", "1", "--tag", "ibau_ours"]),
    ("defense fineprune (ours)", ["defense.py", "--poi_path", "{ck}/badnets.pt", "--method",
                                  "fineprune", "--n_clean", "200", "--epochs", "2",
                                  "--tag", "fineprune_ours"]),
    ("defense ibau (release)", ["defense.py", "--poi_path", RELEASE, "--n_clean", "200",
                                "--n_rounds", "1", "--n-eval", "1000", "--tag", "ibau_release"]),
    ("make_poison lsp", ["make_poison.py", "lsp", "--no-png"]),
    ("dfr step 1", ["dfr_step_1.py", "ops", "--model", "smallcnn", "--subset", "2000",
                    "--epochs", "2"]),
    ("dfr step 2", ["dfr_step_2.py", "ops", "--model", "smallcnn", "--subset", "2000",
                    "--epoch", "all", "--num_dfr_train", "500", "--dfr-steps", "5"]),
    ("op step 1", ["orthogonal_projection_step_1.py", "ops", "--subset", "2000", "--epochs", "5"]),
    ("op step 2", ["orthogonal_projection_step_2.py", "ops", "--model", "smallcnn",
                   "--subset", "2000", "--epochs", "2"]),
    ("corrective", ["main.py", "--dataset_method", "poisoning", "--model", "smallcnn",
                    "--subset", "1000", "--forget_set_size", "50", "--deletion_size", "25",
                    "--pretrain_iters", "40", "--unlearn_method", "ssd", "--unlearn_iters", "10",
                    "--batch-size", "128", "--test-subset", "500", "--seed", "0"]),
]
SKIP = ("time", "seconds", "_s", "wall", "started", "date", "torch", "device", "commit", "argv")


def run(out: Path, only: list[str]) -> None:
    env = dict(os.environ, CHECKPOINT_DIR=str(out / "checkpoints"), RESULTS_DIR=str(out / "results"),
               CACHE_DIR=str(out / "cache"), WANDB_MODE="disabled")
    data = env.get("DATA_ROOT", str(ROOT / "data"))
    log = open(out / "log.txt", "w")
    for name, argv in COMMANDS:
        if only and not any(o in name for o in only):
            continue
        argv = [a.format(ck=env["CHECKPOINT_DIR"], data=data) for a in argv]
        print(f"== {name}: python {' '.join(argv)}", flush=True)
        log.write(f"== {name}\n")
        log.flush()
        subprocess.run([sys.executable, *argv, *RT], cwd=ROOT, env=env, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    write_fingerprint(out)


def numbers(obj, prefix=""):
    """Every numeric leaf of a JSON value, keyed by its path; times and paths left out."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not any(s in str(k).lower() for s in SKIP):
                yield from numbers(v, f"{prefix}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{prefix}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield prefix, obj


def tensor_digests(path: Path) -> dict:
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    out = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            out[key] = hashlib.sha1(o.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{key}.{k}")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{key}[{i}]")
    walk(obj, "")
    return out


def write_fingerprint(out: Path) -> None:
    fp = {}
    for f in sorted((out / "results").rglob("*.json*")):
        rel = str(f.relative_to(out))
        lines = f.read_text().splitlines() if f.suffix == ".jsonl" else [f.read_text()]
        for i, line in enumerate(lines):
            for k, v in numbers(json.loads(line)):
                fp[f"{rel}#{i}{k}"] = v
    for f in sorted(out.rglob("*.pt")):
        rel = f.relative_to(out).parts
        if ".resume-" in f.name or (rel[0] == "cache" and len(rel) == 2):  # decoded data
            continue
        for k, v in tensor_digests(f).items():
            fp[f"{f.relative_to(out)}{k}"] = v
    (out / "fingerprint.json").write_text(json.dumps(fp, indent=0, sort_keys=True))
    print(f"{len(fp)} numbers and tensor digests -> {out / 'fingerprint.json'}")


def compare(a: Path, b: Path) -> int:
    fa, fb = (json.loads((d / "fingerprint.json").read_text()) for d in (a, b))
    differ = [k for k in fa if k in fb and fa[k] != fb[k]]
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    for k in differ:
        print(f"differs  {k}: {fa[k]} -> {fb[k]}")
    for k in only_a:
        print(f"only in {a}: {k}")
    for k in only_b:
        print(f"only in {b}: {k}")
    same = len(fa) - len(differ) - len(only_a)
    print(f"{same} identical, {len(differ)} different, {len(only_a)} only in {a}, "
          f"{len(only_b)} only in {b}")
    return 1 if differ or only_a else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        d = Path(sys.argv[2]).resolve()
        d.mkdir(parents=True, exist_ok=True)
        run(d, sys.argv[3:])
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)

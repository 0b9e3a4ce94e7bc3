"""Unlearning experiments (SalUn, Fan et al. ICLR 2024; the corrective paper, Goel et al.
TMLR 2024): SalUn DeepDive's main.py interface, driven by JSON experiment files.

Measured (`python main.py -L exp/quickstart.json -NL`; class 0 of a 5,000-image CIFAR-10
subset, SmallCNN, 3 seeds; 2-core x86-64 CPU, torch 2.14.1; 7 min 11 s for the whole
command): SalUn UA 98.96 ± 0.26, TA 63.80 ± 1.26 (retrain 66.58 ± 0.37), Avg. Gap 1.39 ±
0.61, at less than half the retraining time.

    python main.py -L exp/quickstart.json               # the quickstart table (CPU, minutes)
    python main.py -L exp/classforget.json --nexp 5     # every experiment x 5 seeds
    python main.py -M rl_split -UM -MT 0.5 -CF 3 -E 10 -LR 0.013 -c checkpoints/base.pt
    python main.py -L exp/table1_cifar10_random10.json --dry-run   # validate, show the plan
    python main.py -L exp/table1_classwise.json --launcher local      # one job per run, per GPU
    python main.py -L exp/table1_classwise.json --launcher slurm --slurm-partition gpu

A JSON file is a list of experiments (dicts), or {"defaults": {...}, "experiments": [...]}.
Each experiment names exactly one forget specifier: class_to_forget, unlearning_rate,
idxs_to_forget, or dataset_method (corrective unlearning: a manipulated training set, of
which the unlearner is handed deletion_size of the forget_set_size manipulated samples; the
manipulated model is trained once per configuration and seed and cached; see corrective.py
and the README's "Corrective unlearning"; the corrective README's flags --dataset_method,
--forget_set_size, --deletion_size, --pretrain_iters, --unlearn_method, --unlearn_iters, ...
are accepted too). `--nexp N` (or the key `nexp`) repeats it with seeds seed ... seed+N-1 (a
random forget set is drawn per seed). Without `checkpoint`, the base model the experiment
describes (`model`, `dataset`, `subset`, the `base` recipe) is trained once and cached; the
`retrain` reference (for Avg. Gap) is trained per seed on the retain set with the same
recipe and cached; both under CHECKPOINT_DIR, keyed by a hash of config, forget set and seed.
Flags given together with -L override the file's values in every experiment.

Results: one JSON line per run in RESULTS_DIR/main/<file stem>/runs.jsonl, per-experiment
mean +- std in summary.csv / summary.md (printed at the end). A run already recorded there
(same validated experiment, same seed) is skipped, so the same command after an interruption
does only the rest; a run whose loss or weights turn NaN is recorded as diverged (null
metrics) and counted in the summary's `diverged` column (docs/errors.md). All metrics in percent:
UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy (without the forgotten
class in class-wise forgetting), MIA = SalUn's MIA-efficacy (SVC on confidence), MIA_RF =
DeepDive's RandomForest loss MIA, gap = Avg. Gap to retrain over UA/RA/TA/MIA; time_s =
wall-clock seconds of the unlearning (mask included; the retrain row shows its training).

With --launcher local|slurm each run is a job (submitit: this machine's GPUs, or a Slurm job
array), the shared models trained first and once (file locks); the merge writes the same
runs.jsonl and tables; --status and --merge follow a launch (launcher.py, docs/launching.md).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import launcher
import unlearning
from cli import add_runtime_args, run_main, setup_runtime
from constants import UserError, results_dir
from experiments import raw_experiments, validate
from runner import Runner, plan_lines, run_list, write_summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-L", "--load", default="", help="JSON experiment file ('' = one experiment from flags)")
    p.add_argument("--nexp", type=int, default=None, help="runs per experiment (seeds seed..seed+N-1)")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan")
    p.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    p.add_argument("--out", default=None, help="results folder (default RESULTS_DIR/main/<file stem>)")
    e = p.add_argument_group("experiment (with -L: override every experiment of the file)")
    e.add_argument("-c", "--checkpoint", default=None)
    e.add_argument("-CF", "--class-to-forget", dest="class_to_forget", type=int, default=None)
    e.add_argument("-UL", "--unlearning-rate", dest="unlearning_rate", type=float, default=None)
    e.add_argument("-ITF", "--idxs-to-forget", dest="idxs_to_forget", default=None)
    e.add_argument("-E", "--epochs", type=int, default=None)
    e.add_argument("-M", "--method", "--unlearn_method", dest="method", default=None)
    e.add_argument("-UM", "--use-mask", dest="use_mask", action="store_const", const=True, default=None)
    e.add_argument("-MT", "--mask-thr", dest="mask_thr", type=float, default=None)
    e.add_argument("-LM", "--load-mask", dest="load_mask", default=None)
    e.add_argument("-LR", "--lr", "--unlearn_lr", dest="lr", type=float, default=None)
    e.add_argument("-T", "--tag", default=None)
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--model", default=None)
    e.add_argument("--dataset", default=None)
    e.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    e.add_argument("--subset", type=int, default=None)
    e.add_argument("--test-subset", dest="test_subset", type=int, default=None)
    e.add_argument("--mia-cap", dest="mia_cap", type=int, default=None)
    e.add_argument("--k", type=int, default=None, help="last k layers (CF-k / EU-k)")
    e.add_argument("--alpha", type=float, default=None, help="method weight (l1_sparse, iu, neggrad_plus, scrub)")
    c = p.add_argument_group("corrective unlearning (the corrective README's flags; JSON keys of the same names)")
    c.add_argument("--dataset_method", default=None, help="poisoning | interclasslabelswap | randomlabelswap")
    c.add_argument("--forget_set_size", type=int, default=None, help="|S_m|, manipulated samples")
    c.add_argument("--deletion_size", type=int, default=None, help="|S_f| <= |S_m| handed to the unlearner")
    c.add_argument("--patch_size", type=int, default=None, help="poisoning trigger side (default 3)")
    c.add_argument("--num_classes", type=int, default=None, help="checked against the dataset")
    c.add_argument("--pretrain_iters", type=int, default=None, help="iterations of the manipulated model")
    c.add_argument("--pretrain_lr", type=float, default=None)
    c.add_argument("--unlearn_iters", "--steps", dest="steps", type=int, default=None,
                   help="unlearning iteration budget (overrides epochs)")
    c.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=None)
    c.add_argument("--kd_T", type=float, default=None, help="scrub temperature")
    c.add_argument("--msteps", type=int, default=None, help="scrub max-step budget")
    c.add_argument("--SSDdampening", type=float, default=None, help="ssd lambda")
    c.add_argument("--SSDselectwt", type=float, default=None, help="ssd alpha")
    add_runtime_args(p)
    launcher.add_args(p)
    return p


FLAG_KEYS = ("checkpoint", "class_to_forget", "unlearning_rate", "idxs_to_forget", "epochs", "method",
             "use_mask", "mask_thr", "load_mask", "lr", "tag", "seed", "model", "dataset", "batch_size",
             "subset", "test_subset", "mia_cap", "k", "alpha", "dataset_method", "forget_set_size",
             "deletion_size", "patch_size", "num_classes", "pretrain_iters", "pretrain_lr", "steps",
             "weight_decay", "kd_T", "msteps", "SSDdampening", "SSDselectwt")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_methods:
        print(unlearning.method_help())
        return 0
    if args.nexp is not None and args.nexp <= 0:
        raise UserError("--nexp must be positive")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("main.py does not run under torchrun: its runs are independent jobs, "
                        "use --launcher local (docs/launching.md); torchrun is for train.py's DDP")
    launcher.check_args(args)
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    raw, stem, base_dir = raw_experiments(args.load, flags)
    exps = []
    for where, r in raw:
        exp = validate(r, where, base_dir)
        if args.nexp is not None:
            exp.nexp = args.nexp
        exps.append(exp)
    out_dir = Path(args.out) if args.out else results_dir() / "main" / stem
    if args.status:
        print("\n".join(launcher.status_lines(exps, out_dir)))
        return 0
    if args.merge:
        launcher.merge_and_report(exps, out_dir, stem)
        return 0
    print(f"{len(exps)} experiment(s), {sum(e.nexp for e in exps)} run(s) -> {out_dir}")
    for line in plan_lines(exps, Runner(torch.device("cpu"), out_dir, None)):
        print(line)
    if args.launcher:
        return launcher.launch(args, exps, out_dir, stem)
    if args.dry_run:
        print("dry run: everything validated, nothing run")
        return 0
    device = setup_runtime(args)
    runner = Runner(device, out_dir, args.amp)
    records, runs_file = run_list(exps, runner, source=stem, log=not args.no_log,
                                  wandb_project=args.wandb_project)
    md = write_summary(records, out_dir)
    print(f"\n{stem}: {len(records)} run(s) on {device}; mean ± std over seeds (results: {runs_file})\n")
    print(md)
    return 0


if __name__ == "__main__":
    run_main(main)

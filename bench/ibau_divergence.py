"""Where does an I-BAU round on one device part from the same round on another? On an H200 the
release CIFAR-10 model kept ~90 % held-out ASR at defense.py's defaults, where a CPU removes
the backdoor in round 1 (docs/ibau.md "On a GPU"); rounding alone does not explain it
(bench/ibau_precision.py). This runs the same rounds, from the same model, clean images,
batches and perturbed images (CPU generators), on each of two devices of one machine, and
compares them stage by stage:

  δ        the universal perturbation of round 1: its norm, the share of the clean images
           (target class left out) it sends to the backdoor's target under the *original*
           model on the CPU (so the figure is δ's, not the device's: a δ that found the
           trigger sends most of them there), and its cosine with the first device's δ
  steps    after outer steps 1, 5, 10, 25 and at the end of every round: the cosine of the
           two devices' hypergradients (the outer step's gradient, before Adam) and of their
           updates so far (θ − θ_0). These part under rounding alone: on the CPU one-ulp
           moves (--reorder) leave δ at cosine 0.997, and the first hypergradient, amplifying
           that small difference of δ, at 0.10 (the first update at 0.55), and yet every such
           run removes the backdoor (docs/ibau.md). So read a pair of devices against
           --reorder's figures, not against 1
  step 1   the first outer step's hypergradient recomputed from the original weights and the
           first run's δ on every device (this stage alone, from the same inputs): its direct
           term ∇θ L_outer and its implicit term (∂Φ/∂θ)ᵀv, their norms and cosines with
           the first run's, and the Neumann iterates' norms ‖v_k‖. Under one-ulp moves both
           cosines are 1.0000: here a device that computes something else shows at once
  outcome  ACC, ASR and R-Acc on the held-out images after the last round (defense.py's
           evaluation, on each device)

--plain-layers adds a third run on the first device through the model's own layers instead of
ibau.fast_double_backward's (the same function): a check on those layers on that device.
--reorder SEED runs the second device with every convolution and linear result moved by about
one ulp (bench/ibau_precision.py's habit): what rounding alone does to these figures, the
yardstick for two devices that part.

defense.py's model, clean-data and I-BAU flags go after `--` and mean what they mean there,
defaults included (its other flags are refused: the devices come from --devices):

    python bench/ibau_divergence.py --devices cuda cpu --plain-layers --json $OUT/div.json -- \\
        --poi-path ../shared/data/ibau_release/badnets_8_02_ckpt.pth --n-rounds 1
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import backdoor_defense as bd  # noqa: E402
import defense  # noqa: E402
import ibau  # noqa: E402
from constants import UserError  # noqa: E402
from models import expects_normalized  # noqa: E402
from reporting import markdown_table, write_json  # noqa: E402

# defense.py's flags this reads (through load_poisoned, choose_data and defense.ibau_config)
READ = {"poi_path", "dataset", "model", "method", "seed", "data_seed", "unl_set", "n_clean", "n_eval",
        "batch_size", "optim", "lr", "n_rounds", "lr_half_life", "K", "radius", "projection", "clamp",
        "delta_space", "delta_optim", "delta_lr", "perturb_frac", "min_perturbed", "attack", "trigger_file",
        "target", "threads",
        "no_log"}  # -NL: nothing is logged here anyway
FOLLOWED_STEPS = (1, 5, 10, 25)  # outer steps of round 1 whose gradients and weights are compared


def rounding(reorder: int | None):
    """bench/ibau_precision.py's one-ulp moves drawn from `reorder`, or nothing."""
    if reorder is None:
        return contextlib.nullcontext()
    spec = importlib.util.spec_from_file_location("ibau_precision", Path(__file__).with_name("ibau_precision.py"))
    habits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(habits)
    return habits.gpu_habits(reorder=reorder)


def flat_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


def flat_grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                      for p in model.parameters()])


def one_run(model0, model_name: str, data: bd.DefenceData, attack: dict, cfg: bd.IBAUConfig, *,
            seed: int, device: torch.device, fast_layers: bool = True) -> dict:
    """cfg.rounds rounds on a copy of model0 on `device`: round 1's δ, the hypergradients and
    weights at the followed steps and rounds' ends, the held-out figures after the last round,
    the seconds."""
    model = copy.deepcopy(model0).to(device)
    run = bd.ibau_setup(model, model_name, data.split, data.clean_idx, cfg, seed=seed)
    per_round = len(run.batches)
    weights, grads, deltas, done = {}, {}, [], {"steps": 0}  # done: outer steps of the rounds before

    def on_step(i, delta):
        step = done["steps"] + i + 1
        if step in FOLLOWED_STEPS or (i + 1) == per_round:
            weights[step], grads[step] = flat_weights(model), flat_grads(model)

    seconds = 0.0
    for r in range(cfg.rounds):
        done["steps"] = r * per_round
        bd.sync(model)
        t0 = time.perf_counter()
        out = bd.ibau_round(run, on_step=on_step, fast_layers=fast_layers)
        bd.sync(model)
        seconds += time.perf_counter() - t0
        deltas.append(out["delta"].detach().cpu())
    evaluate = bd.Evaluator(data.test, data.eval_idx, data.split, data.clean_idx, attack,
                            normalize=expects_normalized(model_name), device=device)
    return {"delta": deltas[0], "weights": weights, "grads": grads, "outcome": evaluate(model), "seconds": seconds}


def first_step(model0, model_name: str, data: bd.DefenceData, cfg: bd.IBAUConfig, delta: torch.Tensor, *,
               seed: int, device: torch.device, fast_layers: bool = True) -> dict:
    """The first outer step's hypergradient from model0's weights and the given δ (the first
    run's, so every device starts this stage from the same inputs), split into its direct
    term ∇θ L_outer and its implicit term (∂Φ/∂θ)ᵀv, with the Neumann iterates' norms ‖v_k‖
    (on the release CIFAR-10 model at the defaults they grow: the series does not converge)."""
    model = copy.deepcopy(model0).to(device)
    run = bd.ibau_setup(model, model_name, data.split, data.clean_idx, cfg, seed=seed)
    opts, batch = run.options, run.batches[0]
    run.net.eval()
    parts = {}
    with bd.full_float32(), (ibau.fast_double_backward(run.net) if fast_layers else contextlib.nullcontext()):
        fp_map = ibau.make_inner_map(run.net, batch[0], batch[1], clamp=opts["clamp"])
        hparams = [p for p in run.net.parameters() if p.requires_grad]
        chosen = ibau.random_subset(len(batch[0]), opts["perturb_frac"], run.generator, opts["min_perturbed"])
        ibau.outer_gradient(run.net, delta.to(device), batch, chosen, fp_map, hparams, opts["K"], opts["clamp"],
                            parts=parts)
    direct = torch.cat([g.float().reshape(-1).cpu() for g in parts["direct"]])
    full = torch.cat([p.grad.float().reshape(-1).cpu() for p in hparams])
    return {"direct": direct, "implicit": full - direct, "v_norms": parts["v_norms"]}


@torch.no_grad()
def target_share(model0, model_name: str, data: bd.DefenceData, cfg: bd.IBAUConfig, delta: torch.Tensor,
                 target: int | None, seed: int) -> float | None:
    """% of the clean images outside the target class that model0 (on the CPU) puts in the
    target class once δ is added: how much of the trigger δ found."""
    if target is None:
        return None
    net, normalized, clamp = bd.ibau_view(model0, model_name, data.split, cfg.delta_space, cfg.clamp)
    net.eval()
    hits = total = 0
    for batch in bd.clean_loader(data.split, data.clean_idx, batch_size=500, seed=seed, device="cpu",
                                 normalize=normalized):
        keep = batch.y != target
        pred = net(ibau._perturb(batch.x[keep], delta, clamp)).argmax(1)
        hits, total = hits + int((pred == target).sum()), total + int(keep.sum())
    return 100.0 * hits / max(total, 1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1).double(), b.reshape(1, -1).double()))


def compare(runs: dict, theta0: torch.Tensor, first: str, share: dict) -> dict:
    """The figures of every run against the first one's."""
    a = runs[first]
    out = {}
    for name, run in runs.items():
        steps = sorted(run["weights"])
        hypergradient = {s: cosine(run["grads"][s], a["grads"][s]) for s in steps}
        update = {s: cosine(run["weights"][s] - theta0, a["weights"][s] - theta0) for s in steps}
        f, fa = run["first_step"], a["first_step"]
        first_step_figures = {"direct_norm": float(f["direct"].norm()), "implicit_norm": float(f["implicit"].norm()),
                              "v_norms": f["v_norms"], "direct_cosine": cosine(f["direct"], fa["direct"]),
                              "implicit_cosine": cosine(f["implicit"], fa["implicit"])}
        out[name] = {"device": run["device"], "fast_layers": run["fast_layers"], "seconds": run["seconds"],
                     "first_step": first_step_figures,
                     "delta_l2": float(run["delta"].norm()), "delta_to_target": share[name],
                     "delta_cosine": cosine(run["delta"], a["delta"]),
                     "hypergradient_cosine": hypergradient, "update_cosine": update, **run["outcome"]}
    return out


def render(figures: dict, first: str) -> str:
    rows = [{"run": name, "seconds": f"{f['seconds']:.1f}", "‖δ‖₂": f"{f['delta_l2']:.2f}",
             "δ → target (%)": "-" if f["delta_to_target"] is None else f"{f['delta_to_target']:.1f}",
             f"δ cosine with {first}": f"{f['delta_cosine']:.4f}",
             "ACC": f"{f['acc']:.2f}", "ASR": f"{f['asr']:.2f}", "R-Acc": f"{f['racc']:.2f}"}
            for name, f in figures.items()]
    steps = sorted(next(iter(figures.values()))["update_cosine"])
    by_step = [{"run": name, "cosine with " + first: what,
                **{f"step {s}": f"{f[key][s]:.4f}" for s in steps}}
               for name, f in figures.items() if name != first
               for what, key in (("hypergradient", "hypergradient_cosine"), ("update θ − θ₀", "update_cosine"))]
    text = markdown_table(rows, list(rows[0]))
    first_rows = [{"run": name, "‖direct‖": f"{f['first_step']['direct_norm']:.4g}",
                   "‖implicit‖": f"{f['first_step']['implicit_norm']:.4g}",
                   "Neumann ‖v_k‖": " / ".join(f"{v:.3g}" for v in f["first_step"]["v_norms"]),
                   f"direct cosine with {first}": f"{f['first_step']['direct_cosine']:.4f}",
                   f"implicit cosine with {first}": f"{f['first_step']['implicit_cosine']:.4f}"}
                  for name, f in figures.items()]
    text = text.rstrip("\n") + (f"\n\nThe first outer step's hypergradient from the same weights and {first}'s δ: "
                                 "its direct term ∇θ L_outer and its implicit term (∂Φ/∂θ)ᵀv:\n\n"
                                 + markdown_table(first_rows, list(first_rows[0])))
    if by_step:
        text = text.rstrip("\n") + ("\n\nBy outer step, against " + first + "'s:\n\n"
                                     + markdown_table(by_step, list(by_step[0])))
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", nargs=2, default=["cuda", "cpu"], metavar=("FIRST", "SECOND"))
    p.add_argument("--plain-layers", action="store_true",
                   help="also run on the first device without fast_double_backward's layers")
    p.add_argument("--reorder", type=int, default=None, metavar="SEED",
                   help="the second run with results moved by about an ulp (rounding alone)")
    p.add_argument("--json", default=None, help="write every figure here")
    args = p.parse_args(ours)
    if not rest:
        raise UserError("give defense.py's flags after `--`, e.g. -- --poi-path MODEL --n-rounds 1 -NL")
    if any(a == "--device" or a.startswith("--device=") for a in rest):
        raise UserError("the devices come from --devices (before `--`), not defense.py's --device")
    parser = defense.build_parser()
    dargs = parser.parse_args(rest)
    defaults = vars(parser.parse_args(["--poi-path", dargs.poi_path]))
    unread = sorted(k for k, v in vars(dargs).items() if k not in READ and v != defaults[k])
    if unread:
        raise UserError(f"defense.py's {', '.join('--' + k.replace('_', '-') for k in unread)} "
                        "not used here: drop it (this runs I-BAU rounds and writes only --json)")
    defense.check_args(dargs)
    if dargs.method != "ibau":
        raise UserError("this compares I-BAU rounds: drop --method")
    devices = [torch.device(d) for d in args.devices]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise UserError("--devices names cuda but no GPU is visible: use --devices cpu cpu on a CPU")
    torch.set_flush_denormal(True)  # as defense.py: before torch's worker threads start
    if dargs.threads:
        torch.set_num_threads(dargs.threads)
    torch.manual_seed(dargs.seed)
    poisoned = bd.load_poisoned(Path(dargs.poi_path).expanduser(), torch.device("cpu"), model_name=dargs.model,
                                dataset=dargs.dataset, attack=dargs.attack, trigger_file=dargs.trigger_file,
                                target=dargs.target)
    data = bd.choose_data(poisoned.dataset, poisoned.model.head.out_features, source=dargs.unl_set,
                          n_clean=dargs.n_clean, seed=defense.data_seed(dargs), n_eval=dargs.n_eval)
    cfg = defense.ibau_config(dargs)
    second = f"{devices[1]}" + (f" moved by an ulp (--reorder {args.reorder})" if args.reorder is not None
                                else " again" if devices[1] == devices[0] else "")
    plan = [(f"{devices[0]}", devices[0], True, None), (second, devices[1], True, args.reorder)]
    if args.plain_layers:
        plan.append((f"{devices[0]} plain layers", devices[0], False, None))
    runs = {}
    for name, device, fast, reorder in plan:
        print(f"{name}: {cfg.rounds} round(s) of I-BAU...", flush=True)
        with rounding(reorder):
            runs[name] = {**one_run(poisoned.model, poisoned.model_name, data, poisoned.attack, cfg,
                                    seed=dargs.seed, device=device, fast_layers=fast),
                          "device": str(device), "fast_layers": fast}
            runs[name]["first_step"] = first_step(poisoned.model, poisoned.model_name, data, cfg,
                                                  runs[plan[0][0]]["delta"], seed=dargs.seed, device=device,
                                                  fast_layers=fast)
    target = poisoned.attack.get("target") if poisoned.attack.get("mode") != "all2all" else None
    share = {name: target_share(poisoned.model, poisoned.model_name, data, cfg, run["delta"], target, dargs.seed)
             for name, run in runs.items()}
    first = plan[0][0]
    figures = compare(runs, flat_weights(poisoned.model), first, share)
    before = bd.Evaluator(data.test, data.eval_idx, data.split, data.clean_idx, poisoned.attack,
                          normalize=expects_normalized(poisoned.model_name), device="cpu")(poisoned.model)
    markdown = (f"I-BAU, {cfg.rounds} round(s), seed {dargs.seed}, {len(data.clean_idx)} clean images, "
                f"{poisoned.model_name} from {Path(dargs.poi_path).name}; before (on the CPU): ACC "
                f"{before['acc']:.2f}, ASR {before['asr']:.2f}, R-Acc {before['racc']:.2f}.\n\n"
                + render(figures, first))
    print(markdown)
    if args.json:
        write_json(Path(args.json), {"config": vars(dargs), "devices": args.devices, "torch": torch.__version__,
                                     "before": before, "runs": figures, "markdown": markdown})
    return 0


if __name__ == "__main__":
    from cli import run_main

    run_main(main)

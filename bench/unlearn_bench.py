"""One unlearning method's wall-clock time against `retrain` (training from scratch on the retain
set with the base model's recipe) on the same data, model and device.

Default: the README quickstart setting (SmallCNN, a 5,000-image CIFAR-10 subset, forget class
0; base and retrain: 12 epochs SGD lr 0.1 cosine, batch 128, no augmentation; FT: 5 epochs lr
0.02; SalUn: saliency mask at 0.5 plus 5 epochs lr 0.03). The base model is trained first (not
timed); each method starts from a copy of it. Times include SalUn's mask; no evaluation.

    python bench/unlearn_bench.py                           # ft and salun against retrain
    python bench/unlearn_bench.py --model resnet18 --subset 0 --base-epochs 182   # a GPU
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import engine  # noqa: E402
import methods  # noqa: E402
import unlearning  # noqa: E402
from saliency import saliency_mask  # noqa: E402
import metrics as MX  # noqa: E402
from cli import add_runtime_args, run_main, setup_runtime  # noqa: E402
from reporting import write_json  # noqa: E402
from constants import results_dir  # noqa: E402
from training import DataSpec, make_loader, prepare_data, test_indices_without_class  # noqa: E402

# method -> (lr, epochs, mask threshold or None): the quickstart's validated settings
SETTINGS = {"ft": (0.02, 5, None), "ga": (0.0005, 3, None), "rl": (0.03, 5, None),
            "salun": (0.03, 5, 0.5)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ft", "salun"], choices=list(SETTINGS))
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--subset", type=int, default=5000, help="class-balanced training subset (0: all)")
    p.add_argument("--class-to-forget", type=int, default=0)
    p.add_argument("--base-epochs", type=int, default=12, help="epochs of the base and retrain recipe")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--json", default=None, help="default RESULTS_DIR/bench/unlearn_bench.json")
    add_runtime_args(p)
    args = p.parse_args(argv)
    device = setup_runtime(args)
    subset = args.subset or None
    full = prepare_data(DataSpec(args.dataset, subset, 0.1, 0))
    data = prepare_data(DataSpec(args.dataset, subset, 0.1, 0, cf=args.class_to_forget))
    recipe = engine.TrainConfig(epochs=args.base_epochs, lr=0.1, schedule="cosine",
                                batch_size=args.batch_size, augment=False, amp=args.amp)
    test = make_loader(data, "test", test_indices_without_class(data.test, args.class_to_forget),
                       model_name=args.model, batch_size=1024, device=device)
    forget = make_loader(data, "train", data.forget_idx, model_name=args.model, batch_size=1024, device=device)

    def accs(model):
        return {"UA": 100 - engine.accuracy_on(model, forget, args.amp), "TA": engine.accuracy_on(model, test, args.amp)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with MX.timer(device) as t:
            base, _ = methods.train_from_scratch(args.model, full, recipe, device=device, seed=0,
                                                 ckpt_path=Path(tmp) / "base.pt", test_eval=False)
        rows.append({"method": "base (not compared)", "seconds": t.seconds, **accs(base)})
        def setup(mask=None, params=None, **train):
            cfg = dataclasses.replace(unlearning.UNLEARN_DEFAULTS, batch_size=args.batch_size,
                                      augment=False, amp=args.amp, **train)
            return unlearning.Setup(data=data, model_name=args.model, device=device, seed=0,
                                    train=cfg, base=recipe, mask=mask, params=params or {})
        with MX.timer(device) as t:
            model, _ = methods.retrain_from_scratch(setup(params={"k": -1}))
        retrain = t.seconds
        rows.append({"method": "retrain", "seconds": retrain, **accs(model)})
        for name in args.methods:
            lr, epochs, thr = SETTINGS[name]
            model = copy.deepcopy(base)
            with MX.timer(device) as t:
                s = setup(lr=lr, epochs=epochs)
                mask = saliency_mask(model, unlearning.forget_loader(s, salt=7), thr) if thr else None
                model = unlearning.unlearn(model, name, setup(lr=lr, epochs=epochs, mask=mask))
            rows.append({"method": name, "seconds": t.seconds, "retrain_over_method": retrain / t.seconds,
                         **accs(model)})
    import torchvision

    header = (f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores), torch {torch.__version__}, torchvision {torchvision.__version__}, "
              f"threads {torch.get_num_threads()}; {args.model} on {args.dataset}"
              f"{f' subset {subset}' if subset else ''}, forget class {args.class_to_forget} "
              f"({len(data.forget_idx)} forget, {len(data.retain_idx)} retain), base/retrain {args.base_epochs} epochs")
    print("\n" + header)
    for r in rows:
        ratio = f"   retrain takes {r['retrain_over_method']:.1f}x as long" if "retrain_over_method" in r else ""
        print(f"{r['method']:<20} {r['seconds']:8.2f} s   UA {r['UA']:6.2f}  TA {r['TA']:6.2f}{ratio}")
    out = Path(args.json) if args.json else results_dir() / "bench" / "unlearn_bench.json"
    write_json(out, {"header": header, "rows": rows, "argv": sys.argv[1:] if argv is None else list(argv)})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    run_main(main)

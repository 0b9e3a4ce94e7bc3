"""What every script shares: the error wrapper, common flags, device choice, wandb."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable

import torch

from constants import UserError
from storage import NO_SPACE


def run_main(main: Callable[[list[str] | None], int | None], argv=None) -> None:
    """Run a script's main; a UserError becomes one line on stderr and exit status 2, and so
    does a full disk met by a writer other than storage.py's (a figure, a library's file)."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        print(f"error: no space left on the disk for {e.filename or 'a file'}; free some space "
              "there and run again", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--amp", dest="amp", action="store_true", default=None,
                   help="bf16 autocast (default: on for CUDA, off for CPU)")
    g.add_argument("--no-amp", dest="amp", action="store_false", help="full fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    g.add_argument("-NL", "--no-log", action="store_true", help="disable wandb logging")
    g.add_argument("--wandb-project", default="unlearnbench", help="wandb project name")


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def setup_runtime(args) -> torch.device:
    """Threads, device, and (under torchrun) the process group; returns this rank's device."""
    import distributed

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return distributed.init_from_env(resolve_device(getattr(args, "device", None)))


class RunLogger:
    """wandb when enabled. WANDB_MODE (environment or .env) is obeyed as given: `offline` or
    `disabled` never goes online, whatever key is set. Without it: online with a key
    (WANDB_API_KEY, or WANDB_SECRET from .env), giving up after INIT_TIMEOUT_S seconds
    without a network, then offline; offline without a key. Any wandb failure degrades to a
    warning, never a crash; the key is never printed."""

    INIT_TIMEOUT_S = 10  # wandb waits 90 s by default: a minute per run without a network

    def __init__(self, enabled: bool, project: str, name: str, config: dict):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except Exception as e:  # no package: keep training
            warnings.warn(f"wandb disabled ({type(e).__name__}); pass -NL to silence this")
            return
        for mode in self.modes():  # a bad key or no network falls back to offline logging
            try:
                self.run = wandb.init(project=project, name=name, config=config, mode=mode,
                                      reinit="finish_previous",
                                      settings=wandb.Settings(init_timeout=self.INIT_TIMEOUT_S))
                return
            except Exception as e:
                warnings.warn(f"wandb {mode} failed ({type(e).__name__}); "
                              + ("trying offline" if mode == "online" else "logging disabled"))

    @staticmethod
    def modes() -> list[str]:
        """The modes to try, in order. The key reaches wandb (through the environment, never
        an argument) only when the online mode is tried."""
        asked = os.environ.get("WANDB_MODE", "").strip().lower()
        if asked not in ("", "online"):
            return [asked]  # offline, disabled: as the user said
        key = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_SECRET")
        if key:
            os.environ["WANDB_API_KEY"] = key
        return ["online", "offline"] if key or asked else ["offline"]

    def log(self, data: dict) -> None:
        if self.run is not None:
            try:
                self.run.log(data)
            except Exception:
                pass

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass

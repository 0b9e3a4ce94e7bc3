import sys

import pytest

import cli
from constants import UserError


def test_wandb_logs_offline_without_a_key(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # optional: the GPU image has none (test_missing_wandb_never_crashes)
    for var in ("WANDB_API_KEY", "WANDB_SECRET", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = cli.RunLogger(True, "test", "run", {"lr": 0.1})
    assert logger.run is not None and logger.run.settings.mode == "offline"
    logger.log({"acc": 1.0})
    logger.finish()
    assert list(tmp_path.glob("wandb/offline-run-*"))


def test_missing_wandb_never_crashes(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.warns(UserWarning, match="wandb disabled"):
        logger = cli.RunLogger(True, "test", "run", {})
    logger.log({"x": 1})
    logger.finish()
    assert cli.RunLogger(False, "test", "run", {}).run is None  # -NL


def test_user_errors_exit_2_with_one_line(capsys):
    def main(argv):
        raise UserError("bad thing; do this instead")

    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: bad thing; do this instead\n"

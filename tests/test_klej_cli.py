"""python -m klej's argument checks, and the same checks in FinetuneConfig for callers of the Python API.

A number that makes no sense must be refused where it is given, naming the flag (or field): left to run, batch size
0 divided by zero when the steps were counted, and 0 dev evaluations per epoch trained to the end, saved no best
weights, and then failed to find them.
"""
import re

import pytest

from klej import finetune as ft
from klej.__main__ import parse_args

FINETUNE = ["finetune", "--task", "cdsc-e", "--data-dir", "d", "--model", "m"]


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "must be at least 1, got 0"),
    ("--batch-size", "0", "must be at least 1, got 0"),
    ("--evals-per-epoch", "0", "must be at least 1, got 0"),
    ("--patience", "0", "must be at least 1, got 0"),
    ("--max-len", "1", "must be at least 2, got 1"),
    ("--batch-size", "2.5", "'2.5' is not an integer"),
    ("--lr", "0", "must be positive, got 0"),
    ("--lr", "-1e-4", "must be positive, got -1e-4"),
    ("--lr", "nan", "must be positive, got nan"),
])
def test_bad_numbers_are_refused_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args([*FINETUNE, f"{flag}={value}"])
    assert exit_.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_good_numbers_pass_and_help_shows_the_defaults(capsys):
    args = parse_args([*FINETUNE, "--epochs", "1", "--batch-size", "1", "--max-len", "2", "--patience", "1",
                       "--evals-per-epoch", "1", "--lr", "3e-4"])
    assert (args.epochs, args.batch_size, args.max_len, args.patience, args.evals_per_epoch, args.lr) == \
        (1, 1, 2, 1, 1, 3e-4)
    with pytest.raises(SystemExit):
        parse_args(["finetune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())           # argparse wraps lines anywhere
    defaults = ft.FinetuneConfig()
    for flag, value in (("--batch-size", defaults.batch_size), ("--max-len", defaults.max_len),
                        ("--patience", defaults.patience), ("--lr", defaults.lr)):
        # The flag's line in the options list: "--lr LR peak learning rate, after warm-up (default: 0.0001)".
        assert re.search(rf"{flag} [A-Z_]+ [^()]*\(default: {value}\)", help_text), flag


@pytest.mark.parametrize("command", ["results", "submit"])
def test_commands_that_load_no_model_take_no_device(command, capsys):
    assert not hasattr(parse_args([command]), "device")
    with pytest.raises(SystemExit):
        parse_args([command, "--device", "cpu"])
    assert "unrecognized arguments: --device" in capsys.readouterr().err


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "batch_size=0, must be at least 1"),
    ("evals_per_epoch", 0, "evals_per_epoch=0, must be at least 1"),
    ("patience", 0, "patience=0, must be at least 1"),
    ("max_len", 1, "max_len=1, must be at least 2"),
    ("epochs", 0, "epochs=0, must be at least 1"),
    ("lr", 0.0, "lr=0.0, must be positive"),
])
def test_finetune_config_refuses_what_the_cli_refuses(field, value, message):
    with pytest.raises(ValueError, match=f"FinetuneConfig: {message}"):
        ft.FinetuneConfig(**{field: value})
    ft.FinetuneConfig(epochs=None)                    # None: the task's own number of epochs

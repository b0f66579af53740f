"""Command-line conventions: boolean spellings, one-line errors, device choice."""
import argparse
import sys

import pytest

from utils.cli import UserError, add_bool, resolve_device, run_main, str2bool


@pytest.mark.parametrize("spelling", ["True", "true", "TRUE", "yes", "Yes", "1", "y", "on"])
def test_true_spellings(spelling):
    assert str2bool(spelling) is True


@pytest.mark.parametrize("spelling", ["False", "false", "FALSE", "no", "NO", "0", "n", "off"])
def test_false_spellings(spelling):
    assert str2bool(spelling) is False


def test_bool_option_bare_flag_default_and_bad_value(capsys):
    parser = argparse.ArgumentParser()
    add_bool(parser, "--flag", default=False)
    add_bool(parser, "--other", default=True)
    assert parser.parse_args([]).flag is False and parser.parse_args([]).other is True
    assert parser.parse_args(["--flag"]).flag is True
    assert parser.parse_args(["--flag", "no", "--other", "False"]).flag is False
    assert parser.parse_args(["--other", "0"]).other is False
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--flag", "maybe"])
    assert exit_info.value.code == 2 and "expected a boolean" in capsys.readouterr().err


def test_run_main_turns_user_error_into_one_line(capsys):
    def failing(argv):
        raise UserError("checkpoint not found: x.pth\n")

    with pytest.raises(SystemExit) as exit_info:
        run_main(failing, [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: checkpoint not found: x.pth")


def test_run_main_keeps_only_the_message_of_a_worker_reraised_error(capsys):
    def failing(argv):
        raise UserError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                        "call last):\n  File \"x.py\", line 1\nutils.data.DatasetError: cannot read image a.png")

    with pytest.raises(SystemExit):
        run_main(failing, [])
    err = capsys.readouterr().err.strip()
    assert err.endswith("error: cannot read image a.png") and len(err.splitlines()) == 1


def test_unexpected_errors_keep_their_traceback():
    def broken(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_main(broken, [])


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="unknown --device"):
        resolve_device("tpu")


def test_progress_bars_only_on_a_terminal_and_never_with_quiet(monkeypatch):
    from utils.cli import progress_enabled, set_quiet

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    set_quiet(False)
    assert progress_enabled() and not progress_enabled(False)
    set_quiet(True)
    assert not progress_enabled()
    set_quiet(False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress_enabled()


def test_options_from_builds_nested_frozen_specs_from_a_command_line():
    import dataclasses

    from utils.cli import options_from
    from utils.model import Tiling

    @dataclasses.dataclass(frozen=True)
    class Spec:
        name: str
        sizes: tuple
        tiling: Tiling
        kept: int = 7

    spec = options_from(Spec, {"name": "a", "sizes": [1, 2], "tile": 64, "stride": 48, "unrelated": 1}, kept=3)
    assert spec == Spec("a", (1, 2), Tiling(64, 48, 1), 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "b"
    with pytest.raises(UserError, match="--stride"):  # the nested spec checks its values when it is made
        options_from(Spec, {"name": "a", "sizes": [], "tile": 64, "stride": 80})
    with pytest.raises(TypeError):  # a field without an option and without a default is a bug, found at once
        options_from(Spec, {"sizes": []})

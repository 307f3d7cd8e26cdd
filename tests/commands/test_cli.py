import json
import subprocess
import sys

import pytest

from nanogpt.cli import COMMANDS, main
from nanogpt.errors import UserError
from tests.card import CARD_TRAINING_CONFIGURATION, CARD_TREE


def test_info_card_prints_tree_counts_and_memory(capsys):
    assert main(["info", "--preset", "card"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(CARD_TREE)
    assert "52,990,464" in out and "33,691,776" in out
    assert "fp32: 202.1 MiB" in out and "fp16: 101.1 MiB" in out  # the card's 202.1 MB / 101.1 MB rows


def test_info_loads_the_cards_json_block(tmp_path, capsys):
    p = tmp_path / "card.json"
    p.write_text(json.dumps(CARD_TRAINING_CONFIGURATION))
    assert main(["info", "--config", str(p)]) == 0
    assert "52,990,464" in capsys.readouterr().out


def test_user_error_is_one_line_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"d_model": 64, "n_heads": 4, "dmodel": 3}))
    assert main(["info", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanogpt info: error: unknown key 'dmodel'") and err.count("\n") == 1
    with pytest.raises(UserError):  # --debug shows the real exception instead
        main(["--debug", "info", "--config", str(p)])


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_console_script_runs_in_a_fresh_process():
    r = subprocess.run(
        [sys.executable, "-m", "nanogpt.cli", "info", "--preset", "tiny"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "7,242,624 unique" in r.stdout

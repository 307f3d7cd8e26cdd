"""The newcomer's path: the repository stands alone, one install story, figures that agree, helpful --help.

A clone has only what is tracked, so every link in the docs must land inside it; the card's configuration
ships as a file; every "install this extra" hint is the README's own command; the README's figures agree
with each other and with `docs/`; every command's `--help` runs and shows its defaults.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from nanogpt import cli
from nanogpt.config import preset
from nanogpt.errors import ArgumentParser, install_command
from tests.card import CARD_TRAINING_CONFIGURATION
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "nanogpt"
README = REPO / "README.md"
CARD_JSON = REPO / "configs" / "card.json"
WEB_SCHEMES = ("http://", "https://", "mailto:")


# ---- links ------------------------------------------------------------------------------------------


def markdown_files() -> list[Path]:
    found = [README, *sorted((REPO / "docs").rglob("*.md")), *sorted(SRC.rglob("*.md"))]
    return [p for p in found if p.is_file()]


def strip_code(text: str) -> str:
    """Markdown without fenced blocks, and inline code spans reduced to a word (links around them stay)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "code", text)


def links(text: str) -> list[str]:
    """Targets of inline links/images `[text](target "title")` and reference definitions `[id]: target`."""
    body = strip_code(text)
    inline = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", body)
    refs = re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", body, flags=re.M)
    return inline + refs


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces as hyphens."""
    out = set()
    for line in strip_code(text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("code", "").lower()).strip()
            out.add(slug.replace(" ", "-"))
    return out


def link_problem(target: str, page: Path, root: Path) -> str | None:
    """Why `target`, linked from `page`, does not land inside `root`; None when it does."""
    if target.startswith(WEB_SCHEMES):
        return None  # a web address works from any clone
    if re.match(r"^[A-Za-z][\w+.-]*:", target):
        return "a non-web URL scheme"
    path, _, anchor = target.partition("#")
    if not path:
        return None if anchor in anchors(page.read_text()) else f"no heading #{anchor} in {page.name}"
    if path.startswith("/"):
        return "an absolute path"
    dest = (page.parent / unquote(path)).resolve()
    if not dest.is_relative_to(root.resolve()):
        return "a path outside the repository"
    if not dest.exists():
        return "a file that does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
        return f"no heading #{anchor} in {dest.name}"
    return None


def test_link_checker_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Deep dive\n")
    page = tmp_path / "a.md"
    page.write_text("# Top part\n")
    text = (
        "[ok](docs/b.md) [ok](docs/b.md#deep-dive) [ok](#top-part) [ok](https://example.org) "
        "[`out`](../shared/x.md) [gone](docs/c.md) [abs](/etc/passwd) [bad](#nowhere) "
        "![img](file:///tmp/x.png)\n```\n[in code](../ignored.md)\n```\n`[inline](../ignored.md)`\n"
    )
    problems = [link_problem(t, page, tmp_path) for t in links(text)]
    assert problems[:4] == [None] * 4
    assert problems[4:] == [
        "a path outside the repository",
        "a file that does not exist",
        "an absolute path",
        "no heading #nowhere in a.md",
        "a non-web URL scheme",
    ]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_links_stay_in_the_repository(page):
    bad = [(t, why) for t in links(page.read_text()) if (why := link_problem(t, page, REPO))]
    assert not bad, f"{page.relative_to(REPO)}: links that leave the repository or lead nowhere: {bad}"


def test_no_page_points_at_the_workspace_copy_of_the_card():
    for page in markdown_files():
        assert "shared/reference" not in page.read_text(), page


# ---- the card's configuration ----------------------------------------------------------------------


def test_card_json_is_the_cards_block():
    import json

    # the same block test_config.test_card_block_loads_as_is loads into the card's configs
    assert json.loads(CARD_JSON.read_text()) == CARD_TRAINING_CONFIGURATION


def test_card_json_through_train_and_info(tmp_path, capsys):
    from nanogpt.commands import train as train_cli

    args = train_cli.build_parser().parse_args(["--config", str(CARD_JSON), "--out", str(tmp_path / "run")])
    model, train = train_cli.resolve_configs(args)
    assert model == preset("card")
    assert (train.batch_size, train.learning_rate, train.weight_decay, train.max_iters) == (
        12,
        3e-4,
        0.1,
        20000,
    )
    assert cli.main(["info", "--config", str(CARD_JSON)]) == 0
    out = capsys.readouterr().out
    assert "52,990,464 counting the tied embedding twice" in out and "33,691,776 unique" in out
    # the README quotes the same two counts
    assert "52,990,464 counting the tied matrix twice; 33,691,776 unique" in README.read_text()


# ---- one install story -----------------------------------------------------------------------------


def pyproject_extras() -> set[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def extras_named_in_src() -> dict[str, list[str]]:
    """extra -> the `file:line`s whose `missing_extra(...)` / `install_command(...)` names it."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "errors.py":  # where the two are defined
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in {"missing_extra", "install_command"}
            ):
                continue
            extra = node.args[-1]
            assert isinstance(extra, ast.Constant), f"{path}:{node.lineno}: name the extra literally"
            found.setdefault(extra.value, []).append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_install_hints_in_src_are_the_readme_command():
    """Only errors.py spells an extras install; every other `pip install` in src/ is not about an extra."""
    for path in sorted(SRC.rglob("*.py")):
        if path == SRC / "errors.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{n}"
            assert "nanogpt[" not in line, f"{where}: an install hint outside errors.missing_extra"
            if "pip install" in line:
                assert "[" not in line.split("pip install", 1)[1], f"{where}: use errors.missing_extra"
    readme = README.read_text()
    forms = {f.split("#")[0] for f in re.findall(r"pip install[^`\n]*", readme)}
    assert forms, "the README names no install command"
    for form in forms:
        m = re.fullmatch(r'pip install -e "\.\[([\w,-]+)\]"', form.strip())
        assert m and form.strip() == install_command(m.group(1)), f"README install command {form!r}"
    for extra in ("data", "mlx"):
        assert install_command(extra) in readme


def test_every_extra_the_code_names_exists_and_the_demo_installs_it():
    named = extras_named_in_src()
    assert {"hf", "data", "serve", "mlx"} <= set(named), named
    assert set(named) <= pyproject_extras(), named
    m = re.search(r"scripts/install\.sh ([\w,-]+)", (REPO / "scripts" / "demo.sh").read_text())
    assert m, "demo.sh must install nanogpt through scripts/install.sh with its extras"
    # the Quickstart's venv runs every README command but two extras it names as left out: MLX, which is
    # platform-specific, and the experiment trackers, third-party services nothing else needs
    assert set(named) - {"mlx", "track"} <= set(m.group(1).split(",")), m.group(1)


def test_missing_extra_message_is_one_line_with_the_command():
    from nanogpt.errors import UserError, missing_extra

    e = missing_extra("nanogpt serve needs FastAPI and uvicorn", "serve")
    assert isinstance(e, UserError) and "\n" not in str(e)
    assert str(e).startswith("nanogpt serve needs FastAPI and uvicorn; ")
    assert 'pip install -e ".[serve]"' in str(e)


# ---- figures that agree ----------------------------------------------------------------------------


def number(s: str) -> float:
    return float(s.replace(",", ""))


def test_readme_cpu_training_figures_agree():
    """The card's recipe on this CPU is quoted twice (Training, Results): same s/iteration, hours, tokens/s."""
    text = README.read_text()
    prose = re.search(
        r"([\d.]+) s per iteration in fp32,\s+([\d.]+) s with `--dtype bf16` \(so ~(\d+) h / ~(\d+) h", text
    )
    row = re.search(
        r"([\d.]+) s/iteration fp32 \(~([\d,]+) tokens/s\), ([\d.]+) s/iteration with `--dtype bf16` "
        r"\(~([\d,]+) tokens/s\): the card's 20K iterations would take ~(\d+) h \(fp32\) / ~(\d+) h \(bf16\)",
        text,
    )
    assert prose and row, "the README's two quotes of the card recipe's CPU speed changed form"
    fp32, bf16, h32, h16 = map(number, prose.groups())
    assert (fp32, bf16, h32, h16) == tuple(map(number, row.group(1, 3, 5, 6)))
    tokens = 12 * 512
    for seconds, hours, per_s in ((fp32, h32, number(row.group(2))), (bf16, h16, number(row.group(4)))):
        assert round(20_000 * seconds / 3600) == hours
        assert per_s == pytest.approx(tokens / seconds, rel=0.02)


def test_readme_bf16_training_speed_is_the_measured_one():
    """The README's bf16 tokens/s comes from the docs' bf16 bench: it lies inside its measured range."""
    readme, docs = README.read_text(), (REPO / "docs" / "benchmarks.md").read_text()
    per_s = number(re.search(r"with `--dtype bf16` \(~([\d,]+) tokens/s\)", readme).group(1))
    bench = (REPO / "docs" / "results" / "cpu_bf16.md").read_text()
    ours = re.search(r"Training throughput: [^|]*\| ([\d,]+) \(([\d,]+)–([\d,]+)\) tokens/s", bench)
    assert ours, "docs/results/cpu_bf16.md has no training throughput row"
    low, high = number(ours.group(2)), number(ours.group(3))
    assert low <= per_s <= high * 1.01, (per_s, low, high)
    assert ours.group(0).split("| ", 1)[1] in docs  # the docs page quotes the same stored run


def test_readme_h200_and_decode_figures_are_in_the_docs():
    readme, docs = README.read_text(), (REPO / "docs" / "benchmarks.md").read_text()
    ms = re.search(r"on one H200 \(`--dtype bf16 --compile`\) \| ([\d.]+) ms/iteration", readme).group(1)
    tps = re.search(r"\(~(\d+)K tokens/s between them\): ~([\d.]+) min", readme)
    assert f"took {ms} ms" in " ".join(docs.split())
    assert f"{tps.group(1)}K tokens/s" in docs and f"about {tps.group(2)} minutes" in docs
    # CPU decode: the README's ranges cover the medians of the docs' two current runs
    dec = re.search(
        r"~(\d+)–(\d+) tokens/s fp32, ~(\d+)–(\d+) tokens/s with `--dtype bf16` \(bf16 weights\); "
        r"HF `generate`: ~(\d+)–(\d+)",
        readme,
    )
    lo32, hi32, lo16, hi16, lo_hf, hi_hf = map(int, dec.groups())
    row = re.search(
        r"Decode tokens/s, batch 1 \|[^|]*\|[^|]*; (\d+) vs (\d+) tokens/s \|[^|]*; (\d+) vs (\d+)", docs
    )
    ours32, hf32, ours16, hf16 = map(int, row.groups())
    assert lo32 <= ours32 <= hi32 and lo16 <= ours16 <= hi16
    assert lo_hf <= hf32 <= hi_hf and lo_hf <= hf16 <= hi_hf


# ---- the exported model card -----------------------------------------------------------------------


def test_model_card_title_gives_unique_parameters():
    from nanogpt.export.model_card import ParamCounts, RunFacts, render_model_card

    text = render_model_card(preset("card"), RunFacts(), ParamCounts(52_990_464, 33_691_776), "gpt2", "out")
    title = next(line for line in text.splitlines() if line.startswith("# "))
    assert title == "# NanoGPT 33.7M - Pre-LN Transformer"
    assert "52,990,464 counting the tied embedding twice, 33,691,776 unique" in text


def test_exported_model_card_title_and_links(tmp_path):
    pytest.importorskip("tokenizers")
    import torch

    from nanogpt.export import hf
    from nanogpt.model.gpt import NanoGPTLMHeadModel
    from nanogpt.train.checkpoint import save_model

    cfg = tiny_config(context_length=128)
    torch.manual_seed(0)
    model = NanoGPTLMHeadModel(cfg).eval()
    save_model(tmp_path / "ckpt", model)
    out = hf.export(tmp_path / "ckpt", tmp_path / "hf", "remote-code").out
    card = out / "README.md"
    text = card.read_text()
    unique, total = model.num_params(unique=True), model.num_params(unique=False)
    assert unique != total  # tied: the two counts differ, and the title must take the unique one
    title = next(line for line in text.splitlines() if line.startswith("# "))
    assert title == f"# NanoGPT {unique / 1e6:.1f}M - Pre-LN Transformer"
    bad = [(t, why) for t in links(text) if (why := link_problem(t, card, out))]
    assert not bad, f"the exported card links outside its folder: {bad}"


# ---- --help ----------------------------------------------------------------------------------------


def help_of(command: str, capsys, monkeypatch) -> tuple[str, list[argparse.Action]]:
    """`nanogpt COMMAND --help` in process: its text (whitespace collapsed) and the options with a real default."""
    parsers: list[ArgumentParser] = []
    real = ArgumentParser.format_help

    def spy(self):
        parsers.append(self)
        return real(self)

    monkeypatch.setattr(ArgumentParser, "format_help", spy)
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    assert parsers, f"`nanogpt {command} --help` does not use nanogpt.errors.ArgumentParser"
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    real_default = [
        a
        for a in parsers[-1]._actions
        if a.option_strings
        and a.default not in (None, False, argparse.SUPPRESS)
        and a.help != argparse.SUPPRESS
    ]
    return shown, real_default


def shows_default(shown: str, action: argparse.Action) -> bool:
    if "default" in (action.help or ""):
        return True  # the help sentence states its own default
    return f"default: {action.default})" in shown or f"default: {action.default} " in shown


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_exits_0_and_shows_defaults(command, capsys, monkeypatch):
    shown, options = help_of(command, capsys, monkeypatch)
    missing = [a.option_strings[0] for a in options if a.help and not shows_default(shown, a)]
    assert not missing, f"`nanogpt {command} --help` does not show the defaults of {missing}"


def test_help_shows_defaults_of_options_without_help_text(capsys, monkeypatch):
    missing = []
    for command in cli.COMMANDS:
        shown, options = help_of(command, capsys, monkeypatch)
        missing += [f"{command} {a.option_strings[0]}" for a in options if not shows_default(shown, a)]
    assert not missing, missing


def test_python_m_nanogpt_runs_and_sample_help_shows_its_defaults():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "nanogpt", "sample", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    shown = " ".join(proc.stdout.split())
    for flag, default in (
        ("--temperature", "0.8"),
        ("--top-k", "50"),
        ("--seed", "1337"),
        ("--device", "auto"),
    ):
        option_help = shown.split(f"{flag} {flag.lstrip('-').upper().replace('-', '_')} ", 1)[1]
        assert option_help.split(" --", 1)[0].endswith(f"(default: {default})"), flag

"""The commands in the README and docs/*.md are copied by people: every one that runs a project script must name
flags the script has, parse with the script's real argument parser, and name files the repository has.

The parsers are taken from the scripts themselves, in this process (no subprocess per command): ``main.py``'s from
``ldm.train.cli.get_parser``, every other script's by running it as ``__main__`` until it asks argparse to parse,
at which point the parser is captured and the script stops. Placeholders are skipped by one rule: only arguments that
start with a folder of the repository (``configs/``, ``models/``, ``tests/``, ``scripts/``, ``ldm/``, ``evaluation/``,
``docs/``) are checked, and not when they hold ``<...>`` or are what an output flag names (``--outdir`` ...), so
``/path/to/model.ckpt``, ``MODEL.ckpt`` and ``logs/<run>/...`` stand for the reader's own files.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "models" / "shapes" / "README.md"]
CHECKED_ROOTS = ("configs/", "models/", "tests/", "scripts/", "ldm/", "evaluation/", "docs/")
OUTPUT_FLAGS = {"--outdir", "--output_path", "--out", "-l", "--logdir"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
SHELL_SCRIPTS = {"scripts/gpu_check.sh": "scripts/gpu_check.py"}  # shell wrappers and the script whose flags they take
FLAG = re.compile(r"^--?[A-Za-z]")
# the original's three commands (its README), by script and flags: they must still be in ours
ORIGINAL_COMMANDS = {
    "main.py": {"--base", "-t", "--actual_resume", "-n", "--gpus", "--data_root", "--init_word"},
    "scripts/txt2img.py": {"--ddim_eta", "--n_samples", "--n_iter", "--scale", "--ddim_steps", "--embedding_path",
                           "--ckpt_path", "--prompt"},
    "merge_embeddings.py": {"--manager_ckpts", "--output_path"},
}


@dataclass(frozen=True)
class Command:
    """One command line of a code block: where it is, the project script it runs, and that script's arguments."""

    where: str
    script: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {self.script} {' '.join(self.args)}"


def code_block_lines(text: str) -> list[tuple[int, str]]:
    """The lines inside fenced code blocks, continuation lines (``\\`` at the end) joined, with the first line's number."""
    out: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def commands_in(path: Path) -> list[Command]:
    """Every command of ``path``'s code blocks that runs a project script (``python X.py ...``, ``bash scripts/X.sh``)."""
    found = []
    for number, line in code_block_lines(path.read_text(encoding="utf-8")):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # not shell (a BibTeX entry, a YAML excerpt)
            continue
        if len(tokens) >= 2 and tokens[0] in PYTHONS and tokens[1].endswith(".py"):
            script, args = tokens[1], tokens[2:]
        elif len(tokens) >= 2 and tokens[0] == "bash" and tokens[1].endswith(".sh"):
            script, args = tokens[1], tokens[2:]
        else:
            continue
        found.append(Command(f"{path.relative_to(REPO)}:{number}", script, tuple(args)))
    return found


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def _capture(self: argparse.ArgumentParser, *args, **kwargs):
    raise _Captured(self)


@functools.lru_cache(maxsize=None)
def script_parser(script: str) -> argparse.ArgumentParser:
    """The argument parser ``script`` builds, taken at the moment it would parse ``sys.argv`` (the script's logging
    set-up, which comes first in some, is not run: it would change the test process's root logger)."""
    if script == "main.py":
        from ldm.train.cli import get_parser

        return get_parser()
    path = REPO / SHELL_SCRIPTS.get(script, script)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", _capture), \
            mock.patch.object(logging, "basicConfig"), \
            mock.patch.object(sys, "argv", [str(path)]), mock.patch.object(sys, "path", list(sys.path)):
        try:
            runpy.run_path(str(path), run_name="__main__")
        except _Captured as captured:
            return captured.parser
    raise AssertionError(f"{script} never parsed its arguments")


@functools.lru_cache(maxsize=None)
def trainer_flags() -> frozenset[str]:
    """``--name`` for every ``Trainer`` argument: ``main.py`` passes those through."""
    from ldm.train.cli import trainer_parameters

    return frozenset(f"--{name}" for name in trainer_parameters())


def option_strings(parser: argparse.ArgumentParser, args: tuple[str, ...]) -> set[str]:
    """The flags ``parser`` accepts, with those of the subcommand ``args`` names (``embedding_tool.py inspect``)."""
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in args:
                if word in action.choices:
                    flags |= option_strings(action.choices[word], ())
                    break
    return flags


def parse_error(cmd: Command) -> str | None:
    """What the script's own parser says about the whole line, or None when it parses."""
    parser = script_parser(cmd.script)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            if cmd.script == "main.py":
                from ldm.train.cli import split_unknown

                _, unknown = parser.parse_known_args(list(cmd.args))
                split_unknown(unknown)
            else:
                parser.parse_args(list(cmd.args))
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else "exit"
    except Exception as err:  # main.py's ConfigError for an option no Trainer takes
        return str(err)
    return None


def problems(cmd: Command) -> list[str]:
    """Everything wrong with one command: a missing script, unknown flags, a line that does not parse, missing files."""
    script_file = REPO / SHELL_SCRIPTS.get(cmd.script, cmd.script)
    if not (REPO / cmd.script).is_file() or not script_file.is_file():
        return [f"no script {cmd.script}"]
    found = []
    if script_file.suffix == ".py":
        known = option_strings(script_parser(cmd.script), cmd.args)
        if cmd.script == "main.py":
            known |= trainer_flags()
        for arg in cmd.args:
            flag = arg.split("=", 1)[0]
            if FLAG.match(arg) and flag not in known:
                found.append(f"unknown flag {flag}")
        error = parse_error(cmd)
        if error and not found:
            found.append(f"does not parse: {error}")
    elif cmd.args and script_file.name == "quickstart.sh":
        found.append("quickstart.sh takes no arguments")
    previous = ""
    for arg in cmd.args:
        value = arg.split("=", 1)[1] if FLAG.match(arg) and "=" in arg else arg
        if value.startswith(CHECKED_ROOTS) and "<" not in value and previous not in OUTPUT_FLAGS \
                and not (REPO / value).exists():
            found.append(f"no file {value}")
        previous = arg
    return found


ALL_COMMANDS = [cmd for doc in DOCUMENTS for cmd in commands_in(doc)]


def test_the_readme_has_commands_for_every_family():
    readme = commands_in(REPO / "README.md")
    scripts = {cmd.script for cmd in readme}
    assert {"main.py", "scripts/txt2img.py", "scripts/stable_txt2img.py", "merge_embeddings.py"} <= scripts
    configs = {arg for cmd in readme for arg in cmd.args if arg.endswith(".yaml")}
    for family in ("configs/shapes/", "configs/latent-diffusion/", "configs/stable-diffusion/v1",
                   "configs/stable-diffusion/v2", "configs/stable-diffusion-xl/", "tests/configs/sd2-tiny",
                   "tests/configs/sdxl-tiny"):
        assert any(c.startswith(family) for c in configs), family


def test_the_originals_commands_are_still_there():
    readme = commands_in(REPO / "README.md")
    for script, flags in ORIGINAL_COMMANDS.items():
        assert any(cmd.script == script and flags <= set(cmd.args) for cmd in readme), script


@pytest.mark.parametrize("cmd", ALL_COMMANDS, ids=str)
def test_command_names_real_flags_and_files(cmd):
    assert problems(cmd) == [], str(cmd)


def test_made_up_flags_and_missing_files_are_caught():
    base = ("--base", "configs/shapes/shapes-ldm-finetune.yaml", "-t", "--actual_resume", "models/shapes/model.ckpt")
    assert problems(Command("t", "main.py", base)) == []
    assert problems(Command("t", "main.py", (*base, "--made_up_flag", "3"))) == ["unknown flag --made_up_flag"]
    assert problems(Command("t", "main.py", (*base, "--max_step", "3"))) == ["unknown flag --max_step"]  # no abbreviations
    assert problems(Command("t", "scripts/txt2img.py", ("--prompt", "a", "--no_such_option"))) == ["unknown flag --no_such_option"]
    assert problems(Command("t", "merge_embeddings.py", ("--manager_ckpts", "a.pt", "--outptu_path=b.pt"))) \
        == ["unknown flag --outptu_path"]
    assert problems(Command("t", "scripts/embedding_tool.py", ("convert", "a.pt", "b.pt", "--to", "a1111", "--top", "3"))) \
        == ["unknown flag --top"]  # an option of the other subcommand
    assert problems(Command("t", "main.py", ("--base", "configs/shapes/no-such.yaml"))) == ["no file configs/shapes/no-such.yaml"]
    assert problems(Command("t", "scripts/no_such.py", ())) == ["no script scripts/no_such.py"]
    assert problems(Command("t", "scripts/stable_txt2img.py", ("--precision", "half"))) != []  # a choice it lacks
    placeholders = ("--actual_resume", "/path/to/model.ckpt", "--data_root", "DIR", "-r", "logs/<run>", "-l", "logs")
    assert problems(Command("t", "main.py", placeholders)) == []


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of ``path``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S).splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_resolve(doc):
    """The notes moved from the README into docs/: every relative link and image must still reach its file and heading."""
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: {target}"
        if anchor and path.suffix == ".md":
            assert anchor in heading_anchors(path), f"{doc.name}: {target}"


def test_code_blocks_are_read_as_shell():
    text = "x\n```\npython main.py --base configs/a.yaml \\\n    -t  # comment\n```\n`python main.py --nope`\n"
    assert code_block_lines(text) == [(3, "python main.py --base configs/a.yaml      -t  # comment")]

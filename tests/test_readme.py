"""The README is true: its Python blocks run as written, its commands parse, the files it names exist.

Every fenced ``python`` block of README.md is executed, in order, each in a fresh namespace (a
block that fails fails the test with its line number). Every ``occore ...`` line of a ``bash`` block
is parsed by the command's own parser (an option the command does not have fails the test, no work
is done); every ``python SCRIPT`` line names a script the repository has; every relative link or
backquoted path in the text names a file or folder that exists.
"""
from __future__ import annotations

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(language: str) -> list[tuple[int, str]]:
    """``[(first line number, code)]`` of the fenced blocks of one language."""
    out, lines, start, lang = [], README.read_text().splitlines(), None, None
    for number, line in enumerate(lines, 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and start is None:
            start, lang, body = number + 1, fence.group(1), []
        elif line.startswith("```") and start is not None:
            if lang == language:
                out.append((start, "\n".join(body)))
            start = None
        elif start is not None:
            body.append(line)
    assert start is None, f"README.md: unclosed code block from line {start - 1}"
    return out


def _command_lines() -> list[tuple[int, list[str]]]:
    """Shell words of each command line of the bash blocks (comments and continuations removed)."""
    out = []
    for start, code in _blocks("bash"):
        for offset, line in enumerate(code.splitlines()):
            words = shlex.split(line, comments=True)
            if words:
                out.append((start + offset, words))
    return out


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_python_and_bash_blocks():
    assert len(PYTHON_BLOCKS) >= 2 and _command_lines()


@pytest.mark.parametrize("start,code", PYTHON_BLOCKS, ids=[f"line{s}" for s, _ in PYTHON_BLOCKS])
def test_python_block_runs(start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, f"README.md:{start}", "exec")
    exec(compiled, {"__name__": "__readme__"})


def _parse_occore(words: list[str]):
    from occore import cli

    args = words[1:]
    if args[:1] == ["train"]:                # the plugin command of nn_adapter: its own parser
        from nn_adapter.cli import build_parser

        return build_parser().parse_args(args[1:])
    return cli.build_parser().parse_args(args)


def test_every_occore_command_line_parses():
    seen = 0
    for number, words in _command_lines():
        if words[0] in (".venv/bin/occore", "occore"):
            try:
                _parse_occore(words)
            except SystemExit as exit_:   # argparse's way of refusing a command line
                pytest.fail(f"README.md:{number}: `{' '.join(words)}` is refused (exit {exit_.code})")
            seen += 1
    assert seen >= 3


def test_every_script_named_exists():
    for number, words in _command_lines():
        if words[0].endswith("python") and len(words) > 1 and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"README.md:{number}: no file {words[1]}"


def test_every_linked_or_quoted_path_exists():
    text = README.read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", text)
    quoted = [p for p in re.findall(r"`([\w./-]+/[\w./-]*|[\w/-]+\.(?:py|md|png|c|toml|txt))`", text)
              if not p.startswith((".venv", "/", "http")) and "*" not in p]
    documents = re.findall(r"(?<![\w/.])([\w/-]+\.md)\b", text)      # any markdown file named, quoted or not
    missing = sorted({p for p in links + quoted + documents if not p.startswith("http") and not (ROOT / p).exists()})
    assert not missing, f"README.md names files the repository does not have: {missing}"

"""Plugin commands of the occore CLI (entry-point group ``occore.commands``); occore never imports nn_adapter."""
import ast
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import occore.cli
from occore.cli import PLUGIN_GROUP, Command, main

OCCORE = Path(occore.cli.__file__).resolve().parent


def _fake_plugins(monkeypatch, **values):
    eps = [EntryPoint(name=name, value=value, group=PLUGIN_GROUP) for name, value in values.items()]
    monkeypatch.setattr(occore.cli, "_entry_points", lambda: eps)


def test_no_module_of_occore_imports_nn_adapter():
    offenders = []
    for path in sorted(OCCORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "nn_adapter" or n.startswith("nn_adapter.") for n in names):
                offenders.append(f"{path.relative_to(OCCORE.parent)}:{node.lineno}")
    assert offenders == []


def test_building_the_parser_imports_no_plugin():
    code = ("import occore, occore.cli, sys; p = occore.cli.build_parser(); "
            "assert 'nn_adapter' not in sys.modules, 'nn_adapter imported'; "
            "assert 'train' in p.format_help()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_train_is_found_through_the_entry_point():
    assert occore.cli.plugin_commands()["train"].value == "nn_adapter.cli:COMMAND"


@pytest.mark.parametrize("script", ["-m", "console"])
def test_occore_train_help_through_the_entry_point(script):
    if script == "console":
        exe = Path(sys.executable).parent / "occore"
        if not exe.exists():
            pytest.skip("no occore console script next to this interpreter")
        cmd = [str(exe)]
    else:
        cmd = [sys.executable, "-m", "occore"]
    proc = subprocess.run(cmd + ["train", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: occore train") and "--optimizers" in proc.stdout
    top = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert top.returncode == 0, top.stderr
    line = next(line for line in top.stdout.splitlines() if line.strip().startswith("train"))
    assert "DDPNOpt" in line                      # the plugin's own help text


def test_every_argument_after_the_name_goes_to_the_plugin(monkeypatch):
    seen = []
    mod = types.ModuleType("fake_plugin")
    mod.COMMAND = Command("do it", lambda argv: seen.append(argv) or 0)
    mod.plain = lambda argv: seen.append(("plain", argv)) or 3
    monkeypatch.setitem(sys.modules, "fake_plugin", mod)
    _fake_plugins(monkeypatch, train="fake_plugin:COMMAND", other="fake_plugin:plain")
    assert main(["train", "--dataset", "digits", "--help", "x"]) == 0
    assert main(["other", "-v"]) == 3
    assert seen == [["--dataset", "digits", "--help", "x"], ("plain", ["-v"])]


def test_plugin_help_is_listed_and_builtins_win(monkeypatch, capsys):
    mod = types.ModuleType("fake_plugin")
    mod.COMMAND = Command("say hello 100%", lambda argv: 0)
    monkeypatch.setitem(sys.modules, "fake_plugin", mod)
    _fake_plugins(monkeypatch, hello="fake_plugin:COMMAND", list="fake_plugin:COMMAND")
    assert list(occore.cli.plugin_commands()) == ["hello"]
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{solve,compare,list,mpc,hello}" in out and "say hello 100%" in out
    assert main(["list"]) == 0                      # the built-in, not the plugin
    assert "cartpole" in capsys.readouterr().out


def test_a_plugin_that_fails_to_import_is_one_line_exit_2(monkeypatch, capsys):
    _fake_plugins(monkeypatch, train="no_such_module_xyz.cli:COMMAND")
    assert main(["train", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("occore: error: plugin command 'train'")
    assert "no_such_module_xyz.cli:COMMAND" in err and "ModuleNotFoundError" in err
    with pytest.raises(SystemExit):                 # occore --help still works, naming the broken plugin
        main(["-h"])
    assert "unavailable" in capsys.readouterr().out


def test_unknown_command_is_the_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'train'" in err
    proc = subprocess.run([sys.executable, "-m", "occore", "bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr

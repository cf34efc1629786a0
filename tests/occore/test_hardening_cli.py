"""Class 1 of issue 13 for ``occore solve`` and ``occore compare``: every option is checked before
any work (output paths writable, matplotlib present for --plot), a user error is one line on stderr
with exit status 2 and never a traceback; ``--version``; help text on every option, no raw markup."""
import argparse
import os
import subprocess
import sys

import pytest

import occore
from occore import cli
from occore.comparison import runner
from occore.output_paths import PLOT_FORMATS, output_file_problem, output_folder_problem


def _run(argv, capsys):
    """Exit status and stderr of ``occore argv`` (argparse's own errors exit through SystemExit)."""
    try:
        code = cli.main(argv)
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if a comparison starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("the comparison ran before the bad option was refused")
    monkeypatch.setattr(runner, "compare", refuse)


@pytest.mark.parametrize("argv, words", [
    (["compare", "--plot", "/no/such/dir/x.png"], ["--plot", "/no/such/dir", "does not exist"]),
    (["compare", "--json", "/no/such/dir/x.json"], ["--json", "does not exist"]),
    (["compare", "--plot", "."], ["--plot", "is a folder, expected a file name"]),
    (["compare", "--plot", "figure.xyz"], ["--plot", "unknown figure format 'xyz'", ".png"]),
    (["compare", "--plot", "same.png", "--json", "same.png"], ["same file"]),
    (["compare", "--json", ""], ["--json: an empty file name"]),
    (["compare", "--plot", ""], ["--plot: an empty file name"]),
    (["mpc", "pendulum", "--plot", ""], ["--plot: an empty file name"]),
    (["compare", "--max-iter", "0"], ["--max-iter 0", ">= 1"]),
    (["compare", "--repeat", "0"], ["--repeat 0", ">= 1"]),
    (["compare", "--workers", "-2"], ["--workers -2", ">= 1"]),
    (["solve", "pendulum", "--max-iter", "-1"], ["--max-iter -1", ">= 1"]),
])
def test_bad_options_are_one_line_exit_2_before_any_work(argv, words, capsys, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_an_unwritable_directory_is_refused(tmp_path, capsys, no_work):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        code, err = _run(["compare", "--json", str(locked / "x.json")], capsys)
        assert code == 2 and "not writable" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_no_file_can_be_created_in_is_refused_even_as_root(capsys, no_work):
    # permission bits say root may write in /proc; creating a file there fails for everyone
    code, err = _run(["compare", "--json", "/proc/occore-x.json"], capsys)
    assert code == 2 and "--json" in err and "not writable" in err and "Traceback" not in err
    assert output_folder_problem("/proc/occore-sub/run") is not None
    assert not os.path.exists("/proc/occore-x.json")


def test_output_path_checks_leave_what_they_probe_unchanged(tmp_path):
    existing = tmp_path / "old.json"
    existing.write_text("kept")
    before = (existing.stat().st_mtime_ns, sorted(os.listdir(tmp_path)))
    assert output_file_problem(str(existing)) is None
    assert output_folder_problem(str(tmp_path / "new" / "deeper")) is None
    assert (existing.stat().st_mtime_ns, sorted(os.listdir(tmp_path))) == before
    assert existing.read_text() == "kept" and not (tmp_path / "new").exists()
    assert "is a file, expected a folder" in output_folder_problem(str(existing))
    assert "is a file" in output_folder_problem(str(existing / "sub"))
    assert "unknown figure format" in output_file_problem(str(tmp_path / "f.txt"), PLOT_FORMATS)
    assert output_file_problem(str(tmp_path / "f.PNG"), PLOT_FORMATS) is None


def test_an_empty_name_is_refused_as_a_file_and_as_a_folder():
    """Path('') is the current folder: an empty --checkpoint / --out would write there."""
    assert output_file_problem("") == "an empty file name"
    assert output_folder_problem("") == "an empty folder name"
    assert output_folder_problem(".") is None


def test_plot_without_matplotlib_is_refused_before_any_work(monkeypatch, capsys, no_work, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
    code, err = _run(["compare", "--plot", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "needs matplotlib" in err


@pytest.mark.parametrize("argv", [["solve", "pendulum", "--max-iter", "x"], ["solve", "pendulum", "--nosuch"],
                                  ["nosuch"], ["compare", "--repeat", "1.5"]])
def test_argparse_errors_are_one_line(argv, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--help" in err, err


def test_good_outputs_are_written(tmp_path, capsys):
    plot, js = tmp_path / "c.png", tmp_path / "c.json"
    assert cli.main(["compare", "--problems", "lqr", "--solvers", "ilqr", "--no-progress",
                     "--plot", str(plot), "--json", str(js)]) == 0
    assert plot.stat().st_size > 0 and js.stat().st_size > 0


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"occore {occore.__version__}"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_the_help_has_no_raw_markup():
    parser = cli.build_parser(plugins={})
    subs = _subparsers(parser)
    assert set(cli.BUILTIN_COMMANDS) <= set(subs)
    for name in cli.BUILTIN_COMMANDS:
        for action in subs[name]._actions:
            assert action.help and action.help.strip(), (name, action.dest)
        text = subs[name].format_help()
        assert "`" not in text and "%(" not in text and "**" not in text, text
    top = parser.format_help()
    assert "--version" in top and "`" not in top


def test_help_and_version_of_the_installed_command_show_no_traceback():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(occore.__file__)))
    for argv in (["--help"], ["solve", "--help"], ["compare", "--help"], ["--version"]):
        done = subprocess.run([sys.executable, "-m", "occore", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0 and not done.stderr and "Traceback" not in done.stdout, done


@pytest.mark.parametrize("argv, words", [
    (["mpc", "pendulum", "--plot", "/no/such/dir/x.png"], ["--plot", "does not exist"]),
    (["mpc", "pendulum", "--plot", "closed_loop.xyz"], ["--plot", "unknown figure format"]),
    (["mpc", "pendulum", "--steps", "0"], ["--steps 0", ">= 1"]),
])
def test_mpc_options_are_checked_before_the_closed_loop_runs(argv, words, capsys, monkeypatch, tmp_path):
    import occore.mpc

    def refuse(*args, **kwargs):
        raise AssertionError("the closed loop ran before the bad option was refused")
    monkeypatch.setattr(occore.mpc, "simulate", refuse)
    monkeypatch.chdir(tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_a_problem_file_is_read_as_python_whatever_its_extension(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("these are notes, not Python: {\n")
    code, err = _run(["solve", str(text)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"{text}:1" in err and "SyntaxError" in err
    good = tmp_path / "problems.conf"
    good.write_text("from occore.problems import make\nP = make(\"lqr\")\n")
    code, err = _run(["solve", str(good), "--quiet"], capsys)
    assert code == 0, err

"""benchmarks/nn_step.py: the residual CNN rows (feedback rows may refuse the model, the others run)."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nn_step.py"


@pytest.fixture(scope="module")
def nn_step():
    spec = importlib.util.spec_from_file_location("nn_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_residual_cnn_is_a_module_with_skips():
    from nn_adapter.training import ResidualBlock, residual_cnn

    net = residual_cnn()
    assert not isinstance(net, torch.nn.Sequential) and len(net.blocks) == 3
    block = ResidualBlock(2)
    for p in block.parameters():
        torch.nn.init.zeros_(p)
    x = torch.rand(1, 2, 4, 4)
    assert torch.equal(block(x), x)             # zero convolutions: relu(x + 0) = x, the identity skip


def test_residual_rows_run_or_say_unsupported(nn_step, capsys):
    torch.set_num_threads(1)
    result, note, refused = nn_step.bench("resnet", steps=1, rounds=1, batch=4, warmup=1)
    assert "CIFAR-like" in note and list(result) == list(nn_step.OPTIMIZERS)
    for label, row in result.items():
        if label in nn_step.FEEDBACK_ROWS and row is None:
            assert label in refused
        else:
            assert row is not None and row[0] > 0 and row[1] > 0, label
    ratios = nn_step.report("(c)", result, note, refused)
    out = capsys.readouterr().out
    assert "Adam (torch)" in out and "DDPNOpt-adam fb=off" in out
    assert (ratios["DDPNOpt-adam fb=on"] is None) == ("DDPNOpt-adam fb=on" in refused)
    if refused:
        assert nn_step.UNSUPPORTED in out


def test_versions_script_runs_two_trees_in_one_process():
    """benchmarks/nn_step_versions.py on this tree twice: one row per tree, and the same code
    measures the same peak memory (the ratio to the first tree is exactly 1)."""
    import subprocess

    root = SCRIPT.parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "nn_step_versions.py"),
                          str(root), str(root), "--steps", "2"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    rows = [line.split() for line in out.splitlines() if "DDPNOpt-adam fb=on [" in line]
    assert len(rows) == 2 and "Adam (torch)" in out
    assert all(row[-1] == "1.00" for row in rows)


@pytest.mark.parametrize("argv, words", [
    (["--threads", "0"], "--threads 0: expected an integer from 1"),       # was: a RuntimeError traceback
    (["--threads", "1000000000"], "--threads 1000000000"),
])
def test_bad_threads_are_one_line_and_exit_2(nn_step, argv, words, capsys):
    with pytest.raises(SystemExit) as done:
        nn_step.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["/no/such/tree"], "/no/such/tree: not a source tree"),               # was: benchmarked another tree
    (["--steps", "0", "."], "--steps 0: expected an integer >= 1"),         # was: a StatisticsError traceback
    (["--bogus", "."], "unrecognized arguments: --bogus"),                  # was: argparse's usage line too
])
def test_nn_step_versions_checks_its_arguments_first(argv, words):
    import subprocess

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "nn_step_versions.py"), *argv],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert words in done.stderr

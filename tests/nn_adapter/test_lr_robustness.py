"""benchmarks/lr_robustness.py: the learning-rate robustness grid (DDPNOpt paper, Fig. 4)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lr_robustness.py"


@pytest.fixture(scope="module")
def lrr():
    name = "lr_robustness"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # the worker pool pickles its functions by module name
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_report_heatmap_and_every_run(lrr, tmp_path, capsys):
    assert lrr.main(["--quick", "--out", str(tmp_path)]) == 0
    md, png, js = (tmp_path / f"lr_robustness.{ext}" for ext in ("md", "png", "json"))
    assert md.exists() and png.exists() and js.exists()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text(encoding="utf-8")
    for name in ("sgd-m", "rmsprop", "adam", "ekfac", "## digits", "## wine", "## Summary"):
        assert name in text
    assert "--quick" in text   # the exact command line is in the header
    records = json.loads(js.read_text())["records"]
    assert len(records) == 2 * 4 * 3 * 2 * 2
    keys = {(r["dataset"], r["base"], r["lr_factor"], r["seed"], r["variant"]) for r in records}
    assert len(keys) == len(records)
    assert {r["dataset"] for r in records} == {"digits", "wine"}
    assert {r["variant"] for r in records} == {"base", "ddpnopt"}
    for r in records:
        loss = r["final_train_loss"]
        assert r["diverged"] or (loss is not None and math.isfinite(loss)), r
    err = capsys.readouterr().err
    assert err.count("\n") >= 24     # one progress line per (dataset, base, lr) cell


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--datasets", "nope"],
                                  ["--out", "/proc/forbidden"], ["--lr-factors", "1,x"],
                                  ["--ddpnopt-option", "no_such_option=1"]])
def test_bad_command_line_exits_2_with_one_line(lrr, argv, capsys, tmp_path):
    if "--out" not in argv:
        argv = argv + ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        lrr.main(argv + ["--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("option", ["--out", "--json"])
def test_an_empty_output_name_is_refused_before_the_grid(lrr, option, capsys, monkeypatch):
    """Was: --out '' wrote the report into the current folder, --json '' fell back to the default."""
    monkeypatch.setattr(lrr, "run_grid", lambda *a, **k: pytest.fail("the grid ran"))
    with pytest.raises(SystemExit) as exc:
        lrr.main([option, "", "--quick"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert f"{option}: an empty f" in err, err


def test_too_few_confirmation_seeds_are_refused_before_the_grid(lrr, capsys, monkeypatch, tmp_path):
    """Was: --confirm-seeds no larger than --seeds was refused only after the whole grid had run."""
    monkeypatch.setattr(lrr, "run_grid", lambda *a, **k: pytest.fail("the grid ran"))
    with pytest.raises(SystemExit) as exc:
        lrr.main(["--quick", "--seeds", "3", "--confirm-seeds", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--confirm-seeds: expected 0 or more than the grid's 3 seeds, got 3" in err, err


def test_divergence_rule_flags_nan_losses_and_no_learning(lrr):
    assert lrr.divergence_reason(float("nan"), 2.3)
    assert lrr.divergence_reason(None, 2.3)
    assert lrr.divergence_reason(2.5, 2.3)                  # worse than the initial model
    assert lrr.divergence_reason(0.1, 2.3, stopped="non-finite loss at epoch 1, step 1")
    assert lrr.divergence_reason(0.1, 2.3) is None
    # a run whose loss is NaN from the first step stops there and is flagged
    torch.manual_seed(0)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    x[0, 0] = float("nan")
    split = lrr.nn_data.Split(x, y, x[:4], y[:4])
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rec = lrr.train_run(net, torch.optim.SGD(net.parameters(), lr=0.1), split, epochs=2, batch=16,
                        seed=0)
    assert rec["diverged"] and "non-finite" in rec["diverged_reason"]
    assert rec["steps"] == 1 and rec["final_train_loss"] is None


def test_results_do_not_depend_on_the_number_of_workers(lrr):
    kw = dict(datasets=["wine"], bases=["sgd-m", "adam"], lr_factors=[1.0], seeds=2, epochs=1,
              progress=lambda line: None)
    one, two = lrr.run_grid(workers=1, **kw), lrr.run_grid(workers=2, **kw)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(one["records"]) == strip(two["records"])
    # both members of a pair start from the same weights: the same initial loss
    for r0, r1 in zip(one["records"][::2], one["records"][1::2]):
        assert (r0["variant"], r1["variant"]) == ("base", "ddpnopt")
        assert r0["initial_loss"] == r1["initial_loss"]


def test_flagged_cells_are_remeasured_with_more_seeds_and_from_json(lrr, tmp_path, monkeypatch,
                                                                    capsys):
    monkeypatch.setattr(lrr, "flagged", lambda row: row["base"] == "adam")
    grid = ["--datasets", "wine", "--bases", "sgd-m,adam", "--lr-factors", "1", "--seeds", "1",
            "--epochs", "1", "--confirm-seeds", "2", "--out", str(tmp_path / "a")]
    assert lrr.main(grid) == 0
    payload = json.loads((tmp_path / "a" / "lr_robustness.json").read_text())
    extra = [r for r in payload["records"] if r.get("stage") == "confirm"]
    # only the flagged cell (adam) gets seed 1, for both members of the pair
    assert {(r["base"], r["seed"], r["variant"]) for r in extra} == {("adam", 1, "base"),
                                                                     ("adam", 1, "ddpnopt")}
    (cell,) = payload["confirmed_cells"]
    assert cell["base"] == "adam" and cell["stats"]["base"]["runs"] == 2
    md = (tmp_path / "a" / "lr_robustness.md").read_text()
    assert "## Flagged cells re-measured with 2 seeds" in md
    # the confirmation alone, from the grid's JSON: the same seed-1 runs again (deterministic)
    again = ["--from-json", str(tmp_path / "a" / "lr_robustness.json"), "--confirm-seeds", "2",
             "--out", str(tmp_path / "b")]
    assert lrr.main(again) == 0
    p2 = json.loads((tmp_path / "b" / "lr_robustness.json").read_text())
    key = lambda r: (r["base"], r["seed"], r["variant"])  # noqa: E731
    assert sorted(map(key, p2["records"])) == sorted(map(key, payload["records"]))
    loss = {key(r): r["final_train_loss"] for r in payload["records"]}
    assert all(loss[key(r)] == r["final_train_loss"] for r in p2["records"])
    assert "grid runs from" in (tmp_path / "b" / "lr_robustness.md").read_text()
    capsys.readouterr()
    for bad in (["--from-json", str(tmp_path / "nope.json")],
                ["--from-json", str(tmp_path / "a" / "lr_robustness.json"), "--confirm-seeds", "1"]):
        with pytest.raises(SystemExit) as exc:
            lrr.main(bad + ["--out", str(tmp_path / "c")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err

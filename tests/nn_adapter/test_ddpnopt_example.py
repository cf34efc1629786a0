"""examples/train_digits.py (used by `make demo`) runs and learns."""
import importlib.util
from pathlib import Path


def test_train_digits_example_learns():
    path = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.train_digits(epochs=2)
    assert set(res) == {"ddpnopt", "adam"}
    for r in res.values():
        assert r["test_accuracy"] > 0.7 and r["seconds"] > 0 and r["train_loss"] < 1.5

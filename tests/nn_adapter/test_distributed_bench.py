"""benchmarks/distributed.py --quick: 1 and 2 gloo processes side by side, with the scaling
efficiency and the collectives (their count per step: DDP's bucket + agreement + feedback)."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "distributed.py"


def test_quick_benchmark_prints_both_process_counts():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    one, two = lines[header + 1].split(), lines[header + 2].split()
    assert one[:3] == ["DDPNOpt-adam", "fb=on", "1"] and one[-4:-2] == ["100%", "-"]
    assert two[:2] == ["2", "4"] and two[-3] == "1+6"      # 6 = agreement + 5 feedback stages
    assert float(two[2]) > 0 and two[-1].endswith("%")


def test_bad_options_are_refused():
    out = subprocess.run([sys.executable, str(SCRIPT), "--optimizers", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown optimizer" in out.stderr

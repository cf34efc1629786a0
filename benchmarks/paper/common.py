"""What the paper-reproduction scripts share: the report header (command, versions, machine), the
output folder, the equal-effort learning-rate protocol and the figure helpers."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "docs" / "results"

def output_folder(parser, out) -> Path:
    """The results folder (``--out``, default docs/results), created; a folder no file can be
    written in is ``parser.error`` (one line, exit status 2) before any work."""
    from occore.output_paths import output_folder_problem

    folder = RESULTS if out is None else Path(out)
    problem = output_folder_problem(str(folder))
    if problem is not None:
        parser.error(f"--out: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


#: The learning-rate grid of every optimizer: its default rate times these factors (the same
#: number of points and the same spacing for all; the rate is chosen on a validation split).
LR_FACTORS = (1 / 9, 1 / 3, 1.0, 3.0, 9.0)


def lr_grid(name: str) -> list:
    from nn_adapter.training import DEFAULT_LR

    top = max(LR_FACTORS) if name == "ddp" else 1.0     # DDP's lr caps a step length: grid ending at 1
    return [DEFAULT_LR[name] * f / top for f in LR_FACTORS]


def header(argv, mode: str, seconds: float) -> str:
    """Markdown lines: the exact command, versions, machine, mode and wall time."""
    import numpy
    import torch

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "\n".join([
        f"Command: `python {' '.join([os.path.relpath(sys.argv[0], ROOT)] + list(argv))}`  ",
        f"Mode: {mode}; wall time {seconds:.0f} s  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), torch threads {torch.get_num_threads()}",
        ""])


def figure(rows: int, cols: int, size):
    """A matplotlib figure and its axes, drawn off screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size)


def save_figure(fig, title: str, path: Path) -> None:
    """Title, lay out, write ``path`` (PNG, 110 dpi) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

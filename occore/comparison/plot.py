"""The comparison figure: cost minus best against iteration and against wall time (log scales)."""
from __future__ import annotations

import math

from ..output_paths import check_path_argument

__all__ = ["plot_comparison"]


def plot_comparison(cmp, path: str) -> None:
    """Two rows of panels (against iteration, against wall time), one column per problem.

    The curves show J_k - J_best (J_best: the lowest final cost any solver found on that problem;
    J_k: the cost of the rolled-out controls after k iterations, k = 0 the initial guess; for IPOPT
    the rollout of its infeasible multiple-shooting iterates); values at or below 1e-14 |J_best| are
    drawn at that floor and a dot marks each run's end. Needs matplotlib.
    """
    check_path_argument(path, file_ok=True)
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the plot/dev extras
        raise ImportError("plotting needs matplotlib: pip install 'occore[plot]'") from err
    from matplotlib.figure import Figure     # not pyplot: the user's backend and figures are kept

    problems, solvers = cmp.problems, cmp.solvers
    colors = {s: matplotlib.colormaps["tab10"](i % 10) for i, s in enumerate(solvers)}
    fig = Figure(figsize=(3.6 * len(problems) + 0.6, 6.4))
    axes = fig.subplots(2, len(problems), squeeze=False)
    for j, pname in enumerate(problems):
        best = cmp.best.get(pname)
        if best is None:
            continue
        floor = 1e-14 * max(abs(best), 1e-300)
        for r in (r for r in cmp.records if r.problem == pname):
            pts = [(k, t, max(c - best, floor)) for k, (c, t) in enumerate(zip(r.iteration_costs, r.iteration_times))
                   if isinstance(c, float) and math.isfinite(c)]
            if not pts:
                continue
            ks, ts, gs = zip(*pts)
            kw = dict(color=colors[r.solver], lw=1.4, label=r.solver)
            axes[0, j].step(ks, gs, where="post", **kw)        # iteration 0: the initial guess
            axes[0, j].plot(ks[-1:], gs[-1:], "o", ms=3.5, color=colors[r.solver])
            if len(pts) > 1:                                    # wall time: from the first iteration on
                axes[1, j].step([t * 1e3 for t in ts[1:]], gs[1:], where="post", **kw)
                axes[1, j].plot([ts[-1] * 1e3], gs[-1:], "o", ms=3.5, color=colors[r.solver])
        axes[0, j].set_title(f"{pname} (J* = {best:.6g})", fontsize=10)
        axes[0, j].set_xlabel("iteration")
        axes[1, j].set_xlabel("wall time [ms]")
        axes[0, j].set_xscale("symlog", linthresh=1.0, linscale=0.4)
        axes[1, j].set_xscale("log")
        for ax in axes[:, j]:
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel("J - J_best")
    axes[1, 0].set_ylabel("J - J_best")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    by_label = dict(zip(labels, handles))
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(lab, h)
    fig.legend(by_label.values(), by_label.keys(), loc="lower center", ncol=len(by_label), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)

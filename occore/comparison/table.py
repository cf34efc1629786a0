"""The comparison table, as plain text or Markdown."""
from __future__ import annotations

import math

__all__ = ["format_table", "format_reached", "format_seconds"]

_COLUMNS = ("problem", "solver", "status", "iters", "final cost", "gap", "box viol", "constr viol", "time [ms]", "ms/iter")


def format_reached(value, iterations: int) -> str:
    """'12 it, 3.1 ms' or 'not reached in N'."""
    if value is None:
        return f"not reached in {iterations}"
    k, seconds = value
    return f"{k} it, {format_seconds(seconds)}"


def format_seconds(seconds: float) -> str:
    """'0.42 ms', '53.5 ms', '1.11 s'."""
    return f"{seconds * 1e3:.3g} ms" if seconds < 1.0 else f"{seconds:.3g} s"


def _num(x: float, fmt: str) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _rows(cmp) -> list:
    rows = []
    for r in cmp.records:
        gap = "0" if r.gap == 0 else _num(r.gap, ".1e")
        rows.append([r.problem, r.solver, r.status, str(r.iterations), _num(r.cost, ".10g"), gap,
                     "0" if r.box_violation == 0 else _num(r.box_violation, ".1e"),
                     "0" if r.constraint_violation == 0 else _num(r.constraint_violation, ".1e"),
                     _num(r.wall_time * 1e3, ".1f"), _num(r.time_per_iteration * 1e3, ".3f")]
                    + [format_reached(r.reached.get(lvl), r.iterations) for lvl in cmp.levels])
    return rows


def format_table(cmp, markdown: bool = False) -> str:
    """One row per (problem, solver) record of a :class:`occore.compare.Comparison`."""
    header = list(_COLUMNS) + [f"to {lvl:g} of best" for lvl in cmp.levels]
    rows = _rows(cmp)
    right = {3, 4, 5, 6, 7, 8, 9}
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for row in rows:
        if prev is not None and row[0] != prev:
            out.append("")
        out.append(line(row))
        prev = row[0]
    return "\n".join(out)

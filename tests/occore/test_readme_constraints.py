"""The README's constraints / CDDP / FDDP / MPC snippet runs, and says what it claims."""
import re
from pathlib import Path

import numpy as np


def test_the_readme_snippet_runs(capsys):
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("### Constraints, CDDP, FDDP and MPC", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    res, ref, run = scope["res"], scope["ref"], scope["run"]
    assert res.converged and abs(res.cost - ref.cost) <= 1e-6 * ref.cost and res.constraint_violation <= 1e-6
    assert res.multipliers.upper.max() > 0 and res.multipliers.g.max() > 0     # both limits are active
    np.testing.assert_allclose(run.xs[-1], [np.pi, 0.0], atol=1e-6)

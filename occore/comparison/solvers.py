"""The solvers ``occore compare`` knows by name: the methods, the NLP references and the variants users tune."""
from __future__ import annotations

from dataclasses import replace

from ..errors import InputError
from ..solvers.cddp import CDDP
from ..solvers.ddp import DDP, ILQR
from ..solvers.emsa import EMSA, InnerSolver
from ..solvers.fddp import FDDP
from ..solvers.options import LineSearch

__all__ = ["SOLVERS", "describe", "make_runner"]


def _riccati(cls, **changes):
    def build(max_iter):
        opts = cls.default_options()
        kw = dict(changes)
        if "regularization" in kw:     # a function of the solver's default regularisation
            kw["regularization"] = kw["regularization"](opts.regularization)
        opts = replace(opts, **kw)
        return cls(replace(opts, max_iter=max_iter) if max_iter else opts)
    return build


def _fixed(reg):
    return replace(reg, initial=1e-6, minimum=1e-6, fixed=True)


def _emsa(**changes):
    def build(max_iter):
        return EMSA(**changes, **({"max_iter": max_iter} if max_iter else {}))
    return build


def _nlp(name):
    """A factory of the CasADi NLP reference ``name`` ("ipopt" or "fatrop", occore.reference)."""
    def build(max_iter):
        from .. import reference

        solve_nlp = getattr(reference, name)

        class _Reference:
            def solve(self, problem):
                return solve_nlp(problem, **({"max_iter": max_iter} if max_iter else {}))
        _Reference.name = name
        return _Reference()
    return build


#: name -> (description, factory(max_iter or None) -> object with ``solve(problem) -> Result``)
SOLVERS = {
    "ddp": ("full second-order DDP (defaults)", _riccati(DDP)),
    "ilqr": ("iLQR (defaults)", _riccati(ILQR)),
    "emsa": ("E-MSA, adaptive rho, Newton inner maximisation", _emsa()),
    "ipopt": ("CasADi multiple shooting + IPOPT (the reference)", _nlp("ipopt")),
    "fatrop": ("CasADi multiple shooting + FATROP (structure-exploiting interior point)", _nlp("fatrop")),
    "cddp": ("constrained DDP, augmented Lagrangian (state, path, terminal constraints)", _riccati(CDDP)),
    "fddp": ("feasibility-driven DDP (multiple shooting; here from the zero-control guess)", _riccati(FDDP)),
    "ddp-nols": ("DDP without line search (full steps only)", _riccati(DDP, line_search=LineSearch(steps=(1.0,)))),
    "ilqr-nols": ("iLQR without line search (full steps only)", _riccati(ILQR, line_search=LineSearch(steps=(1.0,)))),
    "ddp-fixedreg": ("DDP with fixed regularisation mu = 1e-6", _riccati(DDP, regularization=_fixed)),
    "ilqr-fixedreg": ("iLQR with fixed regularisation mu = 1e-6", _riccati(ILQR, regularization=_fixed)),
    "emsa-gradient": ("E-MSA, projected gradient inner ascent (step 1)", _emsa(inner=InnerSolver("gradient"))),
    "emsa-fixedrho": ("E-MSA, fixed rho = 1 (every trial accepted)", _emsa(adaptive_rho=False)),
}


def describe() -> str:
    """One line per known solver name."""
    return "\n".join(f"  {name:<14} {desc}" for name, (desc, _) in SOLVERS.items())


def make_runner(name: str, max_iter: int | None = None):
    """The solver called ``name`` (an object with ``solve(problem)``); InputError listing the valid names."""
    if name not in SOLVERS:
        raise InputError(f"unknown solver {name!r}; valid solvers are {', '.join(SOLVERS)}")
    return SOLVERS[name][1](max_iter)

"""CasADi backend: stage functions and their derivatives built once as SX functions, evaluated for
the whole horizon with ``Function.map`` (derivatives) and ``Function.mapaccum`` (rollouts).

Every mapped function returns one stacked column per stage; matrices are flattened row-major
(``vec(M.T)``) so a plain C-order reshape restores them. The functions are evaluated through
CasADi's buffer interface (:class:`_Evaluator`): inputs and outputs live in preallocated numpy arrays,
so a call costs no DM conversion. A casadi (rows, cols) dense matrix is column-major, i.e. the same
memory as a C-order numpy (cols, rows) array: a (nx, T) casadi input is our time-major (T, nx).
"""
from __future__ import annotations

import numpy as np

from ..errors import DerivativeError, ShapeError
from .base import Backend, DenseDerivatives

__all__ = ["CasadiBackend"]


class _Evaluator:
    """Calls a casadi Function through preallocated numpy buffers (``Function.buffer``).

    Inputs are given as numpy arrays of shape (cols, rows) of the casadi input (any array with as
    many elements, in that order); outputs are returned as new (cols, rows) arrays. Not thread-safe.
    """

    def __init__(self, ca, fn):
        names = fn.name_in()
        X = [ca.MX.sym(n, *fn.size_in(i)) for i, n in enumerate(names)]
        dense = ca.Function(fn.name() + "_dense", X, [ca.densify(o) for o in fn.call(X)])
        self.args = [np.zeros(dense.size_in(i)[::-1]) for i in range(dense.n_in())]
        self.res = [np.zeros(dense.size_out(i)[::-1]) for i in range(dense.n_out())]
        self._fn = dense
        self._buffer = None
        if hasattr(dense, "buffer"):
            self._buffer, self._eval = dense.buffer()
            for i, a in enumerate(self.args):
                self._buffer.set_arg(i, memoryview(a))
            for i, r in enumerate(self.res):
                self._buffer.set_res(i, memoryview(r))

    def __call__(self, *inputs):
        for a, v in zip(self.args, inputs):
            a.reshape(-1)[...] = np.ravel(v)
        return self.evaluate()

    def evaluate(self):
        """Evaluates on the inputs already in ``self.args`` (a caller may fill them block by block)
        and returns copies of the outputs."""
        if self._buffer is None:  # casadi without the buffer interface
            outs = self._fn(*[a.T for a in self.args])
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [np.asarray(o.full()).T.copy() for o in outs]
        self._eval()
        return [r.copy() for r in self.res]


#: A function mapped over the horizon is expanded into one SX function when the expansion has at most
#: this many instructions (T times the stage function's): CasADi's SX virtual machine then runs the
#: whole horizon as one flat instruction list, the same operations in the same order (bitwise
#: identical results), measured 1.3-4x faster than the map / mapaccum loop over stages for the
#: rollouts and the derivatives of the reference problems (the per-stage call overhead is gone).
#: Longer horizons keep the map (memory and build time stay small).
EXPAND_LIMIT = 1_000_000


def _mapped(ca, fn, T):
    """``fn.map(T)``, expanded into one SX function when it is small enough (EXPAND_LIMIT)."""
    if T * fn.n_instructions() > EXPAND_LIMIT:
        return fn.map(T)
    args = [ca.SX.sym(fn.name_in(i), fn.size1_in(i), T) for i in range(fn.n_in())]
    return ca.Function(fn.name() + "_map", args, fn.map(T).call(args), fn.name_in(), fn.name_out())


def _row_major(ca, M):
    return ca.vec(M.T)


def _as_sx(ca, value, argument: str, expected: tuple | None):
    """The user function's output as an SX of shape ``expected`` (None: a column of m >= 1 values,
    a constraint vector), or a ShapeError."""
    if isinstance(value, (list, tuple)):
        value = ca.vertcat(*value)
    try:
        value = ca.SX(value) if not isinstance(value, ca.SX) else value
    except Exception as err:  # noqa: BLE001 - any conversion failure is reported as a type problem
        raise DerivativeError(f"{argument} returned {type(value).__name__}, which is not a casadi "
                              f"expression (backend 'casadi' needs casadi operations)") from err
    if expected is None:
        if value.shape[1] != 1 or value.shape[0] < 1:
            raise ShapeError(argument, "(m, 1) with m >= 1", value.shape, "constraints are a column vector")
    elif value.shape != expected:
        raise ShapeError(argument, expected, value.shape,
                         "the state is a column vector; costs must be scalars")
    return value


class CasadiBackend(Backend):
    """CasADi symbolic derivatives (the default backend)."""

    name = "casadi"

    def __init__(self, problem):
        super().__init__(problem)
        import casadi as ca

        self.ca = ca
        nx, nu, T = self.nx, self.nu, self.T
        npar = problem.params.shape[1] if problem.params is not None else 0
        self.np_eff = max(npar, 1)
        x, u, p = ca.SX.sym("x", nx), ca.SX.sym("u", nu), ca.SX.sym("p", self.np_eff)
        extra = (p[:npar],) if npar else ()
        f = _as_sx(ca, self._call("dynamics", problem.dynamics, x, u, *extra), "dynamics", (nx, 1))
        l = _as_sx(ca, self._call("stage_cost", problem.stage_cost, x, u, *extra), "stage_cost", (1, 1))
        lf = _as_sx(ca, self._call("terminal_cost", problem.terminal_cost, x, *extra), "terminal_cost", (1, 1))
        g = h = None
        if problem.path_constraints is not None:
            g = _as_sx(ca, self._call("path_constraints", problem.path_constraints, x, u, *extra),
                       "path_constraints", None)
            self.ng = g.shape[0]
        terminal = []   # [h; h_I]: equalities first
        for argument in ("terminal_constraints", "terminal_inequalities"):
            fn = getattr(problem, argument)
            if fn is not None:
                terminal.append(_as_sx(ca, self._call(argument, fn, x, *extra), argument, None))
                if argument == "terminal_constraints":
                    self.nh = terminal[-1].shape[0]
        if terminal:
            h = ca.vertcat(*terminal)
            self.nterm = h.shape[0]
        self.symbols = dict(x=x, u=u, p=p, f=f, l=l, lf=lf, g=g, h=h)

        P = np.zeros((T + 1, self.np_eff))
        if npar:
            P[:, :npar] = problem.params
        self.P = P
        self.P_stage = P[:T].copy()           # (T, np): the memory of a casadi (np, T) matrix
        self.p_final = P[T].copy()

        # Values: one step, the open-loop rollout and the closed-loop rollout.
        step = ca.Function("step", [x, u, p], [f, l])
        term = ca.Function("terminal", [x, p], [lf])
        S = ca.SX if T * step.n_instructions() <= EXPAND_LIMIT else ca.MX  # see EXPAND_LIMIT
        x0s, U, Ps = S.sym("x0", nx), S.sym("U", nu, T), S.sym("P", self.np_eff, T)
        pT = S.sym("pT", self.np_eff)
        X, L = step.mapaccum("acc", T)(x0s, U, Ps)
        self._rollout = _Evaluator(ca, ca.Function("rollout", [x0s, U, Ps, pT],
                                                   [ca.horzcat(x0s, X), ca.sum2(L) + term(X[:, -1], pT)]))

        z = ca.SX.sym("z", nx + nu + nu + nu * nx + 2 * nu + nx)
        xref, uref, kk = z[:nx], z[nx:nx + nu], z[nx + nu:nx + 2 * nu]
        o = nx + 2 * nu
        Km = ca.reshape(z[o:o + nu * nx], nx, nu).T        # row-major gains
        q = o + nu * nx
        lo, hi, shift = z[q:q + nu], z[q + nu:q + 2 * nu], z[q + 2 * nu:]
        alpha = ca.SX.sym("alpha")
        ucl = ca.fmin(ca.fmax(uref + alpha * kk + ca.mtimes(Km, x - xref), lo), hi)
        fcl, lcl = step(x, ucl, p)
        cl = ca.Function("closed_loop", [x, z, p, alpha], [fcl + shift, ucl, lcl])
        S = ca.SX if T * cl.n_instructions() <= EXPAND_LIMIT else ca.MX
        x0s, Ps, pT = S.sym("x0", nx), S.sym("P", self.np_eff, T), S.sym("pT", self.np_eff)
        Z, a = S.sym("Z", z.shape[0], T), S.sym("a")
        Xc, Uc, Lc = cl.mapaccum("acc_cl", T)(x0s, Z, Ps, a)
        self._rollout_cl = _Evaluator(ca, ca.Function("rollout_cl", [x0s, Z, Ps, pT, a],
                                                      [ca.horzcat(x0s, Xc), Uc, ca.sum2(Lc) + term(Xc[:, -1], pT)]))

        # Derivatives, stacked per stage.
        fx, fu = ca.jacobian(f, x), ca.jacobian(f, u)
        lx, lu = ca.gradient(l, x), ca.gradient(l, u)
        lxx, luu = ca.hessian(l, x)[0], ca.hessian(l, u)[0]
        lux = ca.jacobian(lu, x)
        first = [f, l, _row_major(ca, fx), _row_major(ca, fu), lx, lu, _row_major(ca, lxx),
                 _row_major(ca, lux), _row_major(ca, luu)]
        self._sizes1 = [nx, 1, nx * nx, nx * nu, nx, nu, nx * nx, nu * nx, nu * nu]
        second = []
        for i in range(nx):
            second.append(_row_major(ca, ca.hessian(f[i], x)[0]))
        for i in range(nx):
            second.append(_row_major(ca, ca.jacobian(ca.gradient(f[i], u), x)))
        for i in range(nx):
            second.append(_row_major(ca, ca.hessian(f[i], u)[0]))
        self._sizes2 = [nx * nx * nx, nx * nu * nx, nx * nu * nu]
        ng = self.ng
        if ng:   # path constraints: values and Jacobians in both orders, Hessians in the second
            first += [g, _row_major(ca, ca.jacobian(g, x)), _row_major(ca, ca.jacobian(g, u))]
            self._sizes1 += [ng, ng * nx, ng * nu]
            second += [ca.vertcat(*[_row_major(ca, ca.hessian(g[i], x)[0]) for i in range(ng)]),
                       ca.vertcat(*[_row_major(ca, ca.jacobian(ca.gradient(g[i], u), x)) for i in range(ng)]),
                       ca.vertcat(*[_row_major(ca, ca.hessian(g[i], u)[0]) for i in range(ng)])]
            self._sizes2 += [ng * nx * nx, ng * nu * nx, ng * nu * nu]
            self._gvals = _Evaluator(ca, _mapped(ca, ca.Function("g", [x, u, p], [g]), T))
            self._gstep = ca.Function("g_step", [x, u, p], [g])
        self._d1 = _Evaluator(ca, _mapped(ca, ca.Function("d1", [x, u, p], [ca.vertcat(*first)]), T))
        self._d2 = _Evaluator(ca, _mapped(ca, ca.Function("d2", [x, u, p], [ca.vertcat(*(first + second))]), T))
        lfx = ca.gradient(lf, x)
        terminal = [lf, lfx, _row_major(ca, ca.hessian(lf, x)[0])]
        if h is not None:
            nT = self.nterm
            terminal += [h, _row_major(ca, ca.jacobian(h, x)),
                         ca.vertcat(*[_row_major(ca, ca.hessian(h[i], x)[0]) for i in range(nT)])]
            self._hvals = _Evaluator(ca, ca.Function("h", [x, p], [h]))
        self._dT = _Evaluator(ca, ca.Function("dT", [x, p], [ca.vertcat(*terminal)]))
        self._n1 = len(self._sizes1)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes1 + self._sizes2)]).tolist()
        self._step = step
        self._term = term

    @staticmethod
    def _call(argument, fn, *args):
        try:
            return fn(*args)
        except (ShapeError, DerivativeError):
            raise
        except Exception as err:  # noqa: BLE001 - report which user function failed and why
            raise DerivativeError(f"{argument} could not be evaluated on casadi symbols: "
                                  f"{type(err).__name__}: {err}") from err

    # -- values ---------------------------------------------------------------------------------
    def step_values(self, x, u, t):
        f, l = self._step(x, u, self.P[t])
        return np.asarray(f.full()).ravel(), float(l)

    def terminal_value(self, x):
        return float(self._term(x, self.P[self.T]))

    def constraint_step_values(self, x, u, t):
        return np.asarray(self._gstep(x, u, self.P[t]).full()).ravel()

    def terminal_constraint_values(self, x):
        return self._hvals(x, self.P[self.T])[0].ravel()

    def constraint_values(self, xs, us):
        G = self._gvals(xs[:self.T], us, self.P_stage)[0] if self.ng else None
        H = self.terminal_constraint_values(xs[self.T]) if self.nterm else None
        return G, H

    def rollout(self, us, x0):
        X, J = self._rollout(x0, us, self.P_stage, self.p_final)
        return X, float(J[0, 0])

    def rollout_policy(self, xs_ref, us_ref, k, K, alpha, lower, upper, x0, shift=None):
        T, nx, nu = self.T, self.nx, self.nu
        ev = self._rollout_cl
        x0b, Z, P, pT, a = ev.args   # filled in place: Z = [xs_ref, us_ref, k, K, lower, upper, shift] per stage
        o, q = nx + 2 * nu, nx + 2 * nu + nu * nx
        x0b.reshape(-1)[...] = x0
        Z[:, :nx] = xs_ref[:T]
        Z[:, nx:nx + nu] = us_ref
        Z[:, nx + nu:o] = k
        Z[:, o:q] = K.reshape(T, nu * nx)
        Z[:, q:q + nu] = -np.inf if lower is None else lower
        Z[:, q + nu:q + 2 * nu] = np.inf if upper is None else upper
        Z[:, q + 2 * nu:] = 0.0 if shift is None else shift
        P[...] = self.P_stage
        pT.reshape(-1)[...] = self.p_final
        a[...] = alpha
        X, U, J = ev.evaluate()
        return X, U, float(J[0, 0])

    # -- derivatives ----------------------------------------------------------------------------
    def derivatives(self, xs, us, second_order):
        T, nx, nu = self.T, self.nx, self.nu
        fn = self._d2 if second_order else self._d1
        D = fn(xs[:T], us, self.P_stage)[0]                    # (T, n_out)
        dT = self._dT(xs[T], self.P[T])[0].ravel()
        o = self._offsets  # column blocks of D, one per derivative (np.split costs ~15 us here)
        n1 = self._n1
        blocks = list(range(n1)) + (list(range(n1, len(o) - 1)) if second_order else [])
        parts = [D[:, o[i]:o[i + 1]] for i in blocks]
        lx = np.empty((T + 1, nx))
        lxx = np.empty((T + 1, nx, nx))
        lx[:T], lx[T] = parts[4], dT[1:1 + nx]
        q = 1 + nx + nx * nx
        lxx[:T], lxx[T] = parts[6].reshape(T, nx, nx), dT[1 + nx:q].reshape(nx, nx)
        kw = {}
        if second_order:
            kw = dict(fxx=parts[n1].reshape(T, nx, nx, nx), fux=parts[n1 + 1].reshape(T, nx, nu, nx),
                      fuu=parts[n1 + 2].reshape(T, nx, nu, nu))
        ng, nT = self.ng, self.nterm
        if ng:
            kw.update(g=parts[9], gx=parts[10].reshape(T, ng, nx), gu=parts[11].reshape(T, ng, nu))
            if second_order:
                kw.update(gxx=parts[n1 + 3].reshape(T, ng, nx, nx), gux=parts[n1 + 4].reshape(T, ng, nu, nx),
                          guu=parts[n1 + 5].reshape(T, ng, nu, nu))
        if nT:
            kw.update(h=dT[q:q + nT].copy(), hx=dT[q + nT:q + nT + nT * nx].reshape(nT, nx))
            if second_order:
                kw.update(hxx=dT[q + nT + nT * nx:].reshape(nT, nx, nx))
        return DenseDerivatives(
            f=parts[0], l=parts[1][:, 0], lf=float(dT[0]), fx=parts[2].reshape(T, nx, nx),
            fu=parts[3].reshape(T, nx, nu), lx=lx, lu=parts[5], lxx=lxx, lux=parts[7].reshape(T, nu, nx),
            luu=parts[8].reshape(T, nu, nu), **kw)

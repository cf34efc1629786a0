"""The one network local model: one backward sweep for networks, two sources of Q terms.

:class:`NetworkLocalModel` implements :class:`occore.types.LocalModel` for every network problem.
Its ``backward(mu)`` is one per-stage Bellman sweep, stages T-1 .. 0::

    V' = source.begin(mu)                  the terminal value (V_x, V_xx of the loss)
    for t = T-1 .. 0:
        q    = source.q_terms(t, V')       Q_u, Q_uu, Q_ux, Q_xx of stage t (None: no gradient,
                                           no step, V' passes through)
        step = source.solve(t, q)          the regularised solve (mu), raises NotPositiveDefinite
        k_t  = source.feedforward(t, q, step)
        K_t  = gains.hold(source, t, q, step)       dense matrices or factorised operators
        V'   = source.value_update(t, q, step)      the regularised value update

parametrised by (a) where Q_uu / Q_ux / V_xx come from, the *Q source*, and (b) how the gains are
held, :class:`DenseGains` (matrices: the oracle, small networks) or :class:`FactorisedGains`
(operators of the measured input deviation, Proposition 3 of DDPNOpt). Two Q sources:

- :class:`ExactQ` (this module): exact (``second_order=True``) or Gauss-Newton batched DDP of a
  :class:`~nn_adapter.NetworkProblem`, full batch, described below; dense gains.
- :class:`nn_adapter.minibatch.CurvatureQ`: DDPNOpt's minibatch, Q_uu = P^-1 the running estimate
  of a curvature (SGD-momentum, RMSprop, Adam, EKFAC), per-sample value Hessians in factored form;
  dense per-sample or factorised gains.

``mu`` is occore's Levenberg-Marquardt regularisation (:meth:`occore.types.LocalModel.backward`);
where it enters is the Q source's: ExactQ adds mu I to Q_uu (the control form), CurvatureQ adds
mu I to the value Hessian at each module output where it enters the gains (the state form; its
Q_uu is the curvature's). occore's solver raises mu until ``solve`` succeeds either way.

ExactQ: the state of stage t is the whole batch's activation X_t = (x_t^(1), ..., x_t^(B)), of size
B n_t; the control u_t (the stage's parameters, m_t numbers) is shared by all samples. The dynamics
act sample by sample, so F_x is block diagonal with the per-sample Jacobians f_x^(i) (n_{t+1}, n_t);
F_u stacks the per-sample f_u^(i) (n_{t+1}, m_t). The terminal cost Phi(X_T) is the loss of the
batch (with a mean loss every V_x carries its 1/B), the running cost l_t(u) = wd/2 |u|^2.

What "per-sample V_x, V_xx" means here (the choice is exact batched DDP, the paper's vanilla DDP,
whose cost "grows cubic w.r.t. BX"; Liu et al. 2021, digest sections A-B):

- V_x^(i) is the i-th block of the gradient of the batch value function, held as a (B, n_t) tensor.
  It equals the autograd gradient dJ/dx_t^(i) where Q_u = 0 downstream (and in the limit mu -> inf);
  elsewhere it is Q_x - Q_ux^T Q_uu^-1 Q_u, as DDP prescribes.
- V_xx is the full (B n_t, B n_t) Hessian of the batch value function. Because the shared control
  couples the samples, V_xx = Q_xx - Q_ux^T Q_uu^-1 Q_ux has cross-sample blocks
  -Q_ux^(i)T Q_uu^-1 Q_ux^(j); the per-sample V_xx^(i) of DDPNOpt's Algorithm 3 is the diagonal
  block (i, i), and DDPNOpt's approximation is to drop the rest. ``value_hessian="per_sample"``
  drops them here too (V_xx block diagonal), to serve as the dense oracle of that approximation.
  V_xx is held exactly but factored, per-sample blocks plus a coupling of rank sum_{s>=t} m_s
  (:class:`~nn_adapter.value_hessian.ValueHessian`), and stored densely once that rank reaches
  B n_t; a loss that couples samples starts it dense.
- Q_u = l_u + sum_i f_u^(i)T V_x^(i), Q_uu = l_uu + sum_{i,j} f_u^(i)T V_xx^(ij) f_u^(j) (dense,
  m_t x m_t), Q_ux (m_t, B n_t), Q_xx (B n_t, B n_t). With ``second_order=True`` the dynamics'
  second derivatives enter contracted with V_x: per sample, V_x^(i) . f_xx^(i), f_ux^(i), f_uu^(i)
  (summed over samples for Q_uu).
- Regularisation: gains from Q_uu + mu I (Levenberg-Marquardt on the controls),
  k = -(Q_uu + mu I)^-1 Q_u, K = -(Q_uu + mu I)^-1 Q_ux, and the value update with the
  unregularised terms (Tassa, Erez & Todorov 2012, eq. 11):
  V_x = Q_x + K^T Q_uu k + K^T Q_u + Q_ux^T k, V_xx = Q_xx + K^T Q_uu K + K^T Q_ux + Q_ux^T K.

x_0 (the inputs) is fixed, so V_xx and Q_xx of stage 0 are computed only when recorded.
Memory is estimated before anything large is allocated (:func:`memory_estimate`); beyond the
problem's ``memory_limit`` a :class:`~nn_adapter.errors.MemoryLimitError` names the estimate.
"""
from __future__ import annotations

import logging
import math

import torch
from torch.func import jacrev, vmap

from occore.errors import InputError, NotPositiveDefinite
from occore.types import Policy

from .errors import MemoryLimitError, UnsupportedModuleError
from .value_hessian import ValueHessian

logger = logging.getLogger("nn_adapter")

__all__ = ["NetworkLocalModel", "ExactQ", "DenseGains", "FactorisedGains", "memory_estimate"]


def memory_estimate(batch: int, state_sizes, control_sizes, itemsize: int,
                    second_order: bool = False, value_hessian: str = "batch") -> int:
    """Bytes the backward pass needs at its peak: the stored Jacobians and gains plus the largest
    per-stage temporaries, with the value Hessians in factored form
    (:class:`~nn_adapter.value_hessian.ValueHessian`, coupling rank r_t = sum_{s >= t} m_s, dense
    once that reaches B n_t) and a separable loss.

    Args:
        batch: B.
        state_sizes: n_0..n_T (per-sample state sizes).
        control_sizes: m_0..m_{T-1}.
        itemsize: bytes per number (8 for float64).
        second_order: include the dynamics second derivatives.
        value_hessian: "batch" (with the coupling) or "per_sample" (blocks only).

    Example:
        >>> memory_estimate(2, [3, 2], [8], 8) > 0
        True
    """
    B, n, m = batch, list(state_sizes), list(control_sizes)
    T = len(m)

    def value(t):   # numbers of the value Hessian at boundary t
        size = B * n[t] ** 2
        if value_hessian == "batch" and t < T:
            r = sum(m[t:])
            size += (B * n[t]) ** 2 if r >= B * n[t] else r * (B * n[t] + r)
        return size

    # Jacobians, gains (no K_0: x_0 is fixed) and the terminal derivatives
    stored = sum(B * n[t + 1] * (n[t] + m[t]) + m[t] for t in range(T))
    stored += sum(m[t] * B * n[t] for t in range(1, T)) + value(T) + B * n[T]
    peak = 0
    for t in range(T):
        tmp = value(t + 1) + 3 * B * n[t + 1] * m[t] + 4 * m[t] ** 2   # + Jacobian temporaries
        if t > 0:
            tmp += 2 * value(t) + 2 * m[t] * B * n[t]
        if second_order:
            tmp += m[t] ** 2 + m[t] * B * n[t + 1] + (B * n[t] ** 2 + 2 * m[t] * B * n[t] if t > 0 else 0)
        peak = max(peak, tmp)
    return int((stored + peak) * itemsize)


class DenseGains:
    """Gains held as matrices: K_t (m_t, B n_t) of exact batched DDP (:class:`ExactQ`, columns:
    the flattened batch state, so per sample K^(i) is a column block), or DDPNOpt's per-sample
    Q_ux^(i) / mu_i (B, m_t, n_t) behind an operator of the measured input
    (:class:`~nn_adapter.minibatch.CurvatureQ`). For the oracle and small networks."""

    def hold(self, source, t: int, q, step):
        """Stage t's gain, from the Q source's dense form (None where there is no feedback)."""
        return source.dense_gain(t, q, step)


class FactorisedGains:
    """Gains held factorised: operators of the measured input deviation that never form the
    per-sample matrices (DDPNOpt's Proposition 3: one weight-gradient-sized product per stage)."""

    def hold(self, source, t: int, q, step):
        """Stage t's gain operator, from the Q source (None where there is no feedback)."""
        return source.gain_operator(t, q, step)


class NetworkLocalModel:
    """The network local model at one trajectory: one backward sweep (see the module docstring).

    Implements :class:`occore.types.LocalModel`; everything but the sweep loop is the Q source's.

    Args:
        source: the Q source (:class:`ExactQ` or :class:`~nn_adapter.minibatch.CurvatureQ`).
        gains: :class:`DenseGains` or :class:`FactorisedGains`.

    Attributes:
        record, values: the Q source's records after ``backward(..., record=True)``
            (:class:`ExactQ` only; None otherwise).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from nn_adapter import NetworkProblem
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> prob = NetworkProblem(net, nn.MSELoss(), torch.randn(5, 2, dtype=torch.float64),
        ...                       torch.randn(5, 1, dtype=torch.float64))
        >>> lm = prob.local_model(prob.rollout(prob.initial_controls()))
        >>> type(lm.source).__name__, type(lm.gains).__name__
        ('ExactQ', 'DenseGains')
        >>> policy, (d1, d2) = lm.backward(mu=1e-3)
        >>> policy.K[0] is None, tuple(policy.K[1].shape), d1 < 0    # x_0 is fixed: no K_0
        (True, (4, 15), True)
    """

    def __init__(self, source, gains):
        self.source, self.gains = source, gains

    def backward(self, mu: float, second_order: bool = False, *, record: bool = False):
        """The Bellman sweep, stages T-1 .. 0, regularised by ``mu`` (where it enters: the
        source's, see the module docstring).

        Args:
            mu: Levenberg-Marquardt regularisation >= 0.
            second_order: include the dynamics' second derivatives (DDP rather than iLQR).
            record: keep the Q terms and value functions of every stage (:class:`ExactQ`).

        Returns:
            (Policy, (d1, d2)): the source's feedforward terms, the gains as held, and the
            expected-decrease terms (NaN where the source does not compute them).

        Raises:
            NotPositiveDefinite: the regularised solve failed at some stage.
        """
        src = self.source
        T = src.horizon
        ks, Ks = [None] * T, [None] * T
        with torch.no_grad():
            value = src.begin(float(mu), bool(second_order), record)
            for t in range(T - 1, -1, -1):
                q = src.q_terms(t, value)
                if q is None:             # no gradient at this stage: no step, V passes through
                    continue
                step = src.solve(t, q)
                ks[t] = src.feedforward(t, q, step)
                Ks[t] = self.gains.hold(src, t, q, step)
                value = src.value_update(t, q, step)
            expected = src.end()
        return Policy(k=ks, K=Ks), expected

    @property
    def record(self):
        return getattr(self.source, "record", None)

    @property
    def values(self):
        return getattr(self.source, "values", None)

    def costates(self):
        """Costates p_0..p_T of the adjoint sweep (the source's)."""
        return self.source.costates()

    def control_gradient(self) -> list:
        """dJ/du_t for every stage (the source's)."""
        return self.source.control_gradient()

    def gradient_norm(self) -> float:
        """Euclidean norm of :meth:`control_gradient` over all stages."""
        return self.source.gradient_norm()

    def memory_estimate(self, second_order: bool = False) -> int:
        """Bytes the backward pass needs (:meth:`ExactQ.memory_estimate`)."""
        return self.source.memory_estimate(second_order)


class ExactQ:
    """Q terms of exact / Gauss-Newton batched DDP of a :class:`~nn_adapter.NetworkProblem` at a
    trajectory (the Q source of :class:`NetworkLocalModel`; see the module docstring).

    Everything is lazy: the costates and the control gradient cost one backward pass
    (vector-Jacobian products, what E-MSA needs); the per-sample Jacobians are computed on the
    first backward sweep.

    Args:
        problem: the NetworkProblem.
        traj: a trajectory of it (xs: T+1 tensors (B, ...), us: T parameter dicts).
        value_hessian: "batch" (exact, dense V_xx with cross-sample blocks) or "per_sample"
            (block-diagonal V_xx, DDPNOpt's per-sample recursion with the exact shared Q_uu).

    Attributes:
        record: after ``backward(..., record=True)``, one dict per stage t = 0..T-1 with
            Qx (B, n_t), Qu (m_t,), Qxx (B n_t, B n_t), Qux (m_t, B n_t), Quu (m_t, m_t), and
            Vx (B, n_{t+1}), Vxx of the next boundary (for tests and small problems: the value
            Hessians are materialised, densely, or as (B, n, n) blocks with "per_sample").
        values: after ``record=True``, (Vx, Vxx) at every boundary t = 0..T.
    """

    def __init__(self, problem, traj, value_hessian: str = "batch"):
        if value_hessian not in ("batch", "per_sample"):
            raise ValueError(f"value_hessian={value_hessian!r}: expected 'batch' or 'per_sample'")
        self.problem = problem
        self.traj = traj
        self.value_hessian = value_hessian
        self.B = traj.xs[0].shape[0]
        self.n = [int(math.prod(x.shape[1:])) for x in traj.xs]
        self.m = [sum(v.numel() for v in u.values()) for u in traj.us]
        self._adjoint = None
        self._jac = None
        self._terminal = None
        self.horizon = len(self.m)
        self.record = None
        self.values = None

    # -- first order: costates and control gradient (one backward pass) --------------------------
    def _adjoint_sweep(self):
        if self._adjoint is None:
            prob, xs, us = self.problem, self.traj.xs, self.traj.us
            with torch.enable_grad():
                xT = xs[-1].detach().requires_grad_(True)
                (gT,) = torch.autograd.grad(prob.loss_fn(xT, prob.targets), xT)
                ps, grads = [None] * len(xs), [None] * len(us)
                ps[-1] = -gT
                for t in range(len(us) - 1, -1, -1):
                    stage = prob.stages[t]
                    x = xs[t].detach().requires_grad_(xs[t].is_floating_point())
                    u = {k: v.detach().requires_grad_(True) for k, v in us[t].items()}
                    out = stage.forward(u, x)
                    inputs = list(u.values()) + ([x] if x.requires_grad else [])
                    g = torch.autograd.grad(out, inputs, grad_outputs=ps[t + 1])
                    wd = prob.weight_decay
                    grads[t] = {k: (wd * us[t][k] if wd else 0) - gk for k, gk in zip(u, g)}
                    ps[t] = g[-1] if x.requires_grad else torch.zeros_like(xs[t])
            self._adjoint = (ps, grads)
        return self._adjoint

    def costates(self) -> list:
        """p_0..p_T, tensors shaped like the states: p_T = -dPhi/dX_T, p_t = f_x^T p_{t+1}
        (= -dJ/dx_t, per sample)."""
        return self._adjoint_sweep()[0]

    def control_gradient(self) -> list:
        """dJ/du_t for every stage: one dict per stage, shaped like the parameters."""
        return self._adjoint_sweep()[1]

    def gradient_norm(self) -> float:
        """Euclidean norm of :meth:`control_gradient` over all stages."""
        sq = sum((g * g).sum() for d in self.control_gradient() for g in d.values())
        return float(torch.as_tensor(sq).sqrt().item())

    # -- derivatives --------------------------------------------------------------------------
    def _flat_stage(self, t):
        """f(x, u_flat) for one sample: flat output (n_{t+1},)."""
        stage, us = self.problem.stages[t], self.traj.us[t]
        names = list(us)
        shapes = [us[k].shape for k in names]
        sizes = [us[k].numel() for k in names]
        xshape = self.traj.xs[t].shape[1:]

        def f(x, u):
            params = {k: c.view(s) for k, c, s in zip(names, torch.split(u, sizes), shapes)}
            return stage.forward(params, x.view(1, *xshape)).reshape(-1)
        return f

    def flat_controls(self, t) -> torch.Tensor:
        """u_t flattened (m_t,), parameters in ``param_names`` order."""
        return torch.cat([v.reshape(-1) for v in self.traj.us[t].values()])

    def _jacobians(self):
        """Per-sample f_x (B, n_{t+1}, n_t) and f_u (B, n_{t+1}, m_t) of every stage."""
        if self._jac is None:
            jac = []
            for t in range(len(self.m)):
                x = self.traj.xs[t].detach().reshape(self.B, -1)
                u = self.flat_controls(t).detach()
                try:
                    fx, fu = vmap(jacrev(self._flat_stage(t), argnums=(0, 1)), in_dims=(0, None))(x, u)
                except RuntimeError as err:     # the stage runs, but not under torch.func.vmap
                    stage = self.problem.stages[t]
                    modules = ", ".join(f"{n!r} ({type(m).__name__})"
                                        for n, m in zip(stage.names, stage.modules))
                    raise UnsupportedModuleError(
                        f"stage {t} (modules {modules}): exact DDP and iLQR take its per-sample "
                        f"Jacobians with torch.func (vmap of jacrev), which fails on it: {err}. "
                        "occore.EMSA does not need them; or write the module with operations "
                        "torch.func can batch") from err
                jac.append((fx, fu))
            self._jac = jac
        return self._jac

    def _terminal_derivatives(self):
        """V_x (B n_T,) and the :class:`ValueHessian` of the terminal cost.

        The per-sample blocks come from n_T Hessian-vector products (direction a in every sample
        at once), which is exact when the loss is a sum over samples; one more product with a
        random direction checks that. A loss that couples samples gets its dense Hessian.
        """
        if self._terminal is None:
            prob, xT = self.problem, self.traj.xs[-1].detach()
            B, nT, shape = self.B, self.n[-1], xT.shape

            def phi(z):
                return prob.loss_fn(z.view(shape), prob.targets)
            z = xT.reshape(B, nT)
            Vx, hvp = torch.func.vjp(torch.func.grad(phi), z)     # hvp(v) = (H v,) (H symmetric)
            eye = torch.eye(nT, dtype=z.dtype, device=z.device)
            gen = torch.Generator(device=z.device).manual_seed(0)
            r = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
            dirs = torch.cat([eye[:, None, :].expand(nT, B, nT), r[None]])
            Hd = vmap(hvp)(dirs)[0]                               # (nT + 1, B, nT)
            D = Hd[:nT].permute(1, 2, 0).contiguous()             # D[i, b, a] = H[(i, b), (i, a)]
            Hr, Dr = Hd[nT], torch.bmm(D, r[:, :, None])[:, :, 0]
            tol = 10 * torch.finfo(z.dtype).eps ** 0.5
            separable = bool(torch.linalg.norm(Hr - Dr) <= tol * (torch.linalg.norm(Hr) + 1e-300))
            if separable:
                V = ValueHessian(0.5 * (D + D.transpose(1, 2)))
            else:
                self._check_memory((B * nT) ** 2 * z.element_size(),
                                   "the loss couples the samples: dense Hessian")
                S = jacrev(jacrev(phi))(z.reshape(-1))
                V = ValueHessian(torch.zeros_like(D), None, 0.5 * (S + S.T))
                if self.value_hessian == "per_sample":
                    V = ValueHessian(V.blocks())
            self._terminal = (Vx.reshape(-1), V)
        return self._terminal

    def _check_memory(self, estimate: int, what: str) -> None:
        limit = self.problem.memory_limit
        if limit is not None and estimate > limit:
            raise MemoryLimitError(estimate, limit, f"{what}; batch {self.B}, states {self.n}, "
                                   f"controls {self.m}")

    def _second_order_terms(self, t, Vx_next, need_x):
        """Dynamics second derivatives contracted with V_x': with H(X, u) = sum_i V_x'^(i) . f(x^(i), u),
        Huu = d2H/du2 (m, m) and Hux = d2H/du dX (m, B n) from m double-backward passes through
        the batched stage, and per-sample Hxx^(i) (B, n, n); the x terms only when ``need_x``
        (x_0 is fixed)."""
        stage, us = self.problem.stages[t], self.traj.us[t]
        names, shape = list(us), self.traj.xs[t].shape
        sizes = [us[k].numel() for k in names]
        x = self.traj.xs[t].detach().reshape(self.B, -1)
        u = self.flat_controls(t).detach()
        v = Vx_next.reshape(self.B, -1)

        def H(X, u1):                            # the whole batch at once
            params = {k: c.view(us[k].shape) for k, c in zip(names, torch.split(u1, sizes))}
            return (v * stage.forward(params, X.view(shape)).reshape(self.B, -1)).sum()
        grad_u = jacrev(H, argnums=1)
        if not need_x:
            return None, None, jacrev(grad_u, argnums=1)(x, u)
        hux, huu = jacrev(grad_u, argnums=(0, 1))(x, u)
        f = self._flat_stage(t)

        def h(x1, u1, v1):                       # one sample
            return torch.dot(v1, f(x1, u1))
        hxx = vmap(jacrev(jacrev(h)), in_dims=(0, None, 0))(x, u, v)
        return hxx, hux.reshape(hux.shape[0], -1), huu

    def memory_estimate(self, second_order: bool = False) -> int:
        """Bytes the backward pass needs (see :func:`memory_estimate`)."""
        itemsize = self.traj.xs[-1].element_size()
        return memory_estimate(self.B, self.n, self.m, itemsize, second_order, self.value_hessian)

    # -- the Q source protocol (the sweep loop is NetworkLocalModel.backward) --------------------
    def begin(self, mu: float, second_order: bool, record: bool):
        """Check the memory estimate; the terminal (V_x (B n_T,), ValueHessian).

        Raises:
            MemoryLimitError: the estimate exceeds the problem's ``memory_limit``.
        """
        estimate = self.memory_estimate(second_order)
        logger.debug("network local model: about %.1f MiB (batch %d, states %s, controls %s)",
                     estimate / 2**20, self.B, self.n, self.m)
        self._check_memory(estimate, "exact batched DDP")
        self.mu, self.second_order, self._recording = mu, second_order, record
        self._jacobians()
        self._d = [0.0, 0.0]
        T = self.horizon
        self._records, self._values = [None] * T, [None] * (T + 1)
        Vx, V = self._terminal_derivatives()
        if record:
            self._values[T] = (Vx.view(self.B, -1), self._materialise(V))
        return Vx, V

    def q_terms(self, t: int, value) -> dict:
        """Qu (m,), Quu (m, m) and, where the state is needed (t > 0, or recording), Qx (B, n),
        Qux (m, B n), from the next boundary's (V_x, V_xx); with ``second_order`` the dynamics'
        second derivatives contracted with V_x. Q_xx is formed in :meth:`value_update`."""
        Vx, V = value
        B = self.B
        fx, fu = self._jac[t]                 # (B, n', n), (B, n', m)
        n1, m = fx.shape[1], fu.shape[2]
        eye = torch.eye(m, dtype=fu.dtype, device=fu.device)
        Fu = fu.reshape(B * n1, m)
        VFu = V.apply(fu)                     # V' F_u, (B, n', m)
        need_x = t > 0 or self._recording     # x_0 is fixed: K_0, V_x(0), V_xx(0) unused
        q = dict(Vx=Vx, V=V, fx=fx, eye=eye, need_x=need_x, hxx=None)
        q["Qu"] = Fu.T @ Vx
        q["Quu"] = Fu.T @ VFu.reshape(B * n1, m)
        if need_x:
            q["Qx"] = torch.einsum("ian,ia->in", fx, Vx.view(B, n1))
            q["Qux"] = torch.einsum("iam,ian->min", VFu, fx).reshape(m, -1)   # (V' F_u)^T F_x
        del VFu
        wd = self.problem.weight_decay
        if wd:
            q["Qu"] = q["Qu"] + wd * self.flat_controls(t)
            q["Quu"] = q["Quu"] + wd * eye
        if self.second_order:
            hxx, hux, huu = self._second_order_terms(t, Vx, need_x)
            q["Quu"] = q["Quu"] + huu
            q["hxx"] = hxx
            if need_x:
                q["Qux"] = q["Qux"] + hux
        q["Quu"] = 0.5 * (q["Quu"] + q["Quu"].T)
        return q

    def solve(self, t: int, q) -> dict:
        """The control form: Cholesky L of Q_uu + mu I, k = -(Q_uu + mu I)^-1 Q_u and, where the
        state is needed, K = -(Q_uu + mu I)^-1 Q_ux; accumulates d1 = Q_u.k, d2 = k.Q_uu.k."""
        Qu, Quu = q["Qu"], q["Quu"]
        L, info = torch.linalg.cholesky_ex(Quu + self.mu * q["eye"])
        if int(info) != 0:
            raise NotPositiveDefinite(t)
        k = -torch.cholesky_solve(Qu[:, None], L)[:, 0]
        Quu_k = Quu @ k
        self._d[0] += float(Qu @ k)
        self._d[1] += float(k @ Quu_k)
        K = -torch.cholesky_solve(q["Qux"], L) if q["need_x"] else None
        return dict(L=L, k=k, Quu_k=Quu_k, K=K)

    def feedforward(self, t: int, q, step) -> dict:
        """k_t as a parameter dict."""
        return self.problem.unflatten(t, step["k"])

    def dense_gain(self, t: int, q, step):
        """K_t (m_t, B n_t), or None at t = 0 (x_0 never deviates) unless recording."""
        return step["K"]

    def gain_operator(self, t: int, q, step):
        """Not held factorised: exact batched DDP's gains are the dense K_t."""
        raise InputError("ExactQ holds its gains as matrices (DenseGains)")

    def value_update(self, t: int, q, step):
        """(V_x, V_xx) at boundary t with the unregularised Q terms (Tassa, Erez & Todorov 2012,
        eq. 11); V_xx factored (:class:`~nn_adapter.value_hessian.ValueHessian`). (None, None)
        where the state is not needed (t = 0)."""
        if not q["need_x"]:
            return None, None
        B, n = self.B, self.n[t]
        Qux, Quu, L, k, K = q["Qux"], q["Quu"], step["L"], step["k"], step["K"]
        Vx_new = q["Qx"].reshape(-1) + K.T @ (step["Quu_k"] + q["Qu"]) + Qux.T @ k
        Hinv = torch.cholesky_inverse(L)
        M = Hinv @ Quu @ Hinv - 2 * Hinv   # K'Quu K + K'Qux + Qux'K = Qux' M Qux
        Qxx = q["V"].pullback(q["fx"], q["hxx"])
        V_new = Qxx.add_low_rank(Qux, 0.5 * (M + M.T), self.value_hessian == "per_sample")
        if self._recording:
            self._records[t] = dict(Qx=q["Qx"], Qu=q["Qu"], Qxx=self._materialise(Qxx), Qux=Qux,
                                    Quu=Quu, Vx=q["Vx"].view(B, -1),
                                    Vxx=self._materialise(q["V"]))
            self._values[t] = (Vx_new.view(B, n), self._materialise(V_new))
        return Vx_new, V_new

    def end(self) -> tuple[float, float]:
        """Publish the records (when recording); (d1, d2)."""
        if self._recording:
            self.record, self.values = self._records, self._values
        return self._d[0], self._d[1]

    def _materialise(self, V):
        """A recorded value Hessian: dense (B n, B n), or its blocks (B, n, n) per sample."""
        return V.blocks() if self.value_hessian == "per_sample" else V.dense()

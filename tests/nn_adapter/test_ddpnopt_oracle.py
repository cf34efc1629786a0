"""A dense per-sample DDP oracle for DDPNOpt's feedback, written with torch.func (tests only).

For every sample it materialises the stage Jacobians f_x, f_u, the Q terms, the gains
K^(i) = -P Q_ux^(i) / mu_i and the value Hessians V_xx = Q_xx - Q_ux^T P Q_ux / mu_i, with mu_i
the smallest factor >= 1 that makes the sample's local model convex (its Q_uu = mu_i P^-1), P
being the optimizer's inverse curvature materialised as a dense matrix. Then it runs Algorithm 3's
additional forward pass. Independent of nn_adapter.feedback except for P.
"""
import torch
from torch.func import functional_call, jacrev, hessian

from nn_adapter.feedback import precondition


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat(vec, like):
    out, i = [], 0
    for t in like:
        out.append(vec[i:i + t.numel()].reshape(t.shape))
        i += t.numel()
    return out


def dense_P(view, factors):
    """P of one stage as an (m, m) matrix over the flattened stage parameters (block order)."""
    params = view.params
    m = sum(p.numel() for p in params)
    eye = torch.eye(m, dtype=params[0].dtype)
    cols = [_flat(precondition(view, factors, _unflat(eye[j], params))) for j in range(m)]
    return torch.stack(cols, 1)


def convexifying_mu(P, qxx, qux):
    """The smallest mu >= 1 with [[Q_xx, Q_xu], [Q_ux, mu P^-1]] positive semi-definite:
    mu = lambda_max(Q_ux Q_xx^+ Q_xu P) (the Schur complement in u must be >= 0)."""
    m = qux @ torch.linalg.pinv(qxx, hermitian=True, rtol=1e-10) @ qux.T @ P
    return max(1.0, torch.linalg.eigvals(m).real.max().item())


def stage_fn(stage, names, flat_u, shapes, x):
    """f_t for one sample x (no batch dim) with flattened controls."""
    params = dict(zip(names, _unflat(flat_u, shapes)))
    y = functional_call(stage.modules[0], params, (x[None],))
    for m in stage.modules[1:]:
        y = m(y)
    return y[0]


def dense_step(stages, pre, u_nominal, u_base, P, inputs, per_sample_loss, terminal="gradient",
               eps_vxx=0.0, vxx_update=True):
    """Parameters after one DDPNOpt step computed densely, per sample.

    Args:
        stages: the Stage list; pre: the pre modules.
        u_nominal: list (per stage) of flattened nominal controls.
        u_base: list of flattened u + k (the base optimizer's result).
        P: list of dense (m_t, m_t) inverse curvatures.
        inputs: the batch (B, ...).
        per_sample_loss: phi(y_T, i) for one sample's output and its index.
        terminal: the terminal value Hessian, from the loss Hessian H (for cross-entropy on the
            output, its Gauss-Newton matrix): "gradient" (V_x V_x^T), "exact" / "gauss_newton"
            (H), "projected" ((V_x^T H V_x / |V_x|^4) V_x V_x^T), or a callable
            ``(vx, H, i) -> V_xx^T``.
    Returns:
        list of flattened new controls per stage.
    """
    T = len(stages)
    names = [s.param_names for s in stages]
    shapes = [[p.detach() for p in s.params().values()] for s in stages]
    x0 = inputs
    for m in pre:
        x0 = m(x0)
    B = x0.shape[0]
    gains = [[None] * B for _ in range(T)]
    for i in range(B):
        xs = [x0[i]]
        for t, s in enumerate(stages):
            xs.append(stage_fn(s, names[t], u_nominal[t], shapes[t], xs[-1]).detach())
        phi = lambda y: per_sample_loss(y, i)  # noqa: E731
        vx = jacrev(phi)(xs[-1]).reshape(-1)
        H = hessian(phi)(xs[-1]).reshape(vx.numel(), vx.numel())
        if callable(terminal):
            vxx = terminal(vx, H, i)
        elif terminal in ("exact", "gauss_newton"):
            vxx = H
        elif terminal == "projected":
            vxx = (vx @ H @ vx) / (vx @ vx) ** 2 * torch.outer(vx, vx)
        else:
            vxx = torch.outer(vx, vx)
        for t in range(T - 1, -1, -1):
            f = lambda xx, uu: stage_fn(stages[t], names[t], uu, shapes[t], xx).reshape(-1)  # noqa
            fx = jacrev(f, 0)(xs[t], u_nominal[t]).reshape(-1, xs[t].numel())
            fu = jacrev(f, 1)(xs[t], u_nominal[t])
            qxx, qux = fx.T @ vxx @ fx, fu.T @ vxx @ fx
            mu = convexifying_mu(P[t], qxx, qux) if vxx_update else 1.0
            gains[t][i] = -P[t] @ qux / mu
            vxx = qxx - qux.T @ P[t] @ qux / mu if vxx_update else qxx
            vxx = 0.5 * (vxx + vxx.T)
            evals, evecs = torch.linalg.eigh(vxx)
            vxx = (evecs * evals.clamp(min=0.0)) @ evecs.T
            if eps_vxx:
                vxx = vxx + eps_vxx * torch.eye(vxx.shape[0], dtype=vxx.dtype)
    new = []
    xhat = x0
    for t, s in enumerate(stages):
        x_nom = x0 if t == 0 else x_nom_next
        du = sum(gains[t][i] @ (xhat[i] - x_nom[i]).reshape(-1) for i in range(B)) / B
        u_new = u_base[t] + du
        new.append(u_new)
        x_nom_next = torch.stack([stage_fn(s, names[t], u_nominal[t], shapes[t], x_nom[i])
                                  for i in range(B)]).detach()
        xhat = torch.stack([stage_fn(s, names[t], u_new, shapes[t], xhat[i])
                            for i in range(B)]).detach()
    return new

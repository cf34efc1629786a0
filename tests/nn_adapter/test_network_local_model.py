"""The network local model against independent dense oracles (float64, 1e-10).

Oracle A: the batched problem with the whole batch flattened into one state; every Jacobian and
Hessian from torch.func on the flattened stage maps (no per-sample structure), and a plain dense
Riccati recursion. Oracle B (Gauss-Newton): the value function of the batched LQ tail problem by
condensing (Schur complement of the quadratic model in (dx_t, du_t..du_{T-1})). Oracle C: autograd
gradients of J.
"""
import pytest
import torch
from torch import nn
from torch.func import jacrev

import occore
from nn_adapter import DDPNOpt, NetworkLocalModel, NetworkProblem, UnsupportedModuleError
from nn_adapter.errors import MemoryLimitError
from occore.errors import NotPositiveDefinite

TOL = dict(rtol=1e-10, atol=1e-10)


def hessian(f, argnums=0):
    """Reverse-over-reverse Hessian (torch.func.hessian's forward mode warns on this torch)."""
    return jacrev(jacrev(f, argnums=argnums), argnums=argnums)


def mlp():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    return net.double(), nn.CrossEntropyLoss(), x.double(), y


def cnn():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2))
    x, y = torch.randn(3, 1, 3, 3), torch.randn(3, 2)
    return net.double(), nn.MSELoss(), x.double(), y.double()


class Residual(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def resnet():
    """Conv1d, a BatchNorm stage (eval statistics) and a residual block as stages."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten(), nn.BatchNorm1d(4), nn.Softplus(),
                        Residual(4), nn.Linear(4, 2))
    net[2].running_mean.uniform_(-0.5, 0.5)
    net[2].running_var.uniform_(0.5, 2.0)
    net[2].weight.data.uniform_(0.5, 1.5)
    x, y = torch.randn(3, 1, 3), torch.tensor([1, 0, 1])
    return net.double().eval(), nn.CrossEntropyLoss(), x.double(), y


def prelu_net():
    """PReLU as a stage (one slope per channel) and frozen, as a follower: torch's own prelu
    fails under the per-sample vmap(jacrev) of the local model."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv1d(1, 2, 2), nn.PReLU(2), nn.Flatten(), nn.Linear(4, 3),
                        nn.PReLU(), nn.Linear(3, 2))
    net[1].weight.data = torch.tensor([0.2, -0.4])
    net[4].requires_grad_(False)
    x, y = torch.randn(3, 1, 3), torch.tensor([1, 0, 1])
    return net.double(), nn.CrossEntropyLoss(), x.double(), y


def wide():
    """B n larger than the coupling rank at every boundary: the factored V_xx path."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    return net.double(), nn.CrossEntropyLoss(), x.double(), y


def coupled():
    """A loss that couples the samples (centred outputs): a dense terminal Hessian."""
    net, _, x, _ = wide()
    y = torch.randn(8, 2, dtype=torch.float64)
    return net, lambda out, target: ((out - out.mean(0) - target) ** 2).mean() + out.sum() ** 2 / 50, x, y


class Dense:
    """Oracle A: flattened batched problem, torch.func derivatives, dense recursion."""

    def __init__(self, prob, traj):
        self.prob, self.traj = prob, traj
        self.T = prob.horizon

    def flat_u(self, t):
        return torch.cat([v.reshape(-1) for v in self.traj.us[t].values()])

    def F(self, t):
        stage, u0, shape = self.prob.stages[t], self.traj.us[t], self.traj.xs[t].shape

        def f(X, u):
            params, i = {}, 0
            for k, v in u0.items():
                params[k] = u[i:i + v.numel()].view(v.shape)
                i += v.numel()
            return stage.forward(params, X.view(shape)).reshape(-1)
        return f

    def phi(self, z):
        return self.prob.loss_fn(z.view(self.traj.xs[-1].shape), self.prob.targets)

    def sweep(self, mu, second_order, per_sample=False):
        B, wd = self.prob.batch_size, self.prob.weight_decay
        z = self.traj.xs[-1].reshape(-1)
        Vx, Vxx = torch.func.grad(self.phi)(z), hessian(self.phi)(z)
        out = [None] * self.T
        if per_sample:
            Vxx = Vxx * self.mask(Vxx.shape[0], B)
        for t in range(self.T - 1, -1, -1):
            X, u = self.traj.xs[t].reshape(-1), self.flat_u(t)
            f = self.F(t)
            Fx, Fu = jacrev(f, argnums=(0, 1))(X, u)
            m = u.numel()
            Qx = Fx.T @ Vx
            Qu = Fu.T @ Vx + wd * u
            Qxx = Fx.T @ Vxx @ Fx
            Qux = Fu.T @ Vxx @ Fx
            Quu = Fu.T @ Vxx @ Fu + wd * torch.eye(m, dtype=u.dtype)
            if second_order:
                (hxx, hxu), (hux, huu) = hessian(lambda X1, u1: Vx @ f(X1, u1), argnums=(0, 1))(X, u)
                Qxx, Qux, Quu = Qxx + hxx, Qux + hux, Quu + huu
            Hinv = torch.linalg.inv(Quu + mu * torch.eye(m, dtype=u.dtype))
            k, K = -Hinv @ Qu, -Hinv @ Qux
            out[t] = dict(Qx=Qx, Qu=Qu, Qxx=Qxx, Qux=Qux, Quu=Quu, k=k, K=K, Vx_next=Vx, Vxx_next=Vxx)
            Vx = Qx + K.T @ Quu @ k + K.T @ Qu + Qux.T @ k
            Vxx = Qxx + K.T @ Quu @ K + K.T @ Qux + Qux.T @ K
            if per_sample:
                Vxx = Vxx * self.mask(Vxx.shape[0], B)
            out[t].update(Vx=Vx, Vxx=Vxx)
        return out

    @staticmethod
    def mask(N, B):
        n = N // B
        return torch.block_diag(*[torch.ones(n, n, dtype=torch.float64)] * B)

    def tail(self, t):
        """X_T as a function of (X_t, w = u_t..u_{T-1} flattened)."""
        sizes = [self.flat_u(s).numel() for s in range(t, self.T)]

        def g(X, w):
            for s, ws in zip(range(t, self.T), torch.split(w, sizes)):
                X = self.F(s)(X, ws)
            return X
        w = torch.cat([self.flat_u(s) for s in range(t, self.T)])
        return g, w


def compare_record(lm, oracle, second_order):
    src = lm.source
    B = src.B
    for t, (r, o) in enumerate(zip(lm.record, oracle)):
        torch.testing.assert_close(r["Qx"].reshape(-1), o["Qx"], **TOL)
        torch.testing.assert_close(r["Qu"], o["Qu"], **TOL)
        torch.testing.assert_close(r["Quu"], o["Quu"], **TOL)
        torch.testing.assert_close(r["Qux"], o["Qux"], **TOL)
        Qxx = r["Qxx"]
        if src.value_hessian == "per_sample":
            Qxx = torch.block_diag(*Qxx)
        torch.testing.assert_close(Qxx, o["Qxx"], **TOL)
        Vx, Vxx = lm.values[t]
        torch.testing.assert_close(Vx.reshape(-1), o["Vx"], **TOL)
        if src.value_hessian == "per_sample":
            Vxx = torch.block_diag(*Vxx)
        torch.testing.assert_close(Vxx, o["Vxx"], **TOL)
        assert Vx.shape == (B, src.n[t])


@pytest.mark.parametrize("make", [mlp, cnn, resnet, wide, coupled, prelu_net])
@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("value_hessian", ["batch", "per_sample"])
def test_backward_matches_dense_oracle(make, second_order, value_hessian):
    net, loss, x, y = make()
    prob = NetworkProblem(net, loss, x, y, weight_decay=0.05, value_hessian=value_hessian)
    traj = prob.rollout(prob.initial_controls())
    lm = prob.local_model(traj, second_order)
    mu = 0.3 if make is mlp else 10.0   # some second-order Q_uu are indefinite below ~1
    policy, (d1, d2) = lm.backward(mu, second_order, record=True)
    oracle = Dense(prob, traj).sweep(mu, second_order, per_sample=value_hessian == "per_sample")
    compare_record(lm, oracle, second_order)
    d1o = sum(float(o["Qu"] @ o["k"]) for o in oracle)
    d2o = sum(float(o["k"] @ o["Quu"] @ o["k"]) for o in oracle)
    assert d1 == pytest.approx(d1o, rel=1e-10) and d2 == pytest.approx(d2o, rel=1e-10)
    for t, o in enumerate(oracle):
        k = torch.cat([v.reshape(-1) for v in policy.k[t].values()])
        torch.testing.assert_close(k, o["k"], **TOL)
        torch.testing.assert_close(policy.K[t], o["K"], **TOL)


@pytest.mark.parametrize("make", [mlp, cnn, resnet, wide, coupled])
def test_gauss_newton_value_is_the_batched_lq_value_function(make):
    """Oracle B: V_x, V_xx at every boundary = Schur complement of the condensed tail problem."""
    net, loss, x, y = make()
    prob = NetworkProblem(net, loss, x, y, weight_decay=0.1)
    traj = prob.rollout(prob.initial_controls())
    lm = prob.local_model(traj)
    lm.backward(0.0, False, record=True)
    dense = Dense(prob, traj)
    z = traj.xs[-1].reshape(-1)
    gT, HT = torch.func.grad(dense.phi)(z), hessian(dense.phi)(z)
    for t in range(prob.horizon):
        g, w = dense.tail(t)
        X = traj.xs[t].reshape(-1)
        M, G = jacrev(g, argnums=(0, 1))(X, w)
        Hxx, Hxw = M.T @ HT @ M, M.T @ HT @ G
        Hww = G.T @ HT @ G + 0.1 * torch.eye(w.numel(), dtype=w.dtype)
        gx, gw = M.T @ gT, G.T @ gT + 0.1 * w
        Vxx = Hxx - Hxw @ torch.linalg.solve(Hww, Hxw.T)
        Vx = gx - Hxw @ torch.linalg.solve(Hww, gw)
        torch.testing.assert_close(lm.values[t][0].reshape(-1), Vx, **TOL)
        torch.testing.assert_close(lm.values[t][1], Vxx, **TOL)


def test_policy_on_linearised_dynamics_is_the_joint_gauss_newton_step():
    net, loss, x, y = mlp()
    prob = NetworkProblem(net, loss, x, y, weight_decay=0.1)
    traj = prob.rollout(prob.initial_controls())
    lm = prob.local_model(traj)
    policy, _ = lm.backward(0.0, False)
    dense = Dense(prob, traj)
    g, w = dense.tail(0)
    G = jacrev(g, argnums=1)(traj.xs[0].reshape(-1), w)
    z = traj.xs[-1].reshape(-1)
    gT, HT = torch.func.grad(dense.phi)(z), hessian(dense.phi)(z)
    step = -torch.linalg.solve(G.T @ HT @ G + 0.1 * torch.eye(w.numel(), dtype=w.dtype), G.T @ gT + 0.1 * w)
    dx, dus = torch.zeros_like(traj.xs[0].reshape(-1)), []
    for t in range(prob.horizon):
        du = torch.cat([v.reshape(-1) for v in policy.k[t].values()])
        if t > 0:
            du = du + policy.K[t] @ dx
        else:
            assert policy.K[0] is None       # x_0 never deviates
        Fx, Fu = jacrev(dense.F(t), argnums=(0, 1))(traj.xs[t].reshape(-1), dense.flat_u(t))
        dx = Fx @ dx + Fu @ du
        dus.append(du)
    torch.testing.assert_close(torch.cat(dus), step, **TOL)


def autograd_J(prob, traj):
    """dJ/dx_t (per sample) and dJ/du_t by autograd through the whole composed network."""
    xs = [traj.xs[0]]
    us = [{k: v.clone().requires_grad_(True) for k, v in u.items()} for u in traj.us]
    hs = []
    for t, stage in enumerate(prob.stages):
        h = xs[-1].detach().requires_grad_(True) if t > 0 else xs[-1]
        hs.append(h)
        xs.append(stage.forward(us[t], h if t > 0 else xs[-1]))
    J = prob.loss_fn(xs[-1], prob.targets) + 0.5 * prob.weight_decay * sum(
        (v * v).sum() for u in us for v in u.values())
    # dJ/dx_t through the rest of the network: chain the per-stage graph
    gx = [None] * (prob.horizon + 1)
    (gx[-1],) = torch.autograd.grad(J, xs[-1], retain_graph=True)
    for t in range(prob.horizon - 1, 0, -1):
        (gx[t],) = torch.autograd.grad(xs[t + 1], hs[t], grad_outputs=gx[t + 1], retain_graph=True)
    # dJ/du through the fully composed graph
    flat = functional_call_all(prob, us)
    gu = torch.autograd.grad(flat, [v for u in us for v in u.values()])
    return gx, gu


def functional_call_all(prob, us):
    x = prob.x0
    for stage, u in zip(prob.stages, us):
        x = stage.forward(u, x)
    return prob.loss_fn(x, prob.targets) + 0.5 * prob.weight_decay * sum(
        (v * v).sum() for u in us for v in u.values())


@pytest.mark.parametrize("make", [mlp, cnn, resnet])
def test_first_order_terms_equal_autograd(make):
    net, loss, x, y = make()
    prob = NetworkProblem(net, loss, x, y, weight_decay=0.05)
    traj = prob.rollout(prob.initial_controls())
    gx, gu = autograd_J(prob, traj)
    lm = prob.local_model(traj)
    # costates and control gradient (E-MSA): p_t = -dJ/dx_t, dJ/du_t
    p = lm.costates()
    for t in range(1, prob.horizon + 1):
        torch.testing.assert_close(p[t], -gx[t], **TOL)
    flat = [g for d in lm.control_gradient() for g in d.values()]
    for a, b in zip(flat, gu):
        torch.testing.assert_close(a, b, **TOL)
    assert lm.gradient_norm() == pytest.approx(float(torch.sqrt(sum((g * g).sum() for g in gu))), rel=1e-12)
    # per-sample V_x at the terminal boundary and Q_x, Q_u of the last stage are autograd gradients
    lm.backward(0.1, False, record=True)
    T = prob.horizon
    torch.testing.assert_close(lm.values[T][0], gx[T].reshape(prob.batch_size, -1), **TOL)
    torch.testing.assert_close(lm.record[T - 1]["Qx"], gx[T - 1].reshape(prob.batch_size, -1), **TOL)
    nlast = len(traj.us[-1])
    torch.testing.assert_close(lm.record[T - 1]["Qu"], torch.cat([g.reshape(-1) for g in gu[-nlast:]]),
                               **TOL)
    # with mu -> inf the DDP value gradient is back-propagation: V_x = dJ/dx_t, Q_u = dJ/du_t
    lm.backward(1e13, True, record=True)
    for t in range(1, T + 1):
        torch.testing.assert_close(lm.values[t][0], gx[t].reshape(prob.batch_size, -1), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(torch.cat([r["Qu"] for r in lm.record]),
                               torch.cat([g.reshape(-1) for g in gu]), rtol=1e-9, atol=1e-10)


def test_not_positive_definite_and_memory_limit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
    prob = NetworkProblem(net, nn.MSELoss(), x, y)      # 26 parameters, rank-2 Gauss-Newton Q_uu
    lm = prob.local_model(prob.rollout(prob.initial_controls()))
    with pytest.raises(NotPositiveDefinite) as err:
        lm.backward(-1e-3, False)
    assert err.value.stage in (0, 1)
    lm.backward(1e-6, False)   # a positive mu is enough
    small = NetworkProblem(net, nn.MSELoss(), x, y, memory_limit=1000)
    with pytest.raises(MemoryLimitError, match="DDPNOpt") as err:
        small.local_model(small.rollout(small.initial_controls())).backward(1.0)
    assert err.value.estimate > 1000 and err.value.limit == 1000
    # sizes below a MiB are written in KiB or bytes, not as "0.0 MiB"
    est = err.value.estimate
    want = f"{est / 1024:.1f} KiB" if est >= 1024 else f"{est} bytes"
    assert f"needs about {want} (limit 1000 bytes)" in str(err.value)
    assert str(MemoryLimitError(3 * 2**20, 2**30)).startswith(
        "the network local model needs about 3.0 MiB (limit 1024.0 MiB)")


def test_terminal_hessian_is_blocks_for_a_separable_loss_and_dense_otherwise():
    for make, dense in ((wide, False), (coupled, True)):
        net, loss, x, y = make()
        prob = NetworkProblem(net, loss, x, y)
        lm = prob.local_model(prob.rollout(prob.initial_controls()))
        _, V = lm.source._terminal_derivatives()
        assert (V.S is not None) == dense


@pytest.mark.parametrize("make", [mlp, cnn, resnet])
def test_last_stage_q_terms_are_the_second_derivatives_of_J(make):
    """At t = T-1, Q(x, u) = l(u) + Phi(f(x, u)) exactly: its torch.func Hessian (second order)
    or J_f^T Hess(Phi) J_f + wd I (Gauss-Newton)."""
    net, loss, x, y = make()
    prob = NetworkProblem(net, loss, x, y, weight_decay=0.05)
    traj = prob.rollout(prob.initial_controls())
    dense = Dense(prob, traj)
    T = prob.horizon
    X, u = traj.xs[T - 1].reshape(-1), dense.flat_u(T - 1)
    f = dense.F(T - 1)

    def Q(X1, u1):
        return dense.phi(f(X1, u1)) + 0.025 * (u1 * u1).sum()
    (hxx, hxu), (hux, huu) = hessian(Q, argnums=(0, 1))(X, u)
    Fx, Fu = jacrev(f, argnums=(0, 1))(X, u)
    HT = hessian(dense.phi)(f(X, u))
    eye = torch.eye(u.numel(), dtype=u.dtype)
    for second_order, ref in ((True, (huu, hux, hxx)), (False, (Fu.T @ HT @ Fu + 0.05 * eye, Fu.T @ HT @ Fx,
                                                               Fx.T @ HT @ Fx))):
        lm = prob.local_model(traj, second_order)
        lm.backward(10.0, second_order, record=True)
        r = lm.record[T - 1]
        for got, want in zip((r["Quu"], r["Qux"], r["Qxx"]), ref):
            torch.testing.assert_close(got, want, **TOL)
        gx, gu = torch.func.grad(Q, argnums=(0, 1))(X, u)
        torch.testing.assert_close(r["Qx"].reshape(-1), gx, **TOL)
        torch.testing.assert_close(r["Qu"], gu, **TOL)


def test_network_problem_and_ddpnopt_run_the_one_backward_sweep(monkeypatch):
    """Full-batch iLQR on a NetworkProblem and DDPNOpt (factorised and dense gains) go through
    the same NetworkLocalModel.backward, with their own Q source and gain holder; the step still
    trains (the loss falls)."""
    calls = []
    sweep = NetworkLocalModel.backward

    def spy(self, mu, second_order=False, **kwargs):
        calls.append((type(self.source).__name__, type(self.gains).__name__))
        return sweep(self, mu, second_order, **kwargs)
    monkeypatch.setattr(NetworkLocalModel, "backward", spy)
    net, loss, x, y = mlp()
    prob = NetworkProblem(net, loss, x, y)
    res = occore.ILQR(max_iter=2).solve(prob)
    assert res.cost < prob.rollout(prob.initial_controls()).cost
    assert set(calls) == {("ExactQ", "DenseGains")}
    for feedback, gains in (("factorised", "FactorisedGains"), ("dense", "DenseGains")):
        calls.clear()
        net, loss, x, y = mlp()
        opt = DDPNOpt(net, lr=0.05, curvature="adam", feedback=feedback)

        def closure():
            opt.zero_grad()
            out = loss(net(x), y)
            out.backward()
            return out
        first = float(opt.step(closure))
        for _ in range(5):
            last = float(opt.step(closure))
        assert last < first
        assert calls == [("CurvatureQ", gains)] * 6


def test_without_weight_decay_the_control_gradient_is_the_loss_gradient():
    net, loss, x, y = mlp()
    prob = NetworkProblem(net, loss, x, y)              # weight_decay 0: no running cost
    traj = prob.rollout(prob.initial_controls())
    _, gu = autograd_J(prob, traj)
    flat = [g for d in prob.local_model(traj).control_gradient() for g in d.values()]
    assert len(flat) == len(gu)
    for a, b in zip(flat, gu):
        torch.testing.assert_close(a, b, **TOL)


def _probe_net(kind, B, width):
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                            nn.Linear(width, 3))
        x = torch.randn(B, 5)
    else:
        net = nn.Sequential(nn.Conv2d(1, width, 3), nn.Tanh(), nn.Flatten(), nn.Linear(width * 4, 3))
        x = torch.randn(B, 1, 4, 4)
    return net.double(), nn.CrossEntropyLoss(), x.double(), torch.randint(0, 3, (B,))


@pytest.mark.parametrize("kind,B,width,value_hessian,second_order", [
    ("mlp", 4, 8, "batch", False), ("mlp", 16, 8, "batch", True), ("mlp", 16, 4, "per_sample", False),
    ("cnn", 4, 8, "per_sample", True), ("cnn", 16, 4, "batch", False)])
def test_the_memory_estimate_is_within_a_factor_of_the_measured_peak(kind, B, width, value_hessian,
                                                                      second_order):
    """The estimate (what the memory limit refuses on) against the allocator's peak during the
    backward sweep, measured by torch's profiler (0.72-1.64 over 32 such configurations)."""
    from nn_adapter.memory import step_peak_bytes

    net, loss, x, y = _probe_net(kind, B, width)
    prob = NetworkProblem(net, loss, x, y, value_hessian=value_hessian)
    traj = prob.rollout(prob.initial_controls())
    lm = prob.local_model(traj)
    lm.costates()                        # the first-order pass is not part of the sweep
    mu = 100.0 if second_order else 1.0
    _, peak = step_peak_bytes(lambda: lm.backward(mu, second_order), torch.device("cpu"))
    estimate = lm.memory_estimate(second_order)
    assert 0.6 <= estimate / peak <= 1.8, (estimate, peak)
    # more samples and the second-order terms cost more; per-sample value Hessians less
    bigger = NetworkProblem(*_probe_net(kind, 2 * B, width), value_hessian=value_hessian)
    assert bigger.local_model(bigger.rollout(bigger.initial_controls())).memory_estimate(
        second_order) > estimate
    assert lm.memory_estimate(True) > lm.memory_estimate(False)
    other = "per_sample" if value_hessian == "batch" else "batch"
    alt = NetworkProblem(net, loss, x, y, value_hessian=other)
    alt_estimate = alt.local_model(traj).memory_estimate(second_order)
    assert (alt_estimate < estimate) == (other == "per_sample")


def _terminal_kind(loss, x, y, **kw):
    net, _, _, _ = wide()
    prob = NetworkProblem(net, loss, x, y, **kw)
    _, V = prob.local_model(prob.rollout(prob.initial_controls())).source._terminal_derivatives()
    return "dense" if V.S is not None else "blocks"


def test_the_separability_check_at_its_edges():
    """A loss with zero Hessian (linear: H r = D r = 0 exactly) and a separable loss of a huge
    scale keep the per-sample blocks; a coupling of 1e-4 relative takes the dense path, at any
    scale of the loss (the tolerance is relative to the Hessian's norm)."""
    _, _, x, _ = wide()
    y = torch.randn(8, 2, dtype=torch.float64)
    assert _terminal_kind(lambda out, t: (out * t).sum(), x, y) == "blocks"
    assert _terminal_kind(lambda out, t: 1e8 * ((out - t) ** 2).mean(), x, y) == "blocks"
    weak = lambda out, t: ((out - t) ** 2).mean() + 1e-4 * out.sum() ** 2   # noqa: E731
    assert _terminal_kind(weak, x, y) == "dense"
    assert _terminal_kind(lambda out, t: 1e-8 * weak(out, t), x, y) == "dense"   # relative


def test_memory_limits_at_the_estimate_and_for_the_dense_terminal_hessian():
    """A limit equal to the estimate is enough; with per-sample value Hessians and a loss that
    couples 256 samples, the dense terminal Hessian ((B n_T)^2 numbers) is what passes the
    limit, and its own check names it."""
    net, loss, x, y = coupled()
    prob = NetworkProblem(net, loss, x, y)
    traj = prob.rollout(prob.initial_controls())
    exact = prob.local_model(traj).memory_estimate()
    at = NetworkProblem(net, loss, x, y, memory_limit=exact)
    at.local_model(at.rollout(at.initial_controls())).backward(1.0)
    g = torch.Generator().manual_seed(5)
    xb = torch.randn(256, 2, generator=g, dtype=torch.float64)
    yb = torch.randn(256, 2, generator=g, dtype=torch.float64)
    big = NetworkProblem(net, loss, xb, yb, value_hessian="per_sample")
    estimate = big.local_model(big.rollout(big.initial_controls())).memory_estimate()
    dense = (256 * 2) ** 2 * 8
    assert estimate < dense
    for limit, fails in ((dense - 1, True), (dense, False)):
        lim = NetworkProblem(net, loss, xb, yb, value_hessian="per_sample", memory_limit=limit)
        lm = lim.local_model(lim.rollout(lim.initial_controls()))
        if fails:
            with pytest.raises(MemoryLimitError, match="couples the samples") as err:
                lm.backward(10.0)
            assert err.value.estimate == dense
        else:
            lm.backward(10.0)


class Unbatchable(nn.Module):
    """A stage torch.func cannot vmap (an in-place write of the batched output into a fresh,
    unbatched tensor), though it maps one tensor to one tensor and needs no branch on values."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, h):
        out = torch.empty(h.shape[0], 3, dtype=h.dtype)
        out[:] = self.lin(h)
        return out


@pytest.mark.parametrize("solver", [occore.DDP, occore.ILQR])
def test_a_stage_without_per_sample_jacobians_is_named_by_ddp_and_emsa_still_trains_it(solver):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), Unbatchable(), nn.Sigmoid()).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    prob = NetworkProblem(net, nn.CrossEntropyLoss(), x, y)    # its forward and the loss are fine
    with pytest.raises(UnsupportedModuleError) as err:
        solver(max_iter=2).solve(prob)
    for words in ("stage 1", "'2'", "Unbatchable", "'3'", "vmap", "occore.EMSA"):
        assert words in str(err.value)
    start = prob.rollout(prob.initial_controls()).cost
    assert occore.EMSA(max_iter=3).solve(prob).cost < start

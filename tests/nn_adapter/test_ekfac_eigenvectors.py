"""EKFAC's eigenbases when LAPACK's float32 eigensolver fails to converge (a wide layer's factor
of low rank after a small batch): the fallbacks of nn_adapter.curvature.ekfac.eigenvectors, with
the failure simulated (it depends on the LAPACK build), against the factor they decompose."""
import pytest
import torch
from torch import nn

from nn_adapter import EKFAC, DDPNOpt
from nn_adapter.curvature import ekfac

EIGH = torch.linalg.eigh


def _failing(dtypes):
    def eigh(m, *args, **kwargs):
        if m.dtype in dtypes:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (simulated)")
        return EIGH(m, *args, **kwargs)
    return eigh


def _factor(n=12, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, n, generator=g)
    return (x.T @ x / rank).float()          # PSD, rank 4 of 12: repeated zero eigenvalues


@pytest.mark.parametrize("failing", [{torch.float32}, {torch.float32, torch.float64}])
def test_a_failed_eigh_falls_back_to_a_basis_that_diagonalises_the_factor(monkeypatch, failing):
    a = _factor()
    monkeypatch.setattr(torch.linalg, "eigh", _failing(failing))
    q = ekfac.eigenvectors(a)
    assert q.dtype == torch.float32 and q.shape == (12, 12)
    torch.testing.assert_close(q.T @ q, torch.eye(12), atol=1e-5, rtol=0)
    d = q.T @ a @ q
    off = d - torch.diag(d.diagonal())
    assert float(off.abs().max()) < 1e-5 * float(a.abs().max())
    ref = torch.linalg.eigvalsh(a.double()).float()
    torch.testing.assert_close(d.diagonal().sort().values, ref, atol=1e-5, rtol=0)


def test_a_non_finite_factor_still_raises(monkeypatch):
    a = _factor()
    a[0, 0] = float("nan")
    monkeypatch.setattr(torch.linalg, "eigh", _failing({torch.float32}))
    with pytest.raises(torch.linalg.LinAlgError):
        ekfac.eigenvectors(a)


@pytest.mark.parametrize("make", [
    lambda net: EKFAC(net.parameters(), model=net, lr=0.01),
    lambda net: DDPNOpt(net.parameters(), model=net, lr=0.01, curvature="ekfac"),
])
def test_ekfac_steps_through_a_failing_float32_eigh_as_with_a_working_one(monkeypatch, make):
    """Full-rank factors (batch 64 > 6 + 1 inputs and 5 + 1 hidden units): the eigenbasis is
    unique up to signs, which the step does not see, so the fallback's steps equal the plain ones."""
    def run(patch):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
        opt = make(net)
        with monkeypatch.context() as m:
            if patch:
                m.setattr(torch.linalg, "eigh", _failing({torch.float32}))
            for _ in range(3):
                def closure():
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(x), y)
                    loss.backward()
                    return loss.detach()
                opt.step(closure)
        return [p.detach().clone() for p in net.parameters()]
    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)

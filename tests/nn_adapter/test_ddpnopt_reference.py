"""DDPNOpt against the parameters recorded before the redesign through occore (issue 10): same
updates to 1e-10 in float64 over 5 steps, every curvature and option, on nn.Sequential models."""
import pytest
import torch

from ddpnopt_reference import CASES, FILE, make_model, run


@pytest.fixture(scope="module")
def reference():
    return torch.load(FILE)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_recorded_reference(case, reference):
    expected = reference[case[0]]
    start = torch.cat([p.detach().reshape(-1) for p in make_model(case[1]).parameters()])
    got = torch.stack(run(case))
    assert torch.isfinite(got).all()
    assert (expected[-1] - start).abs().max() > 1e-3          # the reference moved
    assert (got - expected).abs().max().item() < 1e-10

"""MMCLoss: the Max-Mahalanobis centres and the loss."""
import pytest
import torch

from nn_adapter.losses import MMCLoss, mm_centers


@pytest.mark.parametrize("L,d", [(2, 1), (3, 2), (10, 9), (10, 16)])
def test_centres_are_max_mahalanobis(L, d):
    mu = mm_centers(L, d, radius=2.0)
    assert mu.shape == (L, d)
    gram = mu @ mu.T
    expected = torch.full((L, L), -4.0 / (L - 1), dtype=torch.float64)
    expected.fill_diagonal_(4.0)
    assert torch.allclose(gram, expected, atol=1e-12)
    assert torch.allclose(mu.sum(0), torch.zeros(d, dtype=torch.float64), atol=1e-12)


def test_loss_value_gradient_and_prediction():
    loss = MMCLoss(num_classes=3, dim=4, radius=5.0)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mu = loss.centers.to(torch.float64)
    expected = 0.5 * ((z - mu[y]) ** 2).sum(1).mean()
    value = loss(z, y)
    assert torch.allclose(value, expected)
    value.backward()
    assert torch.allclose(z.grad, (z - mu[y]).detach() / 6)
    assert MMCLoss(3, 4, reduction="none")(z, y).shape == (6,)
    assert torch.allclose(MMCLoss(3, 4, radius=5.0, reduction="sum")(z, y), expected * 6)
    noisy = mu[y] + 0.01 * torch.randn(6, 4, dtype=torch.float64)
    assert torch.equal(loss.predict(noisy), y)


def test_bad_input():
    with pytest.raises(ValueError, match="num_classes"):
        MMCLoss(1, 3)
    with pytest.raises(ValueError, match="dim"):
        MMCLoss(5, 3)
    with pytest.raises(ValueError, match="radius"):
        MMCLoss(3, 3, radius=0.0)
    with pytest.raises(ValueError, match="reduction"):
        MMCLoss(3, 3, reduction="avg")
    loss = MMCLoss(3, 4)
    with pytest.raises(ValueError, match="input"):
        loss(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_centre_defaults_small_radii_and_dtypes():
    """The default radius is Pang et al.'s C_MM = 10, any radius > 0 is a norm (also below 1), the
    dtype is that asked for, and an integer dtype is refused."""
    mu = mm_centers(4, 3)
    assert mu.dtype == torch.float64
    assert torch.allclose(mu.norm(dim=1), torch.full((4,), 10.0, dtype=torch.float64), atol=1e-12)
    small = mm_centers(4, 3, radius=0.25, dtype=torch.float32)
    assert small.dtype == torch.float32
    assert torch.allclose(small.norm(dim=1), torch.full((4,), 0.25), atol=1e-6)
    with pytest.raises(ValueError, match="dtype"):
        mm_centers(4, 3, dtype=torch.int64)

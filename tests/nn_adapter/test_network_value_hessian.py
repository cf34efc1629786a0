"""The factored batch value Hessian against its dense materialisation."""
import pytest
import torch

from nn_adapter.value_hessian import ValueHessian

B, n, n1 = 3, 2, 4


def random_V(kind):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(B, n1, n1, generator=g, dtype=torch.float64)
    D = D + D.transpose(1, 2)
    if kind == "blocks":
        return ValueHessian(D)
    if kind == "low_rank":
        S = torch.randn(3, 3, generator=g, dtype=torch.float64)
        return ValueHessian(D, torch.randn(3, B * n1, generator=g, dtype=torch.float64), S + S.T)
    S = torch.randn(B * n1, B * n1, generator=g, dtype=torch.float64)
    return ValueHessian(D, None, S + S.T)


def block_diag(fx):
    return torch.block_diag(*fx)


@pytest.mark.parametrize("kind", ["blocks", "low_rank", "dense"])
def test_operations_equal_dense_algebra(kind):
    V = random_V(kind)
    Vd = V.dense()
    g = torch.Generator().manual_seed(1)
    F = torch.randn(B, n1, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(V.apply(F).reshape(B * n1, 5), Vd @ F.reshape(B * n1, 5), rtol=1e-13, atol=1e-13)
    fx = torch.randn(B, n1, n, generator=g, dtype=torch.float64)
    hxx = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    Q = V.pullback(fx, hxx)
    torch.testing.assert_close(Q.dense(), block_diag(fx).T @ Vd @ block_diag(fx) + block_diag(hxx),
                               rtol=1e-13, atol=1e-13)
    L = torch.randn(2, B * n, generator=g, dtype=torch.float64)
    M = torch.randn(2, 2, generator=g, dtype=torch.float64)
    M = M + M.T
    W = Q.add_low_rank(L, M)
    torch.testing.assert_close(W.dense(), Q.dense() + L.T @ M @ L, rtol=1e-13, atol=1e-13)
    Wb = Q.add_low_rank(L, M, per_sample=True)
    assert Wb.S is None
    blocks = (Q.dense() + L.T @ M @ L).view(B, n, B, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    torch.testing.assert_close(Wb.D, blocks, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(W.blocks(), blocks, rtol=1e-13, atol=1e-13)


def test_rank_grows_then_turns_dense():
    V = random_V("blocks").pullback(torch.randn(B, n1, n, dtype=torch.float64))
    L = torch.randn(4, B * n, dtype=torch.float64)
    W = V.add_low_rank(L, torch.eye(4, dtype=torch.float64))
    assert W.U is not None and W.rank == 4
    X = W.add_low_rank(L[:2], torch.eye(2, dtype=torch.float64))    # rank 6 = B n: dense
    assert X.U is None and X.S.shape == (B * n, B * n)
    torch.testing.assert_close(X.dense(), W.dense() + L[:2].T @ L[:2], rtol=1e-13, atol=1e-13)


def test_rank_of_each_form_is_the_size_of_its_coupling():
    """rank = 0 without coupling, r for U (r, B n), B n for a dense coupling (the rows of dense())."""
    assert random_V("blocks").rank == 0
    assert random_V("low_rank").rank == 3
    assert random_V("dense").rank == B * n1 == random_V("dense").dense().shape[0]

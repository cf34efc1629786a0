"""The batch value Hessian of a network, V = blockdiag(D) + U^T S U, kept in factored form.

Over the flattened batch state (B n), the value Hessian of exact batched DDP is a per-sample block
diagonal D (B, n, n) plus a coupling term of rank r: every stage adds Q_ux^T M Q_ux with
M = H^-1 Q_uu H^-1 - 2 H^-1 (H = Q_uu + mu I), because K = -H^-1 Q_ux, so
K^T Q_uu K + K^T Q_ux + Q_ux^T K = Q_ux^T M Q_ux; pulling back through the block-diagonal F_x keeps
the form. r grows by m_t per stage; once r >= B n the coupling is stored densely (U = identity,
S of size (B n, B n)), which is plain dense DDP. With ``per_sample`` the coupling is reduced to its
diagonal blocks (DDPNOpt's per-sample V_xx^(i)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ValueHessian"]


@dataclass(frozen=True)
class ValueHessian:
    """V = blockdiag(D) + C, with C = U^T S U (low rank), C = S (dense: U is None), or C = 0.

    Attributes:
        D: (B, n, n) per-sample blocks.
        U: (r, B n) or None.
        S: (r, r), or (B n, B n) when U is None, or None (no coupling).

    Example:
        >>> D = torch.eye(2).repeat(3, 1, 1)
        >>> V = ValueHessian(D).add_low_rank(torch.ones(1, 6), torch.ones(1, 1))
        >>> V.dense().shape, float(V.dense()[0, 5]), V.rank
        (torch.Size([6, 6]), 1.0, 1)
    """

    D: Tensor
    U: Tensor | None = None
    S: Tensor | None = None

    @property
    def rank(self) -> int:
        """r of the coupling term (B n when dense, 0 when there is none)."""
        if self.S is None:
            return 0
        return self.S.shape[0]

    def apply(self, F: Tensor) -> Tensor:
        """V F for a stacked per-sample F (B, n, k); returns (B, n, k)."""
        out = torch.bmm(self.D, F)
        if self.S is not None:
            B, n, k = F.shape
            F2 = F.reshape(B * n, k)
            C = self.S @ F2 if self.U is None else self.U.T @ (self.S @ (self.U @ F2))
            out = out + C.view(B, n, k)
        return out

    def pullback(self, fx: Tensor, hxx: Tensor | None = None) -> "ValueHessian":
        """F_x^T V F_x (+ blockdiag(hxx)) for the block-diagonal F_x given as fx (B, n', n)."""
        B, n1, n = fx.shape
        D = torch.bmm(fx.transpose(1, 2), torch.bmm(self.D, fx))
        if hxx is not None:
            D = D + hxx
        if self.S is None:
            return ValueHessian(D)
        if self.U is not None:
            r = self.U.shape[0]
            UFx = torch.einsum("rjd,jdb->rjb", self.U.view(r, B, n1), fx).reshape(r, B * n)
            return ValueHessian(D, UFx, self.S)
        A = torch.einsum("pjd,jdb->pjb", self.S.view(B * n1, B, n1), fx)          # S F_x
        S = torch.einsum("iac,iajb->icjb", fx, A.view(B, n1, B, n)).reshape(B * n, B * n)
        return ValueHessian(D, None, S)

    def add_low_rank(self, L: Tensor, M: Tensor, per_sample: bool = False) -> "ValueHessian":
        """V + L^T M L with L (q, B n), M (q, q) symmetric; ``per_sample`` keeps only the
        diagonal blocks of the sum (the receiver then has no coupling term)."""
        B, n = self.D.shape[0], self.D.shape[1]
        if per_sample:
            L3 = L.view(L.shape[0], B, n)
            return ValueHessian(self.blocks() + torch.einsum("qia,qk,kib->iab", L3, M, L3))
        if self.S is None:
            U, S = L, M
        elif self.U is None:
            return ValueHessian(self.D, None, _sym(self.S + L.T @ (M @ L)))
        else:
            U, S = torch.cat([self.U, L]), torch.block_diag(self.S, M)
        if U.shape[0] >= B * n:                  # as large as the state: store it densely
            return ValueHessian(self.D, None, _sym(U.T @ (S @ U)))
        return ValueHessian(self.D, U, S)

    def blocks(self) -> Tensor:
        """The (B, n, n) diagonal blocks of V."""
        B, n = self.D.shape[0], self.D.shape[1]
        if self.S is None:
            return self.D
        if self.U is None:
            C = self.S.view(B, n, B, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        else:
            U3 = self.U.view(self.U.shape[0], B, n)
            C = torch.einsum("ria,rs,sib->iab", U3, self.S, U3)
        return self.D + C

    def dense(self) -> Tensor:
        """V as a (B n, B n) matrix."""
        V = torch.block_diag(*self.D)
        if self.S is not None:
            V = V + (self.S if self.U is None else self.U.T @ self.S @ self.U)
        return V


def _sym(A: Tensor) -> Tensor:
    return 0.5 * (A + A.T)

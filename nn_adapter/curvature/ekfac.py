"""EKFAC curvature (George, Laurent, Bouthillier, Ballas & Vincent, NeurIPS 2018).

For a Linear or Conv2d block with input patches a and output gradients g (per sample, of the
per-sample loss), K-FAC's factors are A = E[a a^T] and G = E[g g^T]. EKFAC keeps their eigenbases
Q_A, Q_G and replaces K-FAC's eigenvalues by the second moment of the per-sample gradients in that
basis, s = E_i[(Q_G^T grad_i Q_A)^2]. The step is

    k = -lr Q_G [(Q_G^T Q_u Q_A) / (s + damping)] Q_A^T.

A and G and s are running averages (decay ``stat_decay``); the factors are refreshed every
``factor_update_freq`` steps, the eigenbases every ``eigen_update_freq`` steps (at which point s
restarts from the current batch, since the old s belongs to the old basis). The loss is taken to
be the batch mean of per-sample losses (torch's default reduction), so a per-sample gradient is B
times the recorded one. Parameters of other modules get a diagonal curvature: P = lr / (v + damping)
with v the running average of the squared batch gradient.

Where a factor is singular (fewer samples than inputs, or the cross-entropy gradient's null
direction), its eigenbasis is not unique inside the null space and neither is EKFAC's step once
the batch changes; every implementation shares this.
"""
from __future__ import annotations

import torch

from occore.validation import is_integer

from .base import (Curvature, apply_factors, as_matrix, from_matrix, is_finite_number,
                   is_fraction, with_weight_decay)
from .kron import chunks, patches, per_sample_grads, positions

__all__ = ["EKFACCurvature", "eigenvectors"]


def eigenvectors(m: torch.Tensor) -> torch.Tensor:
    """The eigenvectors (columns) of the symmetric factor ``m`` (n, n), in its dtype.

    LAPACK's solver (``torch.linalg.eigh``) can fail to converge in float32 on a factor of low
    rank: measured on the A of the paper CNN's Linear(1568, 128) after one batch of 16 (1553 of
    its 1569 eigenvalues below 1e-7 of the largest). Such a factor is decomposed in float64, and
    if that fails too, by the singular value decomposition (another LAPACK algorithm; for a
    positive semi-definite factor its left singular vectors are eigenvectors, in another order,
    which EKFAC does not depend on: its scale s is formed in whatever basis it is given). A
    factor that is not finite raises as it always did.

    Example:
        >>> q = eigenvectors(torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
        >>> torch.allclose(q.T @ q, torch.eye(2))
        True
    """
    try:
        return torch.linalg.eigh(m).eigenvectors
    except torch.linalg.LinAlgError:
        if not bool(torch.isfinite(m).all()):
            raise
    wide = m.double()
    try:
        return torch.linalg.eigh(wide).eigenvectors.to(m.dtype)
    except torch.linalg.LinAlgError:
        return torch.linalg.svd(wide).U.to(m.dtype)


class EKFACCurvature(Curvature):
    """Eigenvalue-corrected Kronecker-factored curvature; needs recorded inputs/output grads.

    Hyperparameters: ``damping``, ``stat_decay``, ``factor_update_freq``, ``eigen_update_freq``,
    ``weight_decay``, ``decoupled_weight_decay``.

    Example:
        >>> EKFACCurvature().defaults["damping"]
        0.001
    """

    name = "ekfac"
    defaults = dict(damping=1e-3, stat_decay=0.95, factor_update_freq=1, eigen_update_freq=100,
                    weight_decay=0.0, decoupled_weight_decay=False)
    needs_records = True

    def validate(self, hp):
        super().validate(hp)
        d, s = hp["damping"], hp["stat_decay"]
        self.check("damping", d, is_finite_number(d, strict=True), "a finite number > 0")
        self.check("stat_decay", s, is_fraction(s),
                   "0 <= stat_decay < 1")
        for name in ("factor_update_freq", "eigen_update_freq"):
            v = hp[name]
            self.check(name, v, is_integer(v) and v >= 1,
                       "an int >= 1")

    # -- statistics of one batch ---------------------------------------------------------------
    @staticmethod
    def batch_factors(block, x, g):
        """K-FAC factors of one batch: A = mean_(i,l) a a^T, G = mean_(i,l) g g^T (per-sample g)."""
        n = x.shape[0]
        a_sum, count = None, 0
        for sl in chunks(block, x):
            a = patches(block, x[sl]).flatten(0, 1)          # (b L, in [+1]): ones for the bias
            a_sum = a.mT @ a if a_sum is None else a_sum.addmm_(a.mT, a)
            count += a.shape[0]
        gg = positions(block, g).flatten(0, 1) * n
        return a_sum / count, (gg.mT @ gg) / gg.shape[0]

    @staticmethod
    def batch_scale(block, x, g, q_g, q_a):
        """s of one batch: mean over samples of the squared per-sample gradient in the eigenbasis."""
        n = x.shape[0]
        if block.kind == "linear" and x.dim() == 2:   # rank-one per-sample gradients
            a = patches(block, x)[:, 0] @ q_a
            gg = (g * n) @ q_g
            return (gg.square().mT @ a.square()) / n
        total = None
        for _, grads in per_sample_grads(block, x, g * n, q_g, q_a):
            part = grads.square().sum(0)
            total = part if total is None else total + part
        return total / n

    # -- the operations ----------------------------------------------------------------------------
    def update(self, block, grads, group, states, record=None):
        self.update_all([block], [grads], group, [states], record)

    def update_all(self, blocks, grads, group, states, record=None, reduce=None):
        """The running statistics of every block with this batch.

        Data-parallel (``reduce`` averages tensors over the ranks in place), the batch statistics
        of the rank's shard are averaged before they enter the running averages: A and G and s in
        one collective, or, on a step that refreshes an eigenbasis, A and G first (the new bases
        need them) and then s (formed in the new bases): one or two collectives per call. The
        shards are equal, so the average of the shards' means is the global batch's mean.
        """
        decay = group["stat_decay"]
        layers = []
        for block, gr, sts in zip(blocks, grads, states):
            st = sts[0]
            st["step"] = st.get("step", 0) + 1
            if not block.structured:        # the gradient is the global batch's already
                sq = with_weight_decay(block.params[0], gr[0], group).square()
                if st["step"] == 1:
                    st["scale"] = sq
                else:
                    st["scale"].mul_(decay).add_(sq, alpha=1 - decay)
                continue
            x, g = record.inputs[block.module], record.out_grads[block.module]
            factor = (st["step"] - 1) % group["factor_update_freq"] == 0
            refresh = (st["step"] - 1) % group["eigen_update_freq"] == 0
            layers.append((block, st, x, g, self.batch_factors(block, x, g) if factor else None,
                           refresh))
        if not layers:
            return
        refreshing = any(refresh for *_, refresh in layers)
        factors = [t for *_, ab, _ in layers if ab is not None for t in ab]
        scales = [] if refreshing else [self.batch_scale(b, x, g, st["QG"], st["QA"])
                                        for b, st, x, g, _, _ in layers]
        if reduce is not None and factors + scales:
            reduce(factors + scales)
        for block, st, x, g, ab, refresh in layers:
            if ab is not None:
                if "A" not in st:
                    st["A"], st["G"] = ab
                else:
                    st["A"].mul_(decay).add_(ab[0], alpha=1 - decay)
                    st["G"].mul_(decay).add_(ab[1], alpha=1 - decay)
            if refresh:
                st["QA"] = eigenvectors(st["A"])
                st["QG"] = eigenvectors(st["G"])
        if refreshing:
            scales = [self.batch_scale(b, x, g, st["QG"], st["QA"]) for b, st, x, g, _, _ in layers]
            if reduce is not None:
                reduce(scales)
        for (block, st, x, g, ab, refresh), s_b in zip(layers, scales):
            if refresh:
                st["scale"] = s_b
            else:
                st["scale"].mul_(decay).add_(s_b, alpha=1 - decay)

    def factors(self, block, group, states):
        st = states[0]
        d = (st["scale"] + group["damping"]).reciprocal_().mul_(group["lr"])
        if not block.structured:
            return None, None, [d]
        return st["QG"], st["QA"], d

    def direction(self, block, grads, group, states, factors):
        grads = [with_weight_decay(p, gr, group) for p, gr in zip(block.params, grads)]
        if not block.structured:
            return [grads[0] * factors[2][0].neg()]
        return [-s for s in from_matrix(block, apply_factors(factors, as_matrix(block, grads)))]

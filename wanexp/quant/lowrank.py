"""SVDQuant's low-rank branch: ``W' = L1 L2 + R`` with ``L1 L2`` the best rank-r approximation."""

from __future__ import annotations

import torch


def split_lowrank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Truncated SVD of ``weight [out, in]``: returns ``(L1 [out, r], L2 [r, in], R = W − L1 L2)``.

    The singular values are split evenly between the factors (``U √S``, ``√S Vᵀ``) so both stay in
    a comfortable 16-bit range. ``rank = 0`` returns ``(None, None, W)``.
    """
    w = weight.float()
    if rank <= 0:
        return None, None, w
    rank = min(rank, *w.shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    l1 = (u[:, :rank] * root[None, :]).float()
    l2 = (root[:, None] * vh[:rank]).float()
    return l1, l2, w - l1 @ l2

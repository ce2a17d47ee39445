"""Low-rank factorization of ``k_proj`` / ``v_proj``: SVD and activation-aware SVD (ASVD) init.

A projection ``W`` (``[out, in]``) becomes ``up @ down`` with ``down: [r, in]`` (what the cache
stores, per token: the latent ``down @ x``) and ``up: [out, r]`` (applied when reading). Plain
SVD keeps the top ``r`` singular directions of ``W``; ASVD (Yuan et al. 2023, arXiv 2312.05821, as
used by CSKV) first scales the input channels by ``s_j = mean|x_j| ** alpha`` measured on
calibration text, so that channels the model actually drives are kept:
``W S = U Sigma V^T``, ``W ~ (U_r Sigma_r^1/2) (Sigma_r^1/2 V_r^T S^-1)``.

Post-RoPE keys (``key_space="post_rope"``) are projected instead: ``down: [r, kv_features]`` takes the rotated
key itself. What a key is read for is its score ``q . k``, so the factors weight the key error by the queries that
read it. Two fits: ``rotation_invariant_factors`` (the default, ``post_rope_factors="rotation_invariant"``) keeps
only subspaces that RoPE maps onto themselves, so a latent loses the same at every position (the key moment is
``k_proj``'s own, scaled as ASVD scales it: fitted to calibration keys instead, pass keys dropped to 0.64);
``query_weighted_factors`` (``"pca"``) minimizes the expected squared score error ``E[(q . (k - up down k))^2]``
over calibration queries and keys with no constraint: with ``Q`` the second moment of a KV head's queries and
``C`` that of the rotated keys, whiten by ``Q^1/2``, keep the top ``r`` eigenvectors ``V`` of ``Q^1/2 C Q^1/2``,
and ``down = V^T Q^1/2``, ``up = Q^-1/2 V``; keys rotate with their position, so its calibration tokens sit at
random offsets up to the longest context served, and a subspace fitted to the average position fits no
position exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankProjection(nn.Module):
    """``x -> up(down(x))``: ``down`` makes the latent, ``up`` (with the original bias) reconstructs."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @torch.no_grad()
    def initialize(self, weight: torch.Tensor, bias: torch.Tensor | None,
                   input_scale: torch.Tensor | None = None) -> None:
        """Set the factors from the original projection (SVD, or ASVD with ``input_scale``)."""
        down, up = factorize(weight, self.rank, input_scale)
        self.down.weight.copy_(down.to(self.down.weight.dtype))
        self.up.weight.copy_(up.to(self.up.weight.dtype))
        if self.up.bias is not None:
            if bias is None:
                self.up.bias.zero_()
            else:
                self.up.bias.copy_(bias.to(self.up.bias.dtype))


    @torch.no_grad()
    def set_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.down.weight.copy_(down.to(self.down.weight.dtype))
        self.up.weight.copy_(up.to(self.up.weight.dtype))


class LowRankKV(nn.Module):
    """The key and value factor pairs of one attention layer (post-RoPE keys: ``k`` maps key to key)."""

    def __init__(self, hidden_size: int, kv_features: int, key_rank: int, value_rank: int, bias: bool,
                 post_rope: bool = False) -> None:
        super().__init__()
        if post_rope:
            self.k = LowRankProjection(kv_features, kv_features, key_rank, bias=False)
        else:
            self.k = LowRankProjection(hidden_size, kv_features, key_rank, bias)
        self.v = LowRankProjection(hidden_size, kv_features, value_rank, bias)


def query_weighted_factors(key_moment: torch.Tensor, query_moment: torch.Tensor, rank: int,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [rank, F], up [F, rank])`` minimizing ``E[(q . (k - up down k))^2]`` (float32).

    ``key_moment``: ``[F, F]`` second moment of the keys (``F = kv_heads * head_dim``, heads concatenated);
    ``query_moment``: ``[kv_heads, head_dim, head_dim]``, the second moment of the queries that read each KV
    head (its GQA group summed). A query moment of identity gives plain PCA (``up = down^T``)."""
    q = query_moment.double()
    values, vectors = torch.linalg.eigh(q)
    # a floor on the query spectrum keeps Q^-1/2 finite where no query reads a direction
    floor = values.amax(-1, keepdim=True).clamp(min=1e-30) * 1e-6
    values = values.clamp(min=0) + floor
    root = torch.block_diag(*[v @ torch.diag(e.sqrt()) @ v.T for e, v in zip(values, vectors)])
    inverse_root = torch.block_diag(*[v @ torch.diag(e.rsqrt()) @ v.T for e, v in zip(values, vectors)])
    _, basis = torch.linalg.eigh(root @ key_moment.double() @ root)
    top = basis.flip(-1)[:, :rank]  # eigh sorts ascending
    return (top.T @ root).float(), (inverse_root @ top).float()


def rotation_invariant_factors(key_moment: torch.Tensor, query_moment: torch.Tensor, rank: int,
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [rank, F], up [F, rank])`` spanning a subspace that RoPE maps onto itself (float32).

    RoPE turns each channel pair ``(f, f + head_dim / 2)`` of every head by the same angle ``position * theta_f``:
    read as a complex number ``z_f = k_f + i k_(f + head_dim / 2)``, frequency ``f`` of all KV heads is a vector of
    ``C^kv_heads`` multiplied by ``e^(i position theta_f)``. Any complex subspace of one frequency's ``C^kv_heads``
    is therefore invariant, and a projection onto a sum of them commutes with the rotation: the latent of a rotated
    key is the rotated latent, whatever the position, as with pre-RoPE latents. Per frequency, the complex second
    moment of the keys, weighted by the energy of the queries that read each head in that pair, gives eigenvectors;
    the ``rank // 2`` largest over all frequencies are kept, each as two real directions (an odd rank adds the real
    part of the next one, the only direction that is not invariant). Arguments as ``query_weighted_factors``."""
    kv_heads, head_dim = query_moment.shape[0], query_moment.shape[-1]
    half = head_dim // 2
    c, q = key_moment.double(), query_moment.double()
    # the queries' energy in each head's channel pair, [kv_heads, half]; a floor keeps the whitening finite
    diagonal = q.diagonal(dim1=-2, dim2=-1)
    energy = diagonal[:, :half] + diagonal[:, half:]
    energy = energy.clamp(min=0) + energy.amax().clamp(min=1e-30) * 1e-6
    candidates = []  # (eigenvalue, frequency, eigenvector in whitened coordinates)
    for f in range(half):
        real = [g * head_dim + f for g in range(kv_heads)]
        imag = [g * head_dim + f + half for g in range(kv_heads)]
        moment = torch.complex(c[real][:, real] + c[imag][:, imag], c[imag][:, real] - c[real][:, imag])
        root = energy[:, f].sqrt().to(moment.dtype)
        values, vectors = torch.linalg.eigh(root[:, None] * moment * root[None, :])
        candidates += [(float(values[j]), f, vectors[:, j]) for j in range(kv_heads)]
    candidates.sort(key=lambda item: -item[0])
    scale = energy.repeat(1, 2).reshape(-1).sqrt()  # per channel: its pair's energy, heads concatenated
    basis = []
    for index in range((rank + 1) // 2):
        _, f, v = candidates[index]
        for turned in ((v,) if 2 * index + 1 == rank else (v, 1j * v)):
            direction = torch.zeros(kv_heads * head_dim, dtype=torch.float64)
            for g in range(kv_heads):
                direction[g * head_dim + f] = turned[g].real
                direction[g * head_dim + f + half] = turned[g].imag
            basis.append(direction)
    top = torch.stack(basis, dim=1)  # [F, rank], orthonormal in whitened coordinates
    return (top.T * scale[None, :]).float(), (top / scale[:, None]).float()


class KeyStatistics:
    """Second moments of the rotated keys and queries of every layer, accumulated over calibration tokens."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.queries: list[torch.Tensor | None] = [None] * num_layers
        self.tokens = 0

    def add(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None) -> None:
        """``query [batch, q_heads, T, d]`` and ``key [batch, kv_heads, T, d]`` (rotated) of ``mask``'s tokens."""
        batch, kv_heads, tokens, head_dim = key.shape
        keys = key.detach().double().transpose(1, 2).reshape(batch, tokens, kv_heads * head_dim)
        queries = query.detach().double().view(batch, kv_heads, -1, tokens, head_dim)
        if mask is not None:
            keep = mask.to(key.device).bool()
            keys = keys[keep]
            queries = queries.permute(0, 3, 1, 2, 4)[keep]  # [kept, kv_heads, group, d]
        else:
            keys = keys.reshape(-1, kv_heads * head_dim)
            queries = queries.permute(0, 3, 1, 2, 4).reshape(-1, kv_heads, queries.shape[2], head_dim)
        key_moment = keys.T @ keys
        query_moment = torch.einsum("nkga,nkgb->kab", queries, queries)
        self.keys[layer] = key_moment if self.keys[layer] is None else self.keys[layer] + key_moment
        self.queries[layer] = query_moment if self.queries[layer] is None else self.queries[layer] + query_moment

    def moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if any(k is None for k in self.keys):
            raise ValueError("no calibration tokens reached every layer")
        return list(zip(self.keys, self.queries))  # type: ignore[arg-type]


def factorize(weight: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down [rank, in], up [out, rank])`` with ``up @ down`` the best rank-``rank`` approximation
    of ``weight`` (after scaling its input channels by ``input_scale`` when given), float32."""
    w = weight.detach().float()
    if input_scale is not None:
        scale = input_scale.detach().float().to(w.device)
        if scale.shape != (w.shape[1],) or not bool((scale > 0).all()):
            raise ValueError(f"input_scale must be positive with shape ({w.shape[1]},)")
        w = w * scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root[None, :]
    down = root[:, None] * vh[:rank]
    if input_scale is not None:
        down = down / scale[None, :]
    return down, up


def asvd_scale(abs_mean: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """ASVD's diagonal input scaling from the mean absolute activation of each input channel."""
    return (abs_mean.float() + eps) ** alpha


class InputStatistics:
    """Mean |x| per input channel of chosen linear layers, over the non-padding tokens they see."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.sums: list[torch.Tensor | None] = [None] * len(modules)
        self.counts = [0] * len(modules)
        self.mask: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, index: int):  # noqa: ANN202
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].detach().float().abs()
            if self.mask is not None:
                keep = self.mask.to(x.device).bool()
                x, n = x[keep], int(keep.sum())
            else:
                x, n = x.reshape(-1, x.shape[-1]), x.shape[0] * x.shape[1]
            total = x.sum(0)
            self.sums[index] = total if self.sums[index] is None else self.sums[index] + total
            self.counts[index] += n
        return hook

    def means(self) -> list[torch.Tensor]:
        if any(s is None for s in self.sums):
            raise ValueError("no calibration tokens reached every layer")
        return [s / max(1, c) for s, c in zip(self.sums, self.counts)]  # type: ignore[operator]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

"""The 3D-TransUNet query decoder: learnable queries, cross-attention to CNN features, mask heads.

MONAI has no DETR / Mask2Former-style query decoder (its ``TransformerBlock`` cross-attends with
one ``context`` for keys *and* values, so positional embeddings cannot be added to the keys
only), so this module is written by hand from ``torch.nn.MultiheadAttention``, MONAI's
``MLPBlock`` and MONAI's sin-cos position embeddings. It follows the decoder-only variant of
3D-TransUNet (Chen et al., "3D TransUNet: Advancing Medical Image Segmentation through Vision
Transformers", arXiv:2310.07781; 2nd place BraTS-METS 2023), itself Mask2Former (Cheng et al.,
CVPR 2022) **without masked attention** (the paper found it unstable):

* :class:`QueryDecoder`: ``N`` learnable query features :math:`q^0 \\in R^{N \\times d}` and query
  positional embeddings :math:`e \\in R^{N \\times d}`. Layer :math:`l` attends to one scale of
  the CNN decoder, :math:`F_{s(l)}` projected to ``d`` channels (1x1x1 convolution), plus its
  fixed 3-D sin-cos position embedding :math:`P_s` and a learned level embedding. Each layer
  adds the positional embeddings and updates the queries residually (post-norm, Mask2Former
  order)::

      q <- LN(q + CrossAttn(q + e, F_s + P_s, F_s))
      q <- LN(q + SelfAttn(q + e, q + e, q))
      q <- LN(q + MLP(q))

* :class:`QueryHead`: per query, class logits over ``K`` regions + "no object"
  (``Linear(d, K + 1)``) and a mask embedding ``m_q = MLP(LN(q)) in R^C``; the mask is the dot
  product with the last (full-resolution) CNN decoder feature map :math:`F_0 \\in R^{C \\times X
  \\times Y \\times Z}`: :math:`M_q(x) = \\langle m_q, F_0(x) \\rangle` (logits). A 1x1x1
  projection of :math:`F_0` before the dot product (as in the authors' code) is a linear map
  the MLP's last layer already contains, so it is left out (it would cost ``d`` full-resolution
  channels of memory).

* :func:`region_probabilities`: how queries become the region probabilities that validation,
  thresholds, ensembles and prediction consume. A query votes for region :math:`r` with its
  class probability; the region's probability at a voxel is the strongest vote:

  .. math::

      p_r(x) = \\max_q \\operatorname{softmax}(c_q)_r \\; \\sigma(M_q(x))

  (Mask2Former's semantic inference sums the votes instead; the maximum stays in ``[0, 1]``
  for overlapping regions and is not raised by the many queries that the matching leaves
  unmatched). :func:`region_logits` returns :math:`\\operatorname{logit}(p_r)` so that the
  network's eval-mode output is ``(B, K, X, Y, Z)`` region logits like every other
  architecture's (sigmoid recovers :math:`p_r`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.networks.blocks import MLPBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

__all__ = ["QueryDecoder", "QueryDecoderLayer", "QueryHead", "region_logits", "region_probabilities"]

#: probabilities are clamped to ``[EPS, 1 - EPS]`` before the logit (finite eval-mode output)
EPS = 1.0e-6


class QueryDecoderLayer(nn.Module):
    """One layer: cross-attention to one feature scale, self-attention among queries, MLP.

    Args:
        hidden_size: query and key width ``d``.
        num_heads: attention heads (``d`` divisible by it).
        mlp_dim: hidden width of the MLP.
        dropout_rate: dropout in attention and MLP.

    Shapes:
        queries, query_pos: ``(B, N, d)``; memory, memory_pos: ``(B, T, d)``; output ``(B, N, d)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_dim: int, dropout_rate: float = 0.0) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_cross = nn.LayerNorm(hidden_size)
        self.self_attn = nn.MultiheadAttention(hidden_size, num_heads, dropout=dropout_rate, batch_first=True)
        self.norm_self = nn.LayerNorm(hidden_size)
        self.mlp = MLPBlock(hidden_size, mlp_dim, dropout_rate, act="RELU")
        self.norm_mlp = nn.LayerNorm(hidden_size)

    def forward(
        self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor
    ) -> torch.Tensor:
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory, need_weights=False)[0]
        queries = self.norm_cross(queries + attended)
        q = queries + query_pos
        queries = self.norm_self(queries + self.self_attn(q, q, queries, need_weights=False)[0])
        return self.norm_mlp(queries + self.mlp(queries))


class QueryDecoder(nn.Module):
    """``N`` learnable queries refined by cross-attention to multi-scale CNN features, one scale per layer.

    Args:
        feature_channels: channels of the feature maps it is given, in the order given (the
            3D-TransUNet uses the CNN decoder's outputs from coarse to fine, without the finest).
        hidden_size: query width ``d`` (divisible by 6 for the 3-D sin-cos embeddings and by
            ``num_heads``).
        num_queries: ``N``.
        num_layers: layers; layer ``l`` attends to feature map ``l mod len(feature_channels)``.
        num_heads: attention heads.
        mlp_dim: MLP width of each layer.
        dropout_rate: dropout in attention and MLPs.

    Shapes:
        ``forward(features)``: feature maps ``(B, C_s, X_s, Y_s, Z_s)``; returns the query states
        after every layer, ``num_layers`` tensors ``(B, N, d)`` (last = final).
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        *,
        hidden_size: int,
        num_queries: int,
        num_layers: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % 6 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by 6 (3-D sin-cos position embeddings) "
                f"and by num_heads {num_heads}"
            )
        self.hidden_size = int(hidden_size)
        self.query_feat = nn.Parameter(torch.zeros(num_queries, hidden_size))
        self.query_pos = nn.Parameter(torch.zeros(num_queries, hidden_size))
        nn.init.normal_(self.query_feat, std=0.02)
        nn.init.normal_(self.query_pos, std=0.02)
        self.input_proj = nn.ModuleList(nn.Conv3d(int(c), hidden_size, kernel_size=1) for c in feature_channels)
        self.level_embed = nn.Parameter(torch.zeros(len(feature_channels), hidden_size))
        nn.init.normal_(self.level_embed, std=0.02)
        self.layers = nn.ModuleList(
            QueryDecoderLayer(hidden_size, num_heads, mlp_dim, dropout_rate) for _ in range(num_layers)
        )
        self._pos_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def position_embedding(self, grid: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Fixed 3-D sin-cos embedding ``(1, X*Y*Z, d)`` of a feature grid (cached per grid)."""
        key = tuple(int(g) for g in grid)
        pos = self._pos_cache.get(key)
        if pos is None:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)  # inside MONAI
                pos = build_sincos_position_embedding(list(key), self.hidden_size, 3).detach().clone()
            self._pos_cache[key] = pos
        return pos.to(device=like.device, dtype=like.dtype)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != len(self.input_proj):
            raise ValueError(f"QueryDecoder: expected {len(self.input_proj)} feature maps, got {len(features)}")
        memories = []
        for index, (feature, proj) in enumerate(zip(features, self.input_proj)):
            tokens = proj(feature).flatten(2).transpose(1, 2)  # (B, T, d), x slowest
            memories.append((tokens + self.level_embed[index], self.position_embedding(feature.shape[2:], tokens)))
        batch = features[0].shape[0]
        queries = self.query_feat.unsqueeze(0).expand(batch, -1, -1)
        query_pos = self.query_pos.unsqueeze(0).expand(batch, -1, -1)
        states = []
        for index, layer in enumerate(self.layers):
            memory, memory_pos = memories[index % len(memories)]
            queries = layer(queries, query_pos, memory, memory_pos)
            states.append(queries)
        return states

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pos_cache"] = {}
        return state


class QueryHead(nn.Module):
    """Class logits and mask logits of each query.

    Args:
        hidden_size: query width ``d``.
        num_classes: regions ``K`` (the head predicts ``K + 1`` logits, the last = no object).
        mask_channels: channels ``C`` of the feature map the masks are computed on.

    Shapes:
        ``forward(queries (B, N, d), mask_features (B, C, X, Y, Z))`` ->
        ``(class_logits (B, N, K + 1), mask_logits (B, N, X, Y, Z))``.
    """

    def __init__(self, hidden_size: int, num_classes: int, mask_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.class_embed = nn.Linear(hidden_size, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, hidden_size),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_size, mask_channels),
        )

    def forward(self, queries: torch.Tensor, mask_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm(queries)
        masks = torch.einsum("bqc,bcxyz->bqxyz", self.mask_embed(q), mask_features)
        return self.class_embed(q), masks


def region_probabilities(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """:math:`p_r(x) = \\max_q \\operatorname{softmax}(c_q)_r \\, \\sigma(M_q(x))` (module docstring).

    Args:
        class_logits: ``(B, N, K + 1)``, the last class = no object.
        mask_logits: ``(B, N, X, Y, Z)``.

    Returns:
        ``(B, K, X, Y, Z)`` float32 probabilities in ``[0, 1]``.
    """
    if class_logits.ndim != 3 or mask_logits.ndim < 3 or class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            f"expected class_logits (B, N, K + 1) and mask_logits (B, N, *spatial) with the same B, N; "
            f"got {tuple(class_logits.shape)} and {tuple(mask_logits.shape)}"
        )
    votes = torch.softmax(class_logits.float(), dim=-1)[..., :-1]  # (B, N, K)
    masks = torch.sigmoid(mask_logits.float())
    extra = (1,) * (mask_logits.ndim - 2)
    # one region at a time: never materialise (B, N, K, X, Y, Z)
    return torch.stack(
        [(votes[:, :, r].reshape(*votes.shape[:2], *extra) * masks).amax(dim=1) for r in range(votes.shape[-1])],
        dim=1,
    )


def region_logits(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """:math:`\\operatorname{logit}(p_r)` of :func:`region_probabilities` (clamped to ``[1e-6, 1 - 1e-6]``)."""
    return torch.logit(region_probabilities(class_logits, mask_logits), eps=EPS)

"""EdgeConv point encoder (DGCNN): per-point embeddings from local kNN neighbourhoods."""

from __future__ import annotations

import torch
from torch import nn


def knn_indices(xyz: torch.Tensor, k: int, chunk_size: int = 4096,
                max_elements: int = 1 << 24) -> torch.Tensor:
    """Indices (N, k) of each point's k nearest neighbours (itself included), by xyz distance.

    Rows are processed in chunks so memory is O(chunk_size * N), not O(N^2): at most
    ``max_elements`` distances (64 MB in fp32) at a time, so whole S3DIS rooms fit too.
    """
    num_points = xyz.shape[0]
    k = min(k, num_points)
    chunk_size = max(1, min(chunk_size, max_elements // max(num_points, 1)))
    chunks = []
    for start in range(0, num_points, chunk_size):
        dist = torch.cdist(xyz[start : start + chunk_size], xyz)  # (chunk, N)
        chunks.append(dist.topk(k, dim=1, largest=False).indices)
    if not chunks:
        return torch.zeros((0, k), dtype=torch.long, device=xyz.device)
    return torch.cat(chunks)  # (N, k)


class EdgeConv(nn.Module):
    """h_i = max_j MLP([x_i, x_j - x_i]) over the kNN j of i: local geometry, order invariant."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_dim, out_dim),
            nn.LayerNorm(out_dim),
            nn.GELU(),
            nn.Linear(out_dim, out_dim),
        )

    def forward(self, features: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """features (N, C_in), neighbours (N, k) -> (N, C_out)."""
        centre = features.unsqueeze(1)  # (N, 1, C)
        edges = features[neighbours] - centre  # (N, k, C)
        pairs = torch.cat([centre.expand_as(edges), edges], dim=-1)  # (N, k, 2C)
        return self.mlp(pairs).amax(dim=1)  # (N, C_out)


class PointEncoder(nn.Module):
    """Stack of EdgeConv layers on (xyz, rgb) points, with residual connections.

    The first layer's neighbourhoods come from xyz; later layers reuse them (static graph), which
    keeps the cost at one kNN search per scene.

    Args:
        in_dim: input channels per point (6 = xyz + rgb).
        embed_dim: output embedding width D.
        num_layers: number of EdgeConv layers.
        k_neighbors: neighbourhood size.
    """

    def __init__(self, in_dim: int = 6, embed_dim: int = 64, num_layers: int = 2,
                 k_neighbors: int = 12) -> None:
        super().__init__()
        self.k_neighbors = k_neighbors
        self.input_proj = nn.Linear(in_dim, embed_dim)
        self.layers = nn.ModuleList(EdgeConv(embed_dim, embed_dim) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points (N, in_dim) -> embeddings (N, D)."""
        neighbours = knn_indices(points[:, :3], self.k_neighbors)  # (N, k)
        features = self.input_proj(points)  # (N, D)
        for layer in self.layers:
            features = features + layer(features, neighbours)
        return self.norm(features)

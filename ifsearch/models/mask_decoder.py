"""Mask2Former-style transformer mask decoder over a batch of variable-size point sets.

Each layer: queries cross-attend to the point embeddings (optionally masked by the previous
layer's masks, Mask2Former's masked attention), then self-attend, then an FFN. Prediction heads
run on the initial queries and after every layer; the last prediction is the output and the
earlier ones are ``aux_outputs`` for deep supervision.
"""

from __future__ import annotations

import torch
from torch import nn


class DecoderLayer(nn.Module):
    """Cross-attention (queries -> points), self-attention, FFN; post-norm as in Mask2Former."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_self = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        padding: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """queries (B, M, D), memory (B, N, D), padding (B, N) True = pad -> (B, M, D).

        attn_mask: (B * heads, M, N) bool, True = may not attend, or None.
        """
        attended, _ = self.cross_attn(
            queries + query_pos,
            memory + memory_pos,
            memory,
            key_padding_mask=None if attn_mask is not None else padding,
            attn_mask=attn_mask,
            need_weights=False,
        )
        queries = self.norm_cross(queries + attended)
        q = queries + query_pos
        attended, _ = self.self_attn(q, q, queries, need_weights=False)
        queries = self.norm_self(queries + attended)
        return self.norm_ffn(queries + self.ffn(queries))


class MaskDecoder(nn.Module):
    """M learned queries -> class logits (B, M, C+1) and per-scene mask logits (N_i, M).

    Args:
        dim: embedding width D of queries and point embeddings.
        num_classes: C real classes (the head has C+1 outputs, the last is "no object").
        num_queries: M.
        num_layers: L decoder layers.
        num_heads: attention heads.
        ffn_dim: hidden width of the FFN.
        dropout: attention/FFN dropout.
        masked_attention: restrict each query's cross-attention to the points its previous-layer
            mask claims (sigmoid > 0.5); a query claiming nothing attends everywhere.
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int, num_layers: int,
                 num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 masked_attention: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.masked_attention = masked_attention
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.point_pos = nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes + 1)
        self.mask_head = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)
        )

    def forward(self, embeddings: list[torch.Tensor], xyz: list[torch.Tensor]) -> dict:
        """embeddings: per scene (N_i, D); xyz: per scene (N_i, 3).

        Returns {"pred_logits": (B, M, C+1), "pred_masks": [(N_i, M)], "aux_outputs": [...]}.
        """
        batch = len(embeddings)
        lengths = [e.shape[0] for e in embeddings]
        memory = nn.utils.rnn.pad_sequence(embeddings, batch_first=True)  # (B, Nmax, D)
        positions = nn.utils.rnn.pad_sequence(xyz, batch_first=True)  # (B, Nmax, 3)
        memory_pos = self.point_pos(positions)  # (B, Nmax, D)
        arange = torch.arange(memory.shape[1], device=memory.device)
        padding = arange[None, :] >= torch.tensor(lengths, device=memory.device)[:, None]

        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, M, D)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions = [self._predict(queries, memory, lengths)]
        for layer in self.layers:
            attn_mask = self._attention_mask(predictions[-1][2], padding)
            queries = layer(queries, query_pos, memory, memory_pos, padding, attn_mask)
            predictions.append(self._predict(queries, memory, lengths))

        def as_output(pred: tuple) -> dict:
            return {"pred_logits": pred[0], "pred_masks": pred[1]}

        out = as_output(predictions[-1])
        out["aux_outputs"] = [as_output(p) for p in predictions[:-1]]
        return out

    def _predict(self, queries: torch.Tensor, memory: torch.Tensor, lengths: list[int]):
        """Heads on the current queries: class logits, per-scene masks, padded mask logits."""
        normed = self.out_norm(queries)
        class_logits = self.class_head(normed)  # (B, M, C+1)
        mask_embed = self.mask_head(normed)  # (B, M, D)
        padded = torch.einsum("bnd,bmd->bnm", memory, mask_embed)  # (B, Nmax, M)
        masks = [padded[b, :n] for b, n in enumerate(lengths)]  # B x (N_i, M)
        return class_logits, masks, padded

    def _attention_mask(self, mask_logits: torch.Tensor, padding: torch.Tensor):
        """(B*heads, M, Nmax) bool, True = blocked, or None when masked attention is off."""
        if not self.masked_attention:
            return None
        blocked = (mask_logits.detach() < 0).transpose(1, 2) | padding[:, None, :]  # (B, M, Nmax)
        # A query that claims no point would attend to nothing (NaN): let it see every real point.
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True) | padding[:, None, :]
        return blocked.repeat_interleave(self.num_heads, dim=0)

"""Mask2Former-style transformer mask decoder over variable-size point sets or image features.

Each layer: queries cross-attend to the point embeddings or to one image feature level (optionally
masked by the previous layer's masks, Mask2Former's masked attention), then self-attend, then an
FFN. Prediction heads
run on the initial queries and after every layer; the last prediction is the output and the
earlier ones are ``aux_outputs`` for deep supervision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ifsearch.losses.influencer import mask_log_probs

# Masked attention lets query m see point i when p_im >= 0.5 (Mask2Former's sigmoid > 0.5).
LOG_HALF = math.log(0.5)


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
    """M learned queries -> class logits (B, M, C+1) and mask logits per scene or per image.

    The decoder is the same for both modalities; only what the queries cross-attend to and where
    masks are read out differ: point clouds give one memory (the point embeddings, also used for
    masks), images give several feature levels visited round-robin, coarsest first, with masks
    read out on a finer pixel-embedding map (Mask2Former).

    Args:
        dim: embedding width D of queries and point/pixel embeddings.
        num_classes: C real classes (the head has C+1 outputs, the last is "no object").
        num_queries: M.
        num_layers: L decoder layers.
        num_heads: attention heads.
        ffn_dim: hidden width of the FFN.
        dropout: attention/FFN dropout.
        masked_attention: restrict each query's cross-attention to the points its previous-layer
            mask claims (p > 0.5); a query claiming nothing attends everywhere.
        num_feature_levels: image feature levels the queries visit (0 for point clouds).
        mask_prob: how p is read from the mask logits, as the loss reads it ("sigmoid", or
            "softmax" over the queries and a background slot; ``mask_log_probs``).
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int, num_layers: int,
                 num_heads: int, ffn_dim: int, dropout: float = 0.0,
                 masked_attention: bool = False, num_feature_levels: int = 0,
                 mask_prob: str = "sigmoid") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.masked_attention = masked_attention
        self.mask_prob = mask_prob
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        # Positional information: an MLP of xyz for points, a learned embedding per image level
        # (added to fixed 2-D sine encodings). Only the one in use exists, so DDP finds no
        # parameter without a gradient.
        if num_feature_levels:
            self.level_embed = nn.Embedding(num_feature_levels, dim)
        else:
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
        """Point clouds. embeddings: per scene (N_i, D); xyz: per scene (N_i, 3).

        Returns {"pred_logits": (B, M, C+1), "pred_masks": [(N_i, M)], "aux_outputs": [...]}.
        """
        lengths = [e.shape[0] for e in embeddings]
        memory = nn.utils.rnn.pad_sequence(embeddings, batch_first=True)  # (B, Nmax, D)
        positions = nn.utils.rnn.pad_sequence(xyz, batch_first=True)  # (B, Nmax, 3)
        memory_pos = self.point_pos(positions)  # (B, Nmax, D)
        arange = torch.arange(memory.shape[1], device=memory.device)
        padding = arange[None, :] >= torch.tensor(lengths, device=memory.device)[:, None]

        def read_masks(mask_embed: torch.Tensor, level: int):
            padded = torch.einsum("bnd,bmd->bnm", memory, mask_embed)  # (B, Nmax, M)
            return [padded[b, :n] for b, n in enumerate(lengths)], padded  # B x (N_i, M)

        return self._decode([(memory, memory_pos, padding)], read_masks)

    def forward_images(self, levels: list[torch.Tensor], level_pos: list[torch.Tensor],
                       mask_features: torch.Tensor) -> dict:
        """Images. levels: feature maps (B, D, h_l, w_l), coarsest first; level_pos: their
        positional encodings (h_l * w_l, D); mask_features: pixel embeddings (B, D, H', W').

        Returns {"pred_logits": (B, M, C+1), "pred_masks": (B, M, H', W'), "aux_outputs": [...]}.
        """
        memories = [
            (f.flatten(2).transpose(1, 2),  # (B, h*w, D)
             (pos + self.level_embed.weight[i]).unsqueeze(0).expand(f.shape[0], -1, -1),
             None)
            for i, (f, pos) in enumerate(zip(levels, level_pos, strict=True))
        ]
        sizes = [f.shape[-2:] for f in levels]

        def read_masks(mask_embed: torch.Tensor, level: int):
            masks = torch.einsum("bmd,bdhw->bmhw", mask_embed, mask_features)  # (B, M, H', W')
            # Masked attention needs the masks at the resolution of the level attended next.
            coarse = F.interpolate(masks, size=sizes[level], mode="bilinear", align_corners=False)
            return masks, coarse.flatten(2).transpose(1, 2)  # (B, h*w, M)

        return self._decode(memories, read_masks)

    def _decode(self, memories: list[tuple], read_masks) -> dict:
        """Run the layers; layer i attends to ``memories[i % len(memories)]``.

        memories: (memory (B, L, D), memory_pos (B, L, D), padding (B, L) bool or None) per level.
        read_masks(mask_embed (B, M, D), level) -> (output masks, attention logits (B, L_level, M)).
        """
        batch = memories[0][0].shape[0]
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)  # (B, M, D)
        query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)

        predictions = [self._predict(queries, read_masks, level=0)]
        for i, layer in enumerate(self.layers):
            memory, memory_pos, padding = memories[i % len(memories)]
            attn_mask = self._attention_mask(predictions[-1][2], padding)
            queries = layer(queries, query_pos, memory, memory_pos, padding, attn_mask)
            predictions.append(self._predict(queries, read_masks, level=(i + 1) % len(memories)))

        def as_output(pred: tuple) -> dict:
            return {"pred_logits": pred[0], "pred_masks": pred[1]}

        out = as_output(predictions[-1])
        out["aux_outputs"] = [as_output(p) for p in predictions[:-1]]
        return out

    def _predict(self, queries: torch.Tensor, read_masks, level: int):
        """Heads on the current queries: class logits, output masks, attention mask logits."""
        normed = self.out_norm(queries)
        class_logits = self.class_head(normed)  # (B, M, C+1)
        mask_embed = self.mask_head(normed)  # (B, M, D)
        masks, attention_logits = read_masks(mask_embed, level)
        return class_logits, masks, attention_logits

    def _attention_mask(self, mask_logits: torch.Tensor, padding: torch.Tensor | None):
        """(B*heads, M, L) bool, True = blocked, or None when masked attention is off.

        Blocked where log p_im < log 0.5 with p read as the loss reads it (``mask_prob``): in
        softmax mode a logit above 0 is not yet p > 0.5, since the queries share each point.

        mask_logits: (B, L, M); padding: (B, L) True = padded position, or None (images).
        """
        if not self.masked_attention:
            return None
        log_p = mask_log_probs(mask_logits.detach().float(), self.mask_prob)  # (B, L, M)
        blocked = (log_p < LOG_HALF).transpose(1, 2)  # (B, M, L)
        if padding is not None:
            blocked = blocked | padding[:, None, :]
        # A query that claims no point would attend to nothing (NaN): let it see every real point.
        blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
        if padding is not None:
            blocked = blocked | padding[:, None, :]
        return blocked.repeat_interleave(self.num_heads, dim=0)

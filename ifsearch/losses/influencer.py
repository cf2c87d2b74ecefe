"""The mask-matrix Influencer Loss (InfluencerFormer seeds; DESIGN.md "The loss").

For an (N, M) matrix of mask logits (N points, M queries) and K ground-truth instances with point
sets S_k:

    log p_im   = logsigmoid(x_im)                      ("sigmoid")
               = log_softmax([x_i1 .. x_iM, 0])_m       ("softmax": M queries + a background slot)
    g_km       = mean_{i in S_k} log p_im               log geometric mean of query m over instance k
    A          = mean_k  -T * logsumexp_m(g_km / T)     attraction: some query claims all of k
    P_k        = exp(g_k.)                              the instance's query profile, in [0, 1]^M
    R          = mean_{k != l} max(0, margin - sqrt(||P_k - P_l||^2 + eps))
    B          = mean_{i in background, m} p_im         background suppression
    loss       = attr_weight * A + rep_weight * R + bg_weight * B

Everything is dense algebra on (K, N) x (N, M) products: no loop over instances, and no host
synchronisation when the instance membership is given as a (K, N) mask (the criterion's path).
The softmax background slot has a fixed logit 0, so with M = 1 the softmax mode equals the sigmoid one.

Speed (benchmarks/loss_speed.py): the only (N, M) work is in :class:`_MaskMatrixTerms`, which
reduces the mask matrix to g (K, M) and the background sum with a hand-written backward, so no
(N, M) intermediate is kept for autograd. In softmax mode log p_im = x_im - lse_i, so
g_km = (sum_{i in S_k} x_im - sum_{i in S_k} lse_i) / |S_k| needs only the (N,) row
log-sum-exps, and the background sum of p over the M queries is 1 - p(background slot) =
1 - exp(-lse_i), an (N,) quantity. On CPU the points go through in large chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MASK_PROB_MODES = ("sigmoid", "softmax")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def mask_log_probs(mask_logits: torch.Tensor, mask_prob: str) -> torch.Tensor:
    """Log mask probabilities log p_im, (N, M), in the given normalisation.

    Shared with inference so training and prediction read the mask matrix the same way.
    """
    if mask_prob == "sigmoid":
        return F.logsigmoid(mask_logits)
    if mask_prob == "softmax":
        background_slot = mask_logits.new_zeros(mask_logits.shape[:-1] + (1,))
        return torch.log_softmax(torch.cat([mask_logits, background_slot], dim=-1), dim=-1)[..., :-1]
    raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")


class MaskInfluencerLoss(nn.Module):
    """Influencer Loss on an (N, M) mask matrix: attraction, repulsion and background terms.

    Args:
        attr_weight: weight of the attraction term A.
        rep_weight: weight of the repulsion term R.
        bg_weight: weight of the background term B.
        margin: hinge margin on the L2 distance between instance profiles. Profiles live in
            [0, 1]^M, so two instances claimed by different queries are at most sqrt(2) apart.
        temperature: T of the soft maximum over queries; small T approaches a hard max.
        mask_prob: "sigmoid" (independent per query) or "softmax" (over queries + background slot).
        eps: added inside the square root of the profile distance so equal profiles do not give
            NaN gradients.
    """

    def __init__(
        self,
        attr_weight: float = 1.0,
        rep_weight: float = 1.0,
        bg_weight: float = 1.0,
        margin: float = 1.0,
        temperature: float = 1.0,
        mask_prob: str = "sigmoid",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if mask_prob not in MASK_PROB_MODES:
            raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.attr_weight = attr_weight
        self.rep_weight = rep_weight
        self.bg_weight = bg_weight
        self.margin = margin
        self.temperature = temperature
        self.mask_prob = mask_prob
        self.eps = eps

    def forward(
        self,
        mask_logits: torch.Tensor,
        instance_labels: torch.Tensor,
        num_instances: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss from per-point instance labels.

        Args:
            mask_logits: (N, M) float mask logits.
            instance_labels: (N,) long, 0 = background, k > 0 = instance k. Ids need not be
                contiguous: ids that no point carries are ignored.
            num_instances: the largest instance id, if known. When None it is read from the
                labels, which is a host synchronisation on GPU; the criterion passes masks instead.

        Returns:
            dict with scalar "loss", "attractive", "repulsive", "background", and the (K, M)
            "log_geomean" g_km (K = num_instances) used to derive class targets.
        """
        if num_instances is None:
            num_instances = int(instance_labels.max()) if instance_labels.numel() else 0
        one_hot = F.one_hot(instance_labels, num_instances + 1)  # (N, K+1)
        instance_masks = one_hot[:, 1:].T.bool()  # (K, N)
        return self.forward_masks(mask_logits, instance_masks, background=instance_labels == 0)

    def forward_masks(
        self,
        mask_logits: torch.Tensor,
        instance_masks: torch.Tensor,
        background: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss from a (K, N) bool instance membership matrix (rows may be empty: they are ignored).

        Args:
            mask_logits: (N, M) float mask logits.
            instance_masks: (K, N) bool, instance k's points.
            background: (N,) bool background points; by default the points in no instance.
        """
        # At least fp32, even when the model ran under bf16/fp16 autocast.
        logits = mask_logits.float() if mask_logits.dtype in LOW_PRECISION else mask_logits
        # g_km, the log geometric mean of p_im over the points of instance k, the summed probability
        # of every query over the background points, and the point counts of instances/background.
        g, bg_prob_sum, counts, num_background = _MaskMatrixTerms.apply(
            logits, instance_masks, background, self.mask_prob
        )  # (K, M), (), (K,), ()
        valid = (counts > 0).to(logits.dtype)  # (K,) empty instances take no part

        # Attraction: some query claims all of instance k.
        t = self.temperature
        attraction_k = -t * torch.logsumexp(g / t, dim=1)  # (K,)
        attractive = (attraction_k * valid).sum() / valid.sum().clamp(min=1)

        # Repulsion: hinge on distances between instance profiles P_k = exp(g_k.), via the Gram
        # matrix so no (K, K, M) tensor is materialised.
        profiles = g.exp()  # (K, M)
        sq_norms = (profiles * profiles).sum(dim=1)  # (K,)
        sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * profiles @ profiles.T  # (K, K)
        dist = (sq_dist.clamp(min=0) + self.eps).sqrt()
        pair_valid = valid[:, None] * valid[None, :]
        pair_valid = pair_valid * (1.0 - torch.eye(len(valid), device=g.device, dtype=g.dtype))
        hinge = F.relu(self.margin - dist)  # (K, K)
        repulsive = (hinge * pair_valid).sum() / pair_valid.sum().clamp(min=1)

        # Background: mean probability any query gives to a background point.
        num_queries = logits.shape[1]
        denominator = (num_background * num_queries).clamp(min=1)
        background_term = bg_prob_sum / denominator

        loss = (
            self.attr_weight * attractive
            + self.rep_weight * repulsive
            + self.bg_weight * background_term
        )
        return {
            "loss": loss,
            "attractive": attractive,
            "repulsive": repulsive,
            "background": background_term,
            "log_geomean": g,
        }


# Elements of the (N, M) mask matrix per chunk on CPU (2^22 fp32 values are 16 MiB). Chunks bound
# the temporaries (exp, sigmoid) to one chunk. At N=20k, M=400 on one thread, chunks of 2^17..2^22
# elements were 10-20% faster than whole-matrix ops; but with other processes competing for the two
# cores, each op, however small, can cost a scheduler time slice (two OpenMP threads must both run),
# and small chunks (many ops) were then 2-4x slower. 2^22 keeps the op count low.
# GPUs take the whole matrix at once.
CPU_CHUNK_ELEMENTS = 1 << 22


def _row_chunks(x: torch.Tensor) -> list[slice]:
    """Row slices of the (N, M) matrix ``x``: cache-sized on CPU, one slice otherwise."""
    n, m = x.shape
    if x.device.type != "cpu" or not x.is_contiguous():
        return [slice(0, n)] if n else []
    rows = max(1, CPU_CHUNK_ELEMENTS // max(m, 1))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


# Below this logit, log sigmoid(x) = x - log1p(exp(x)) equals x to within exp(-30) ~ 1e-13, and
# sigmoid(x) heads for fp32 underflow (exp(-88)), where log(sigmoid(x)) loses precision or is -inf.
LOG_SIGMOID_LINEAR_BELOW = -30.0


def _log_sigmoid_from(prob: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log sigmoid(x) from p = sigmoid(x), in place on ``prob``.

    log(p) plus a fix-up of the far negative tail is several times faster than F.logsigmoid on
    CPU (whose kernel also writes a second (N, M) buffer), and p is needed anyway for the
    background term.
    """
    log_p = prob.log_()
    # On CPU, reading the chunk's minimum (no host sync there) is cheaper than the fix-up, which
    # real logits rarely need.
    if logits.device.type != "cpu" or logits.amin() < LOG_SIGMOID_LINEAR_BELOW:
        torch.where(logits < LOG_SIGMOID_LINEAR_BELOW, logits, log_p, out=log_p)
    return log_p


class _MaskMatrixTerms(torch.autograd.Function):
    """The reductions of the (N, M) mask matrix the loss needs, with a hand-written backward.

    forward(x (N, M), masks (K, N) bool, background (N,) bool or None, mask_prob) returns
    g = (masks @ log p) / counts, (K, M); the background sum sum_{i in bg, m} p_im, (); and, not
    differentiable, counts (K,) and the number of background points (), both in x's dtype.
    ``background=None`` means the points in no instance.

    Softmax: lse_i = log(1 + sum_m exp(x_im)) (the background slot has logit 0), log p = x - lse,
    so g = (masks @ x - masks @ lse) / counts and sum_m p_im = 1 - exp(-lse_i):
    d/dx_im = (masks^T D)_im + a_i p_im with D = dL/dg / counts and
    a_i = -(masks^T D 1)_i + dL/dB bg_i exp(-lse_i); p_im = exp(x_im - lse_i) is recomputed chunk by
    chunk rather than stored. Sigmoid: with s = sigmoid(x), d log s / dx = 1 - s and
    ds/dx = s (1 - s), so d/dx = (1 - s) * (masks^T D + dL/dB bg_i s). Besides the inputs, only
    (N,) vectors and the (K, N) membership as floats are saved for the backward. Few ops per chunk:
    under CPU contention each op, however small, can cost a scheduler time slice.
    """

    @staticmethod
    def forward(ctx, x, masks, background, mask_prob):  # noqa: D102
        n, m = x.shape
        member = masks.to(x.dtype)  # (K, N): one copy, 1/M of the logits, sliced per chunk
        if background is None:
            background = ~masks.any(dim=0)  # (N,)
        bg = background.to(x.dtype)  # (N,)
        total = x.new_zeros(member.shape[0], m)  # (K, M) sum over each instance of log p
        if mask_prob == "softmax":
            # lse_i = log(1 + sum_m exp(x_im)) = c_i + log(exp(-c_i) + sum_m exp(x_im - c_i)) with
            # c_i = max(0, max_m x_im), so that neither the exp nor an all -inf row overflows.
            shift, sum_exp = x.new_empty(n), x.new_empty(n)  # (N,) c_i, sum_m exp(x_im - c_i)
            for rows in _row_chunks(x):
                xc = x[rows]  # (n_c, M)
                total.addmm_(member[:, rows], xc)
                c = torch.amax(xc, dim=1, out=shift[rows]).clamp_(min=0.0)  # (n_c,)
                torch.sum(torch.sub(xc, c[:, None]).exp_(), dim=1, out=sum_exp[rows])
            lse = shift + torch.log(sum_exp + torch.exp(-shift))  # (N,)
            total.sub_((member @ lse)[:, None])
            bg_sum = -(bg @ torch.expm1(-lse))  # sum_m p_im = 1 - exp(-lse_i)
        else:
            lse = None
            bg_per_query = x.new_zeros(m)  # (M,)
            for rows in _row_chunks(x):
                xc = x[rows]  # (n_c, M)
                prob = torch.sigmoid(xc)  # (n_c, M)
                bg_per_query.addmv_(prob.T, bg[rows])
                total.addmm_(member[:, rows], _log_sigmoid_from(prob, xc))
            bg_sum = bg_per_query.sum()
        counts = member.sum(dim=1)  # (K,)
        safe_counts = counts.clamp(min=1)
        ctx.mask_prob = mask_prob
        num_background = bg.sum()
        ctx.mark_non_differentiable(counts, num_background)
        ctx.save_for_backward(x, member, bg, safe_counts, lse)
        return total / safe_counts[:, None], bg_sum, counts, num_background

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_g, grad_bg, _grad_counts, _grad_num_background):  # noqa: D102
        x, member, bg, counts, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)  # (N, M)
        scaled = (grad_g / counts[:, None]).to(x.dtype)  # (K, M) dL/d(sum over instance)
        if ctx.mask_prob == "softmax":
            # a_i = dL/dB bg_i exp(-lse_i) - sum_k member_ki sum_m scaled_km, (N,)
            coef = torch.addmv(bg * grad_bg * torch.exp(-lse), member.T, scaled.sum(dim=1),
                               alpha=-1.0)
        else:
            bg_grad = bg * grad_bg  # (N,)
        for rows in _row_chunks(x):
            xc, out = x[rows], grad_x[rows]  # (n_c, M)
            torch.mm(member[:, rows].T, scaled, out=out)
            if ctx.mask_prob == "softmax":
                out.addcmul_(coef[rows, None], torch.sub(xc, lse[rows, None]).exp_())
            else:
                prob = torch.sigmoid(xc)  # (n_c, M)
                out.addcmul_(bg_grad[rows, None], prob)  # member^T D + dL/dB bg s
                out.addcmul_(out, prob, value=-1.0)  # ... times (1 - s)
        return grad_x, None, None, None

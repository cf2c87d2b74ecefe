"""The mask-matrix Influencer Loss (InfluencerFormer seeds; DESIGN.md "The loss").

For an (N, M) matrix of mask logits (N points, M queries) and K ground-truth instances with point
sets S_k (foreground F = the points of any instance; background Bg = the points of none, unless
given), over the non-empty instances k:

    log p_im = logsigmoid(x_im)                          ("sigmoid")
             = log_softmax([x_i1 .. x_iM, 0])_m           ("softmax": M queries + a background slot)
    g_km     = mean_{i in S_k} log p_im                   ("geometric", the seed)
             = log max(mean_{i in S_k} p_im, tiny)        ("arithmetic", the seed's ablation)
    A        = mean_k  -T * logsumexp_m(g_km / T)         attraction: some query claims all of k
    P_k      = exp(g_k.)                                  the instance's query profile, in [0, 1]^M
    R        = mean_{k != l} max(0, margin - sqrt(||P_k - P_l||^2 + eps))
    B        = mean_{i in Bg} mean_m p_im                 ("sigmoid") background suppression
             = mean_{i in Bg} sum_m p_im                  ("softmax"): 1 - p(background slot)
    Spill    = mean_k sum_m c_km o_km                     spill-over onto other instances
        c_km = softmax_m(g_km / T), detached              instance k's soft assignment to queries
        o_km = (U_m - V_km) / max(|F| - |S_k|, 1)         query m's mean p over the other instances
        V_km = sum_{i in S_k} p_im,  U_m = sum_{i in F} p_im
    Dup      = mean_k (sum_m P_km - max_m P_km)           claims on k by all but its strongest query
    loss     = attr_weight A + rep_weight R + bg_weight B
               + spill_weight Spill + duplicate_weight Dup

B and Spill are in [0, 1], R in [0, margin], Dup in [0, 1] in softmax mode (a point's p sums to at
most 1 over the queries, and a geometric or arithmetic mean over points keeps that) and in
[0, M - 1] in sigmoid mode. Why each piece:

- B is normalised so that ``bg_weight`` means the same in both modes: in sigmoid mode each query's
  p_im is in [0, 1] and the mean over queries is; in softmax mode the queries share one unit of
  probability per point, so their *sum* (1 - the background slot) is the [0, 1] quantity, and a
  mean over queries would be at most 1/M (an M times weaker term for the same weight).
- Arithmetic mean: the log is clamped at the dtype's smallest normal number ``tiny``, so an
  instance whose points all give query m p = 0 has a finite g_km (and, below the clamp, no
  gradient). "log_geomean" in the output is this g whichever the mean (the key keeps its name).
  Known weakness, measured not assumed: at T = 1, sum_m exp(g_km) = mean_{i in S_k} sum_m p_im,
  so A_k no longer cares which query claims which point, only how much probability the instance
  gets in all (in softmax mode 1 - p(background slot)); a mixed assignment then scores as well
  as the correct one and only R (or T < 1) tells them apart.
- Spill: attraction and background push a claiming query up on its instance and down on the
  background, but nothing pushes it down on *other instances* (in sigmoid mode a mask can cover
  several instances unpunished). c_km are the weights the attraction's gradient gives query m on
  instance k (dA_k/dg_km = -c_km), so Spill charges each query for the points of other instances
  in proportion to how much it is being made to claim k. Background points are left to B. o_km is
  0 when k is the only instance (no other instance points). Weight 0 (the default) skips it.
- Dup: -T logsumexp_m rewards several queries claiming one instance (by up to T log M), which trains
  duplicates. Dup is the claim strength on k of every query but the strongest; it is 0 iff one query
  alone claims k, and its gradient (dDup/dP_km = 1 for m not the argmax, 0 for the argmax) reaches
  every other query and never the strongest, so it removes the duplicates' reward without pulling
  against the attraction of the winner. Weight 0 (the default) skips it.

Everything is dense algebra on (K, N) x (N, M) products: no loop over instances, and no host
synchronisation when the instance membership is given as a (K, N) mask (the criterion's path).
The softmax background slot has a fixed logit 0, so with M = 1 the softmax mode equals the sigmoid one.

Speed (benchmarks/loss_speed.py): the only (N, M) work is in :class:`_MaskMatrixTerms`, which
reduces the mask matrix to the (K, M) sums of log p (geometric) and of p (arithmetic, spill), the
(M,) foreground sum of p (spill) and the background sum, with a hand-written backward, so no
(N, M) intermediate is kept for autograd. In softmax mode log p_im = x_im - lse_i, so
sum_{i in S_k} log p_im = sum_{i in S_k} x_im - sum_{i in S_k} lse_i needs only the (N,) row
log-sum-exps, and the background sum of p over the M queries is 1 - p(background slot) =
1 - exp(-lse_i), an (N,) quantity. On CPU the points go through in large chunks. Only what the
configuration uses is computed: the default (geometric, no spill) takes no sum of p at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MASK_PROB_MODES = ("sigmoid", "softmax")
MEANS = ("geometric", "arithmetic")
LOW_PRECISION = (torch.float16, torch.bfloat16)


def mask_log_probs(mask_logits: torch.Tensor, mask_prob: str) -> torch.Tensor:
    """Log mask probabilities log p_im, (..., M), in the given normalisation.

    Shared with inference and the model's masked attention so that training, prediction and the
    attention gate read the mask matrix the same way.
    """
    if mask_prob == "sigmoid":
        return F.logsigmoid(mask_logits)
    if mask_prob == "softmax":
        background_slot = mask_logits.new_zeros(mask_logits.shape[:-1] + (1,))
        return torch.log_softmax(torch.cat([mask_logits, background_slot], dim=-1), dim=-1)[..., :-1]
    raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")


class MaskInfluencerLoss(nn.Module):
    """Influencer Loss on an (N, M) mask matrix: attraction, repulsion, background, options.

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
        mean: "geometric" (the seed) or "arithmetic" claim strength g_km (module docstring).
        spill_weight: weight of the spill-over term; 0 = not computed.
        duplicate_weight: weight of the duplicate term; 0 = not computed.
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
        mean: str = "geometric",
        spill_weight: float = 0.0,
        duplicate_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mask_prob not in MASK_PROB_MODES:
            raise ValueError(f"mask_prob must be one of {MASK_PROB_MODES}, got {mask_prob!r}")
        if mean not in MEANS:
            raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if spill_weight < 0 or duplicate_weight < 0:
            raise ValueError(
                f"spill_weight and duplicate_weight must be >= 0, got {spill_weight}, "
                f"{duplicate_weight}"
            )
        self.attr_weight = attr_weight
        self.rep_weight = rep_weight
        self.bg_weight = bg_weight
        self.margin = margin
        self.temperature = temperature
        self.mask_prob = mask_prob
        self.eps = eps
        self.mean = mean
        self.spill_weight = spill_weight
        self.duplicate_weight = duplicate_weight

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
            dict with scalar "loss", "attractive", "repulsive", "background", "spill",
            "duplicate" (zero when their weight is 0), the (K, M) claim strengths "log_geomean"
            g_km (K = num_instances; the log geometric or arithmetic mean, as configured) used to
            derive class targets, and "counts", the (K,) points per instance (not
            differentiable; empty instances, count 0, take no part).
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
        geometric = self.mean == "geometric"
        spill_on = self.spill_weight > 0
        foreground = instance_masks.any(dim=0) if spill_on else None  # (N,)
        log_sum, prob_sum, fg_prob_sum, bg_prob_sum, counts, num_background = (
            _MaskMatrixTerms.apply(
                logits, instance_masks, background, foreground, self.mask_prob,
                geometric, spill_on or not geometric,
            )
        )  # (K, M) or empty, (K, M) or empty, (M,) or empty, (), (K,), ()
        valid = (counts > 0).to(logits.dtype)  # (K,) empty instances take no part
        num_valid = valid.sum().clamp(min=1)
        safe_counts = counts.clamp(min=1)[:, None]  # (K, 1)
        if geometric:
            g = log_sum / safe_counts  # (K, M) mean log p over each instance
        else:
            tiny = torch.finfo(logits.dtype).tiny
            g = (prob_sum / safe_counts).clamp(min=tiny).log()  # (K, M) log of the mean p

        # Attraction: some query claims all of instance k.
        t = self.temperature
        attraction_k = -t * torch.logsumexp(g / t, dim=1)  # (K,)
        attractive = (attraction_k * valid).sum() / num_valid

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

        # Background: probability the queries give to a background point, in [0, 1] either way.
        per_point = 1 if self.mask_prob == "softmax" else logits.shape[1]
        background_term = bg_prob_sum / (num_background * per_point).clamp(min=1)

        loss = (
            self.attr_weight * attractive
            + self.rep_weight * repulsive
            + self.bg_weight * background_term
        )
        spill = duplicate = logits.new_zeros(())
        if spill_on:
            # c_km: the attraction's own soft assignment of instance k to the queries, detached.
            assignment = torch.softmax(g.detach() / t, dim=1)  # (K, M)
            others = (foreground.sum() - counts).clamp(min=1)  # (K,) |F| - |S_k|
            other_mean = (fg_prob_sum[None, :] - prob_sum) / others[:, None]  # (K, M) o_km
            spill = ((assignment * other_mean).sum(dim=1) * valid).sum() / num_valid
            loss = loss + self.spill_weight * spill
        if self.duplicate_weight > 0:
            duplicate_k = profiles.sum(dim=1) - profiles.max(dim=1).values  # (K,)
            duplicate = (duplicate_k * valid).sum() / num_valid
            loss = loss + self.duplicate_weight * duplicate
        return {
            "loss": loss,
            "attractive": attractive,
            "repulsive": repulsive,
            "background": background_term,
            "spill": spill,
            "duplicate": duplicate,
            "log_geomean": g,
            "counts": counts,
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

    forward(x (N, M), masks (K, N) bool, background (N,) bool or None, foreground (N,) bool or None,
    mask_prob, want_log, want_prob) returns

    - L = masks @ log p, (K, M), when ``want_log`` (else an empty tensor),
    - V = masks @ p, (K, M), when ``want_prob`` (else empty),
    - U = foreground @ p, (M,), when ``foreground`` is given (else empty),
    - B = sum_{i in bg, m} p_im, (),
    - and, not differentiable, counts (K,) and the number of background points (), in x's dtype.

    ``background=None`` means the points in no instance.

    Backward, with G1 = masks^T dL/dL and G2 = masks^T dL/dV + fg_i dL/dU_m + bg_i dL/dB, all
    (N, M): sigmoid (s = p, d log s/dx = 1 - s, ds/dx = s (1 - s)): dx = (1 - s) * (G1 + s * G2);
    softmax (log p_im = x_im - lse_i, lse_i = log(1 + sum_m exp(x_im)) with the background slot's
    logit 0): dx_in = G1_in + p_in (G2_in - sum_m (G1_im + p_im G2_im)). In softmax mode the
    background part of G2 is constant over m, so its share of the row sum is bg_i dL/dB
    (1 - exp(-lse_i)); the default path (only L and B) then needs nothing but (N,) vectors:
    dx = G1 + p * a_i with a_i = dL/dB bg_i exp(-lse_i) - (masks^T dL/dL 1)_i. p is recomputed
    chunk by chunk rather than stored: besides the inputs, only (N,) vectors and the (K, N)
    membership as floats are saved. Few ops per chunk: under CPU contention each op, however
    small, can cost a scheduler time slice.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx, x, masks, background, foreground, mask_prob, want_log, want_prob
    ):
        n, m = x.shape
        member = masks.to(x.dtype)  # (K, N): one copy, 1/M of the logits, sliced per chunk
        num_instances = member.shape[0]
        if background is None:
            background = ~masks.any(dim=0)  # (N,)
        bg = background.to(x.dtype)  # (N,)
        fg = None if foreground is None else foreground.to(x.dtype)  # (N,)
        empty = x.new_zeros(0)
        log_sum = x.new_zeros(num_instances, m) if want_log else empty  # (K, M)
        prob_sum = x.new_zeros(num_instances, m) if want_prob else empty  # (K, M)
        fg_sum = x.new_zeros(m) if fg is not None else empty  # (M,)
        need_prob = want_prob or fg is not None
        if mask_prob == "softmax":
            # lse_i = log(1 + sum_m exp(x_im)) = c_i + log(exp(-c_i) + sum_m exp(x_im - c_i)) with
            # c_i = max(0, max_m x_im), so that neither the exp nor an all -inf row overflows.
            shift, sum_exp = x.new_empty(n), x.new_empty(n)  # (N,) c_i, sum_m exp(x_im - c_i)
            for rows in _row_chunks(x):
                xc = x[rows]  # (n_c, M)
                if want_log:
                    log_sum.addmm_(member[:, rows], xc)
                c = torch.amax(xc, dim=1, out=shift[rows]).clamp_(min=0.0)  # (n_c,)
                scaled_exp = torch.sub(xc, c[:, None]).exp_()  # (n_c, M) exp(x_im - c_i)
                torch.sum(scaled_exp, dim=1, out=sum_exp[rows])
                if need_prob:
                    prob = scaled_exp.div_((sum_exp[rows] + torch.exp(-c))[:, None])  # (n_c, M)
                    if want_prob:
                        prob_sum.addmm_(member[:, rows], prob)
                    if fg is not None:
                        fg_sum.addmv_(prob.T, fg[rows])
            lse = shift + torch.log(sum_exp + torch.exp(-shift))  # (N,)
            if want_log:
                log_sum.sub_((member @ lse)[:, None])
            bg_sum = -(bg @ torch.expm1(-lse))  # sum_m p_im = 1 - exp(-lse_i)
        else:
            lse = None
            bg_per_query = x.new_zeros(m)  # (M,)
            for rows in _row_chunks(x):
                xc = x[rows]  # (n_c, M)
                prob = torch.sigmoid(xc)  # (n_c, M)
                bg_per_query.addmv_(prob.T, bg[rows])
                if want_prob:
                    prob_sum.addmm_(member[:, rows], prob)
                if fg is not None:
                    fg_sum.addmv_(prob.T, fg[rows])
                if want_log:  # last: the log is taken in place on prob
                    log_sum.addmm_(member[:, rows], _log_sigmoid_from(prob, xc))
            bg_sum = bg_per_query.sum()
        counts = member.sum(dim=1)  # (K,)
        num_background = bg.sum()
        ctx.mask_prob, ctx.want_log, ctx.want_prob = mask_prob, want_log, want_prob
        ctx.mark_non_differentiable(counts, num_background)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, member, bg, fg, lse)
        return log_sum, prob_sum, fg_sum, bg_sum, counts, num_background

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_log, grad_prob, grad_fg, grad_bg, _grad_counts, _grad_nbg):  # noqa: D102
        x, member, bg, fg, lse = ctx.saved_tensors
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)  # (N, M)
        d_log = grad_log.to(x.dtype) if ctx.want_log and grad_log is not None else None  # (K, M)
        d_prob = grad_prob.to(x.dtype) if ctx.want_prob and grad_prob is not None else None
        d_fg = grad_fg.to(x.dtype) if fg is not None and grad_fg is not None else None  # (M,)
        if grad_bg is None:
            grad_bg = x.new_zeros(())
        per_query = d_prob is not None or d_fg is not None  # does G2 vary over m besides bg?
        if ctx.mask_prob == "softmax":
            # a_i = dL/dB bg_i exp(-lse_i) - sum_m G1_im, (N,)
            coef = bg * grad_bg * torch.exp(-lse)
            if d_log is not None:
                coef = torch.addmv(coef, member.T, d_log.sum(dim=1), alpha=-1.0)
        else:
            bg_grad = bg * grad_bg  # (N,)
        for rows in _row_chunks(x):
            xc, out = x[rows], grad_x[rows]  # (n_c, M)
            if d_log is not None:
                torch.mm(member[:, rows].T, d_log, out=out)  # G1
            else:
                out.zero_()
            if per_query:  # G2 without its background part, (n_c, M)
                g2 = (torch.mm(member[:, rows].T, d_prob) if d_prob is not None
                      else xc.new_zeros(xc.shape))
                if d_fg is not None:
                    g2.addr_(fg[rows], d_fg)
            if ctx.mask_prob == "softmax":
                prob = torch.sub(xc, lse[rows, None]).exp_()  # (n_c, M)
                if per_query:
                    # G1 + p * (G2' - sum_m p G2' + a_i)
                    row = (coef[rows] - (prob * g2).sum(dim=1))[:, None]  # (n_c, 1)
                    out.addcmul_(prob, g2.add_(row))
                else:
                    out.addcmul_(coef[rows, None], prob)  # G1 + a_i p
            else:
                prob = torch.sigmoid(xc)  # (n_c, M)
                if per_query:
                    out.addcmul_(g2.add_(bg_grad[rows, None]), prob)  # G1 + s G2
                else:
                    out.addcmul_(bg_grad[rows, None], prob)  # G1 + dL/dB bg s
                out.addcmul_(out, prob, value=-1.0)  # ... times (1 - s)
        return grad_x, None, None, None, None, None, None

"""Knowledge-distillation losses over a sparse (top-k) teacher distribution.

The teacher cache stores, for every training position, the teacher's top-k token ids and their
RAW log-probabilities (``log_softmax`` of the untempered logits). Those sum to at most 1 in
probability space; the missing mass is the teacher's tail outside the top-k. Every loss here
compares the teacher and the student on that stored support, in one of two ways (``tail``):

``"renorm"``
    Both distributions are renormalised over the k stored tokens. Cheap and the common choice,
    but biased: every top-k probability of the teacher is inflated by 1 / (its top-k mass), and
    the student is told the tail has zero mass (its own tail is simply ignored).
``"rest"``
    One extra "rest" bucket holds everything outside the top-k: 1 - (top-k mass) for the
    teacher, the student's exact probability of all non-top-k tokens for the student. Exact at
    temperature 1; at other temperatures the teacher's bucket is an approximation (see
    :func:`teacher_target`).

``"rest"`` is the default: a student trained from scratch under ``"renorm"`` keeps its initial
mass on every token outside the teacher's top-k (nothing pushes it down), which the demo
measured as a held-out perplexity of 2.3 against 1.4 for plain cross-entropy.

One loss is the exception: :func:`sampled_reverse_kl`, the on-policy recipe, never looks at the
top-k. It needs only the teacher's exact log-probability of the token the student itself
sampled (the cache's ``next_logprob``), so it has neither a ``tail`` nor a temperature.

Conventions shared by every function:

* Inputs are already flattened to the N selected positions: ``student_logits`` [N, V],
  ``topk_ids`` int64 [N, k], ``topk_logprobs`` [N, k], ``labels`` int64 [N], optional
  ``weights`` [N].
* Teacher entries with log-probability ``-inf`` are padding: zero probability, and their ids
  are excluded from the student's support as well, so they neither count in the student's
  top-k mass nor remove a token from its rest mass.
* Every loss returns the weighted mean over positions, ``sum(w * l) / sum(w)`` (0, not NaN,
  when ``sum(w) == 0``).
* Soft losses are multiplied by ``temperature ** 2`` (Hinton et al. 2015): the gradient of a
  tempered KL w.r.t. the logits scales like 1 / T², so this keeps its magnitude comparable
  across temperatures and against the hard cross-entropy.
* Computation happens in float32 (float64 inputs stay float64; bf16/fp16 are cast up).
  ``0 * log 0`` is 0, and every ``-inf`` is kept out of the backward pass, so values and
  gradients stay finite with padded teacher entries and vanishing rest masses.

Everything is vectorised: no Python loop over positions, tokens or vocabulary entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from stages.train.logit_stats import LogitStats, logit_stats

__all__ = [
    "KINDS",
    "TAILS",
    "distill_loss",
    "forward_kl",
    "generalized_jsd",
    "hard_ce",
    "mix_with_ce",
    "reverse_kl",
    "sampled_reverse_kl",
    "student_sparse",
    "teacher_target",
]

TAILS = ("renorm", "rest")
KINDS = ("ce", "forward_kl", "reverse_kl", "jsd", "sampled_rkl")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# validation and small numerics helpers
# --------------------------------------------------------------------------------------------


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"unknown tail mode {tail!r}; expected one of {TAILS}")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def _check_unit(name: str, value: float) -> float:
    v = float(value)
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_positions(name: str, x: Tensor, n: int) -> None:
    if x.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) (one entry per position), got {tuple(x.shape)}"
        )


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (gradcheck, references)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_compute(x: Tensor) -> Tensor:
    return x.to(_compute_dtype(x))


def _masked_log_softmax(z: Tensor, valid: Tensor) -> Tensor:
    """log_softmax over the last dim restricted to ``valid`` entries (others get ``-inf``).

    A row with no valid entry comes out all ``-inf`` (an empty distribution). Invalid entries
    are masked both before ``logsumexp`` and on the output, so the NaN that ``logsumexp``'s
    backward produces on an all ``-inf`` row lands only on masked positions and is dropped.
    """
    lse = torch.logsumexp(z.masked_fill(~valid, _NEG_INF), dim=-1, keepdim=True)
    return (z - lse).masked_fill(~valid, _NEG_INF)


def _kl_rows(log_a: Tensor, log_b: Tensor) -> Tensor:
    """Row-wise KL(a || b) = sum_i a_i (log a_i - log b_i) from log-probabilities.

    Terms with a_i == 0 are 0 (0 log 0 = 0, also when b_i == 0). Where a_i > 0 but
    b_i == 0 the true divergence is +inf; we replace that log b_i by log(eps of the dtype)
    (about -15.9 in float32). In practice this only happens in reverse KL with tail="rest"
    when the teacher's top-k mass rounded to >= 1, so its rest mass reads exactly 0: a stored
    float32 mass is only resolved to ~eps, so that is the honest floor, and it still pushes
    the student's tail mass down without producing inf/NaN.
    """
    pos = ~torch.isneginf(log_a)  # NaN counts as present: corrupt inputs must stay loud
    floor = math.log(torch.finfo(log_b.dtype).eps)
    la = torch.where(pos, log_a, 0.0)
    lb = torch.where(torch.isneginf(log_b), floor, log_b)
    return torch.where(pos, la.exp() * (la - lb), 0.0).sum(dim=-1)


def _gjsd_rows(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Row-wise generalised JSD, TRL convention (p = teacher, q = student).

    beta == 0 -> KL(p || q); beta == 1 -> KL(q || p); otherwise, with
    m = beta * p + (1 - beta) * q: beta * KL(p || m) + (1 - beta) * KL(q || m).
    """
    if beta == 0.0:
        return _kl_rows(log_p, log_q)
    if beta == 1.0:
        return _kl_rows(log_q, log_p)
    both_zero = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    # (-inf, -inf) pairs are kept away from logsumexp, whose backward is NaN there, so this
    # helper is safe on its own whatever masking its callers did.
    lp = torch.where(both_zero, 0.0, log_p)
    lq = torch.where(both_zero, 0.0, log_q)
    log_m = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), dim=0)
    log_m = torch.where(both_zero, _NEG_INF, log_m)
    return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)


def _weighted_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """sum(w * l) / sum(w); 0 when sum(w) == 0. Zero-weight rows are dropped, not 0 * l."""
    if weights is None:
        return per_row.sum() / max(per_row.numel(), 1)
    w = weights.to(per_row.dtype)
    if w.shape != per_row.shape:
        raise ValueError(f"weights must have shape {tuple(per_row.shape)}, got {tuple(w.shape)}")
    total = w.sum()
    num = torch.where(w != 0, w * per_row, 0.0).sum()
    safe_total = torch.where(total != 0, total, torch.ones_like(total))
    return torch.where(total != 0, num / safe_total, torch.zeros_like(num))


# --------------------------------------------------------------------------------------------
# targets on the sparse support
# --------------------------------------------------------------------------------------------


def _teacher_log_target(
    topk_logprobs: Tensor,
    temperature: float,
    tail: str,
    *,
    dtype: torch.dtype,
    tail_exists: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-space version of :func:`teacher_target`.

    ``tail_exists`` [N] bool (rest mode): False where the student has no token outside the
    support (k == V). The teacher's rest mass is then only float rounding of 1 - sum(p) and is
    dropped, so it does not meet a student bucket that is exactly empty.
    """
    lp = topk_logprobs.to(dtype)
    valid = ~torch.isneginf(lp)
    n = lp.shape[0]
    if tail == "renorm":
        log_p = _masked_log_softmax(lp / temperature, valid)
        return log_p, lp.new_full((n,), _NEG_INF)
    # Teacher rest mass at T=1: r = 1 - sum(exp(lp)) = -expm1(logsumexp(lp)), clamped at 0
    # because the stored top-k can sum to slightly more than 1 after rounding.
    log_mass = torch.logsumexp(lp, dim=-1)  # -inf for a row with nothing stored: r = 1
    rest = (-torch.expm1(log_mass)).clamp_min(0.0)
    rest_valid = rest > 0
    if tail_exists is not None:
        rest_valid = rest_valid & tail_exists
    log_rest = torch.log(torch.where(rest_valid, rest, 1.0))
    # The (k+1)-vector [lp_1..lp_k, log r] / T, renormalised. At T=1 the vector already sums
    # to 1 in probability, so this returns lp and log r unchanged (up to rounding).
    z = torch.cat([lp, log_rest.unsqueeze(-1)], dim=-1) / temperature
    log_p = _masked_log_softmax(z, torch.cat([valid, rest_valid.unsqueeze(-1)], dim=-1))
    return log_p[:, :-1], log_p[:, -1]


def teacher_target(topk_logprobs: Tensor, temperature: float, tail: str) -> tuple[Tensor, Tensor]:
    """The teacher's target distribution at temperature T on the stored support.

    Returns ``(p_topk [N, k], p_rest [N])``. Temperature is applied to the stored RAW
    log-probabilities: ``log_softmax`` is shift invariant, so ``softmax(logprobs / T)`` over
    the k entries equals ``softmax(logits / T)`` of the full teacher restricted to the support
    and renormalised -- the raw logits are not needed.

    ``tail="renorm"``: ``p_topk = softmax(topk_logprobs / T)`` over the k entries,
    ``p_rest = 0``. Biased: inflates every top-k probability by 1 / (top-k mass) and claims
    the tail has zero mass.

    ``tail="rest"``: one extra bucket. With the T=1 rest mass ``r = max(1 - sum(exp(lp)), 0)``
    the (k+1)-vector ``[lp_1, ..., lp_k, log r] / T`` is softmax-normalised. At T=1 this is
    exact: ``p_topk = exp(lp)``, ``p_rest = r``. At T != 1 the true tempered tail
    ``sum_{j not in top-k} p_j^(1/T) / Z`` depends on how the tail mass is spread over tokens,
    which the cache does not store; this is the standard approximation that treats the whole
    tail as ONE token of probability r (it under-estimates the tempered tail for T > 1 and
    over-estimates it for T < 1).

    Padded entries (``-inf``) get probability 0.
    """
    t = _check_temperature(temperature)
    _check_tail(tail)
    log_p, log_rest = _teacher_log_target(
        topk_logprobs, t, tail, dtype=_compute_dtype(topk_logprobs)
    )
    return log_p.exp(), log_rest.exp()


def student_sparse(
    student_logits: Tensor,
    topk_ids: Tensor,
    temperature: float,
    tail: str,
    *,
    support_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The student's log-probabilities on the teacher's support at temperature T.

    Returns ``(log_q_topk [N, k], log_q_rest [N])``, from ``log_softmax(logits / T)`` over the
    FULL vocabulary, gathered at ``topk_ids``.

    ``tail="renorm"``: the gathered probabilities are renormalised over the support (a
    ``log_softmax`` of the gathered tempered logits); ``log_q_rest`` is ``-inf`` (unused).

    ``tail="rest"``: ``log_q_topk`` are the full-vocabulary log-probabilities and
    ``log_q_rest = log(1 - sum(q_topk))``, computed without cancellation as
    ``logsumexp(tempered logits outside the support) - logsumexp(all tempered logits)``; the
    support is marked with one vectorised scatter into an [N, V] mask. It is ``-inf`` where
    the support covers the whole vocabulary.

    ``support_mask`` (bool [N, k], default all True) marks real entries; False entries (the
    teacher's ``-inf`` padding) get ``-inf`` here, are not gathered for the renormalisation,
    and do not remove their id from the rest mass, whatever id the padding carries. Ids of
    real entries are assumed distinct within a row.
    """
    t = _check_temperature(temperature)
    _check_tail(tail)
    z = _as_compute(student_logits)
    if t != 1.0:
        z = z / t
    n, v = z.shape
    if support_mask is None:
        support_mask = torch.ones_like(topk_ids, dtype=torch.bool)
    ids = torch.where(support_mask, topk_ids, 0)
    gathered = z.gather(-1, ids)
    if tail == "renorm":
        return _masked_log_softmax(gathered, support_mask), z.new_full((n,), _NEG_INF)

    lse_all = torch.logsumexp(z, dim=-1)
    log_q_topk = torch.where(support_mask, gathered - lse_all.unsqueeze(-1), _NEG_INF)
    # Padding scatters into a spare column V, which is dropped, so it marks no real token.
    in_support = torch.zeros(n, v + 1, dtype=torch.bool, device=z.device)
    in_support.scatter_(1, torch.where(support_mask, topk_ids, v), True)
    # -inf logits (a masked vocabulary) carry no mass and are left out as well: a row whose
    # tail is empty then has every entry masked, so the NaN gradient logsumexp returns for an
    # all -inf row never reaches a logit. Its log_q_rest is exactly -inf.
    outside = ~in_support[:, :v]
    outside &= z > _NEG_INF
    lse_out = torch.logsumexp(z.masked_fill(~outside, _NEG_INF), dim=-1)
    log_q_rest = lse_out - lse_all
    return log_q_topk, log_q_rest


def _check_sparse(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> None:
    if student_logits.dim() != 2 or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            "expected student_logits [N, V] and topk_ids / topk_logprobs of the same [N, k] "
            f"shape, got {tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, "
            f"{tuple(topk_logprobs.shape)}"
        )


def _sparse_stats(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    tail: str,
    labels: Tensor | None = None,
) -> LogitStats:
    """What :func:`_pair_from_stats` (and, with ``labels``, the hard CE) read from the logits,
    in one pass over them: the logits at the teacher's real ids, ``logsumexp(z / T)`` and, for
    "rest", the same over the ids outside the support (see :mod:`stages.train.logit_stats`)."""
    valid = ~torch.isneginf(topk_logprobs)  # padding; NaN is not padding and propagates
    return logit_stats(
        student_logits,
        labels,
        ids=torch.where(valid, topk_ids, 0),
        ids_mask=valid,
        temperature=temperature,
        rest=tail == "rest",
    )


def _pair_from_stats(
    stats: LogitStats, topk_logprobs: Tensor, temperature: float, tail: str
) -> tuple[Tensor, Tensor]:
    """(log p, log q) on the common support, [N, k] for renorm, [N, k + 1] for rest.

    The student's side is :func:`student_sparse`'s, from the gathered logits: its
    ``log_softmax(z / T)[id]`` is ``z[id] / T - logsumexp(z / T)`` and its rest bucket
    ``logsumexp`` over the ids outside the support minus the same normaliser.
    """
    t = temperature
    valid = ~torch.isneginf(topk_logprobs)
    gathered = stats.picked / t if t != 1.0 else stats.picked
    if tail == "renorm":
        log_q = _masked_log_softmax(gathered, valid)
        log_p, _ = _teacher_log_target(topk_logprobs, t, tail, dtype=stats.lse.dtype)
        return log_p, log_q
    lse_all = stats.lse_t.unsqueeze(-1)
    log_q = torch.where(valid, gathered - lse_all, _NEG_INF)
    log_q_rest = stats.lse_rest - stats.lse_t
    log_p, log_p_rest = _teacher_log_target(
        topk_logprobs, t, tail, dtype=stats.lse.dtype, tail_exists=log_q_rest > _NEG_INF
    )
    return (
        torch.cat([log_p, log_p_rest.unsqueeze(-1)], dim=-1),
        torch.cat([log_q, log_q_rest.unsqueeze(-1)], dim=-1),
    )


def _sparse_pair(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    temperature: float,
    tail: str,
) -> tuple[Tensor, Tensor]:
    """(log p, log q) on the common support: [N, k] for renorm, [N, k + 1] for rest."""
    t = _check_temperature(temperature)
    _check_tail(tail)
    _check_sparse(student_logits, topk_ids, topk_logprobs)
    stats = _sparse_stats(student_logits, topk_ids, topk_logprobs, t, tail)
    return _pair_from_stats(stats, topk_logprobs, t, tail)


def _ce_rows(stats: LogitStats, labels: Tensor) -> Tensor:
    """Per-position cross-entropy ``logsumexp(z) - z[label]``; 0 where the label is -100."""
    return torch.where(labels != -100, stats.lse - stats.label_logit, 0.0)


def _check_labels(labels: Tensor, n: int, v: int) -> None:
    _check_positions("labels", labels, n)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 token ids, got {labels.dtype}")
    bad = ((labels < 0) & (labels != -100)) | (labels >= v)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {n} labels are outside [0, {v}) (and not -100, the ignored label)"
        )


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def _soft_rows(kind: str, log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """Per-position divergence of the top-k losses (before T² and the mean)."""
    if kind == "forward_kl":
        return _kl_rows(log_p, log_q)
    if kind == "reverse_kl":
        return _kl_rows(log_q, log_p)
    return _gjsd_rows(log_p, log_q, beta)


def hard_ce(student_logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of the student against the hard labels, at temperature 1.

    Weighted mean over positions. Positions are expected to be pre-selected by the caller; a
    label of -100 (torch's ignore_index) contributes 0 but still counts in the denominator.
    ``logsumexp(z) - z[label]``, computed by :func:`~stages.train.logit_stats.logit_stats`: no
    [N, V] log-softmax is built (``F.cross_entropy`` would keep one for its backward).
    """
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_labels(labels, *student_logits.shape)
    stats = logit_stats(student_logits, labels)
    return _weighted_mean(_ce_rows(stats, labels), weights)


def forward_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "rest",
    weights: Tensor | None = None,
) -> Tensor:
    """``T² * KL(p_T || q_T)`` on the teacher's support (plus the rest bucket for "rest").

    Mode-covering: the student is penalised for missing teacher mass. With "renorm" both
    distributions are renormalised over the top-k (see module docstring for the bias).
    """
    log_p, log_q = _sparse_pair(student_logits, topk_ids, topk_logprobs, temperature, tail)
    per_row = _soft_rows("forward_kl", log_p, log_q, 0.5) * (float(temperature) ** 2)
    return _weighted_mean(per_row, weights)


def reverse_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    tail: str = "rest",
    weights: Tensor | None = None,
) -> Tensor:
    """``T² * KL(q_T || p_T)`` on the same support as :func:`forward_kl`.

    Mode-seeking. With "renorm" q is the student renormalised over the top-k (its mass outside
    the support is invisible to this loss); with "rest" both have a rest bucket. A teacher rest
    mass that rounded to exactly 0 is read as eps of the dtype inside the log (see
    ``_kl_rows``) so the loss stays finite.
    """
    log_p, log_q = _sparse_pair(student_logits, topk_ids, topk_logprobs, temperature, tail)
    per_row = _soft_rows("reverse_kl", log_p, log_q, 0.5) * (float(temperature) ** 2)
    return _weighted_mean(per_row, weights)


def generalized_jsd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "rest",
    weights: Tensor | None = None,
) -> Tensor:
    """GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, Eq. 1), times T².

    Follows TRL's ``GKDTrainer.generalized_jsd_loss`` exactly, with p = teacher and
    q = student (both tempered, on the sparse support):

    * ``m = beta * p + (1 - beta) * q`` (the TEACHER gets ``beta``), mixed in log space with
      ``logsumexp(log p + log beta, log q + log(1 - beta))``;
    * loss = ``beta * KL(p || m) + (1 - beta) * KL(q || m)``;
    * ``beta == 0`` is special-cased to forward ``KL(p || q)`` (teacher || student) and
      ``beta == 1`` to reverse ``KL(q || p)`` (student || teacher). Note the general formula
      tends to 0 (not to these KLs) at both ends; TRL's special cases are not its limit.

    Unlike TRL we multiply by ``temperature ** 2`` like the other soft losses.
    """
    b = _check_unit("beta", beta)
    log_p, log_q = _sparse_pair(student_logits, topk_ids, topk_logprobs, temperature, tail)
    per_row = _soft_rows("jsd", log_p, log_q, b) * (float(temperature) ** 2)
    return _weighted_mean(per_row, weights)


def sampled_reverse_kl(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logprob: Tensor,
    *,
    behavior_logprob: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """On-policy per-token reverse KL on the tokens the student sampled.

    The Thinking Machines "On-Policy Distillation" recipe (2025): on-policy GKD's reverse KL
    (Agarwal et al. 2024) estimated from the one sampled token per position. At each position
    the student sampled ``y = labels`` from its own distribution q; with ``lp = log q(y)`` (the
    student's full-vocabulary ``log_softmax`` at temperature 1) and ``lp_t = log p(y)`` (the
    teacher's), ``d = lp - lp_t`` is a one-sample estimate of ``KL(q || p)`` at that position
    and ``-d`` is the per-token advantage: a token the teacher finds likelier than the student
    is reinforced.

    The per-position loss is ``r * stopgrad(d)`` with the importance ratio
    ``r = exp(lp - behavior_logprob)`` where ``behavior_logprob`` is finite, and
    ``r = exp(lp - stopgrad(lp))`` (value 1, gradient ``grad lp``) where it is NaN (unknown,
    i.e. the sample is taken to be on-policy). So:

    * the VALUE is the weighted mean of ``r * d``: with ``r = 1`` the mean sampled reverse KL,
      a noisy per-token estimate that can be negative, not a divergence;
    * the GRADIENT w.r.t. the logits is ``r * d * grad lp``, the score-function (REINFORCE)
      estimator of ``grad KL(q || p)``: as ``E_q[grad log q] = 0``,
      ``grad KL(q || p) = E_{y~q}[(log q(y) - log p(y)) grad log q(y)]``, and for tokens drawn
      by an older (behaviour) policy b the factor ``r = q / b`` corrects the expectation.
      ``d`` is detached like a reward: its own gradient ``r * grad lp`` has expectation 0 and
      would only add variance. ``r`` is not clipped; how stale rollouts may be is the caller's
      call.

    ``teacher_logprob`` is the cache's ``next_logprob``: the teacher scored the sampled
    sequence and stored the exact log-probability of the token that follows, so it is exact
    even when ``y`` is outside the stored top-k (no tail approximation, and the top-k is not
    used at all). No temperature is applied: for ``r`` to be the ratio of the policies and the
    estimator to be unbiased, rollouts must be sampled at temperature 1 with top_p = 1 (and no
    top-k truncation), so that the sampling distribution IS ``softmax(logits)``.

    A non-finite ``teacher_logprob`` is an error (whatever its weight): the cache stores NaN at
    each row's last position, which has no next token, so such a value means that position
    slipped into the selection.

    Shapes: ``student_logits`` [N, V], ``labels`` int64 [N] in ``[0, V)``,
    ``teacher_logprob`` / ``behavior_logprob`` / ``weights`` [N]. Weighted mean over positions.
    """
    lp_t = _check_sampled(student_logits, labels, teacher_logprob, behavior_logprob)
    stats = logit_stats(student_logits, labels)
    return _sampled_rkl(stats.label_logit - stats.lse, lp_t, behavior_logprob, weights)


def _check_sampled(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logprob: Tensor,
    behavior_logprob: Tensor | None,
) -> Tensor:
    """The teacher's logprobs in the compute dtype, after :func:`sampled_reverse_kl`'s checks."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    _check_positions("labels", labels, n)
    _check_positions("teacher_logprob", teacher_logprob, n)
    if behavior_logprob is not None:
        _check_positions("behavior_logprob", behavior_logprob, n)
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 token ids, got {labels.dtype}")
    out_of_range = (labels < 0) | (labels >= v)
    if out_of_range.any():
        raise ValueError(
            f"{int(out_of_range.sum())} of {n} labels are outside [0, {v}): sampled tokens "
            "must be real vocabulary ids (there is no ignore_index here; select positions instead)"
        )
    dtype = _compute_dtype(student_logits)
    lp_t = teacher_logprob.to(dtype)
    bad = ~torch.isfinite(lp_t)
    if bad.any():
        raise ValueError(
            f"teacher_logprob is not finite at {int(bad.sum())} of {n} positions: the cache "
            "stores NaN at each row's last position (it has no next token), so such a position "
            "slipped into the training selection"
        )
    return lp_t


def _sampled_rkl(
    lp: Tensor, lp_t: Tensor, behavior_logprob: Tensor | None, weights: Tensor | None
) -> Tensor:
    """:func:`sampled_reverse_kl` from the student's ``lp = log q(y)`` (checked inputs)."""
    dtype = lp.dtype
    d = (lp - lp_t).detach()
    lp_behavior = lp.detach()  # unknown behaviour policy: on-policy, r = 1
    if behavior_logprob is not None:
        b = behavior_logprob.to(dtype)
        lp_behavior = torch.where(torch.isfinite(b), b, lp_behavior)
    ratio = torch.exp(lp - lp_behavior)
    return _weighted_mean(ratio * d, weights)


def distill_loss(
    student_logits: Tensor,
    labels: Tensor,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    *,
    kind: str,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    tail: str = "rest",
    weights: Tensor | None = None,
    next_logprob: Tensor | None = None,
    policy_logprob: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The training loss: ``alpha * soft + (1 - alpha) * hard_ce``, and its components.

    ``kind`` selects the soft term: "forward_kl", "reverse_kl" or "jsd" (with ``beta``) on the
    top-k cache; "sampled_rkl" is :func:`sampled_reverse_kl` on rollout data, from
    ``next_logprob`` (the teacher's logprob of each label, required) and ``policy_logprob``
    (the sampling policy's, optional, NaN = unknown), and needs neither the top-k (which may
    then be None) nor ``tail``; "ce" trains on the hard labels only (no teacher term is
    computed and ``soft`` is reported as 0.0). The hard CE is always at temperature 1. A term
    whose mix weight is 0 stays out of the autograd graph; it is still evaluated under
    ``no_grad`` for logging.

    Returns ``(loss, {"soft": float, "ce": float})`` with detached floats.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {KINDS}")
    _check_tail(tail)
    t = _check_temperature(temperature)
    a = _check_unit("alpha", alpha)
    b = _check_unit("beta", beta)

    if kind == "ce":
        ce = hard_ce(student_logits, labels, weights)
        return ce, {"soft": 0.0, "ce": float(ce.detach())}
    if kind == "sampled_rkl":
        if t != 1.0:
            raise ValueError(
                f"kind 'sampled_rkl' needs temperature 1, got {temperature!r}: its importance "
                "ratio and score-function gradient are only right for the untempered policy "
                "the rollouts were sampled from"
            )
        if next_logprob is None:
            raise ValueError(
                "kind 'sampled_rkl' needs next_logprob (the teacher's logprob of each label)"
            )
    elif topk_ids is None or topk_logprobs is None:
        raise ValueError(f"kind {kind!r} needs topk_ids and topk_logprobs")

    # One pass over the [N, V] logits serves both terms (see stages.train.logit_stats).
    if kind == "sampled_rkl":
        lp_t = _check_sampled(student_logits, labels, next_logprob, policy_logprob)
        stats = logit_stats(student_logits, labels)

        def soft_fn() -> Tensor:
            return _sampled_rkl(stats.label_logit - stats.lse, lp_t, policy_logprob, weights)

    else:
        _check_sparse(student_logits, topk_ids, topk_logprobs)
        _check_labels(labels, *student_logits.shape)
        stats = _sparse_stats(student_logits, topk_ids, topk_logprobs, t, tail, labels)

        def soft_fn() -> Tensor:
            log_p, log_q = _pair_from_stats(stats, topk_logprobs, t, tail)
            return _weighted_mean(_soft_rows(kind, log_p, log_q, b) * t**2, weights)

    return mix_with_ce(soft_fn, lambda: _weighted_mean(_ce_rows(stats, labels), weights), a)


def mix_with_ce(
    soft_fn: Callable[[], Tensor], ce_fn: Callable[[], Tensor], alpha: float
) -> tuple[Tensor, dict[str, float]]:
    """``alpha * soft + (1 - alpha) * ce`` and both values; a term whose weight is 0 is
    computed under ``no_grad``, for logging only, so it stays out of the autograd graph."""
    if alpha == 1.0:
        soft = soft_fn()
        with torch.no_grad():
            ce = ce_fn()
        loss = soft
    elif alpha == 0.0:
        with torch.no_grad():
            soft = soft_fn()
        ce = ce_fn()
        loss = ce
    else:
        soft = soft_fn()
        ce = ce_fn()
        loss = alpha * soft + (1.0 - alpha) * ce
    return loss, {"soft": float(soft.detach()), "ce": float(ce.detach())}

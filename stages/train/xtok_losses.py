"""Cross-tokenizer distillation losses over aligned spans, from a sparse (top-k) teacher cache.

When teacher and student tokenize the same text differently there is no position-by-position
correspondence, so the per-token losses of :mod:`stages.train.losses` do not apply. The
alignment step (:mod:`stages.align`) groups tokens into *aligned spans*: maximal runs of
teacher tokens and of student tokens that cover exactly the same bytes. At the position that
predicts a span's first token both models condition on the same text prefix, so the two are
compared once per span, there.

Merged span distribution (GOLD, TRL's ``GOLDTrainer``)
    A span of several tokens is compared as ONE vector: the distribution at the span's first
    predicting position, multiplied by the probability of the span's actual continuation
    (chain rule). In log space: ``merged = first-position log-probs + chain``, where ``chain``
    is the summed log-probability of the span's remaining actual tokens -- ``teacher_chain``
    comes from the cache, the student's from its own logits at the span's other positions
    (:func:`span_distributions`). For the actual first token the merged entry is exactly the
    probability of the whole span. Every OTHER entry gets the same factor, which is GOLD's
    approximation: the correct factor would be P(continuation | that other first token), and
    the cache cannot give it (the teacher only ran on the actual text). Both sides use the same
    approximation, so a student equal to the teacher still has loss 0. A merged vector sums to
    at most 1; what it misses (other continuations, plus the tail outside the stored top-k) is
    treated as one "rest" bucket where a loss needs one.

Temperature
    T softens the first-position distributions only (the teacher's through
    ``_teacher_log_target`` on the stored RAW log-probs, the student's through
    ``log_softmax(logits / T)``). The chains stay at T = 1 on both sides: the cache stores the
    teacher's exact, untempered log-probability of the continuation, and tempering it would need
    the teacher's full distribution at every continuation position, which is not stored.

Losses
    :func:`uld_loss` -- ULD (Boizard et al. 2024): the L1 distance between the two
    probability vectors SORTED in decreasing order, its closed-form stand-in for a
    Wasserstein distance. It never compares token ids, so it needs no vocabulary map, but it
    also cannot tell which token carries which probability.
    :func:`hybrid_loss` -- GOLD's hybrid: generalized JSD on the teacher entries whose token
    exists in the student vocabulary (by id, through a vocabulary map), ULD on the rest.
    :func:`xtok_loss` mixes either with the hard cross-entropy, as ``losses.distill_loss`` does.

Conventions are those of :mod:`stages.train.losses`: teacher log-probabilities of ``-inf``
are padding (zero probability); losses are the weighted mean over spans (``weights`` [S]);
soft losses are multiplied by T²; computation happens in float32 (float64 kept); values and
gradients stay finite with padding, empty buckets and huge logits. Everything is vectorised:
no Python loop over spans, positions, tokens or vocabulary entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stages.train.logit_stats import logit_stats
from stages.train.losses import (
    _as_compute,
    _ce_rows,
    _check_positions,
    _check_temperature,
    _check_unit,
    _compute_dtype,
    _gjsd_rows,
    _teacher_log_target,
    _weighted_mean,
    hard_ce,
    mix_with_ce,
    student_sparse,
)

__all__ = ["XTOK_KINDS", "hybrid_loss", "span_distributions", "uld_loss", "xtok_loss"]

XTOK_KINDS = ("ce", "uld", "hybrid")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_teacher_targets(
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    s: int,
    teacher_topk_ids: Tensor | None = None,
) -> int:
    """k, or a ValueError naming the teacher tensor whose shape does not fit S spans."""
    if teacher_topk_logprobs.dim() != 2 or teacher_topk_logprobs.shape[0] != s:
        raise ValueError(
            f"teacher_topk_logprobs must be [S, k] with S = {s} spans, "
            f"got {tuple(teacher_topk_logprobs.shape)}"
        )
    if teacher_topk_ids is not None and teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            "teacher_topk_ids and teacher_topk_logprobs must have the same [S, k] shape, got "
            f"{tuple(teacher_topk_ids.shape)} and {tuple(teacher_topk_logprobs.shape)}"
        )
    if teacher_chain.shape != (s,):
        raise ValueError(
            f"teacher_chain must have shape ({s},) (one per span), got {tuple(teacher_chain.shape)}"
        )
    return teacher_topk_logprobs.shape[1]


def _check_span_targets(
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    log_q_first: Tensor,
    student_chain: Tensor,
    teacher_topk_ids: Tensor | None = None,
) -> tuple[int, int, int]:
    """(S, k, V), or a ValueError naming the tensor whose shape does not fit."""
    if log_q_first.dim() != 2:
        raise ValueError(f"log_q_first must be [S, V], got {tuple(log_q_first.shape)}")
    s, v = log_q_first.shape
    k = _check_teacher_targets(teacher_topk_logprobs, teacher_chain, s, teacher_topk_ids)
    if student_chain.shape != (s,):
        raise ValueError(
            f"student_chain must have shape ({s},) (one per span), got {tuple(student_chain.shape)}"
        )
    return s, k, v


def _topk_values(log_q: Tensor, k: int) -> Tensor:
    """The k largest entries of each row, descending; ``-inf`` columns if a row has fewer."""
    v = log_q.shape[-1]
    values = log_q.topk(min(k, v), dim=-1).values
    if v >= k:
        return values
    return torch.cat([values, values.new_full((log_q.shape[0], k - v), _NEG_INF)], dim=-1)


def _log_merged_rest(chain: Tensor, log_other: Tensor) -> Tensor:
    """log of a merged vector's rest mass ``1 - e^c (1 - o)``, with ``c = chain`` and
    ``o = exp(log_other)`` the first position's mass outside the kept entries.

    Written as ``-expm1(c) + e^c o`` -- the mass of the other continuations plus the kept
    outside mass, both non-negative -- and summed in log space, so nothing cancels when the
    kept entries hold almost all the mass (a plain ``log(1 - sum)`` would round to ``-inf`` or
    NaN there). It is exactly ``-inf`` only when ``c == 0`` and ``o == 0``; ``log 0`` and
    all ``-inf`` pairs are kept out of the backward pass. A chain that rounded slightly above
    0 is read as 0.
    """
    lost = chain < 0
    log_lost = torch.where(lost, torch.log(-torch.expm1(torch.where(lost, chain, -1.0))), _NEG_INF)
    log_kept = chain.clamp_max(0.0) + log_other
    empty = torch.isneginf(log_lost) & torch.isneginf(log_kept)
    out = torch.logaddexp(torch.where(empty, 0.0, log_lost), torch.where(empty, 0.0, log_kept))
    return torch.where(empty, _NEG_INF, out)


def _check_weight(name: str, value: float) -> float:
    w = float(value)
    if not (w >= 0 and math.isfinite(w)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return w


# --------------------------------------------------------------------------------------------
# the student's side of each span
# --------------------------------------------------------------------------------------------


def _check_spans(
    student_logits: Tensor, labels: Tensor, span_start: Tensor, span_index: Tensor, num_spans: int
) -> tuple[int, int, int]:
    """(N, V, S) after checking the span layout (see :func:`span_distributions`)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    n, v = student_logits.shape
    s = int(num_spans)
    if s < 0:
        raise ValueError(f"num_spans must be >= 0, got {num_spans!r}")
    _check_positions("labels", labels, n)
    _check_positions("span_start", span_start, n)
    _check_positions("span_index", span_index, n)
    if span_start.dtype != torch.bool:
        raise ValueError(f"span_start must be bool, got {span_start.dtype}")
    if span_index.dtype != torch.int64 or labels.dtype != torch.int64:
        raise ValueError(
            f"span_index and labels must be int64, got {span_index.dtype} and {labels.dtype}"
        )

    # One host sync for all three checks: bad input must fail here, not as a device-side
    # index assert (CUDA) or as a silently wrong span.
    in_range = (span_index >= 0) & (span_index < s)
    starts = torch.zeros(s + 1, dtype=torch.int64, device=span_index.device)
    starts.index_add_(0, torch.where(in_range & span_start, span_index, s), span_start.long())
    bad_label = ~span_start & ((labels < 0) | (labels >= v))
    out_of_range, not_one_start, bad_labels = torch.stack(
        [(~in_range).any(), (starts[:s] != 1).any(), bad_label.any()]
    ).tolist()
    if out_of_range:
        raise ValueError(f"span_index must lie in [0, num_spans={s})")
    if not_one_start:
        raise ValueError("every span must have exactly one start position (span_start)")
    if bad_labels:
        raise ValueError(
            f"labels at non-start positions must be token ids in [0, {v}): they are the "
            "span's continuation, whose log-probability forms the student's chain"
        )
    return n, v, s


def _start_positions(span_start: Tensor, span_index: Tensor, num_spans: int) -> Tensor:
    """int64 [S]: the position of each span's start, in span order."""
    positions = torch.arange(span_start.shape[0], device=span_start.device)
    start_pos = torch.zeros(num_spans, dtype=torch.int64, device=span_start.device)
    start_pos.index_copy_(0, span_index[span_start], positions[span_start])
    return start_pos


def span_distributions(
    student_logits: Tensor,
    labels: Tensor,
    span_start: Tensor,
    span_index: Tensor,
    num_spans: int,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """The student's merged span distribution, as first-position log-probs plus a chain.

    ``student_logits`` [N, V] are the logits at the N trained student positions; position i
    predicts ``labels[i]``. ``span_start`` bool [N] marks the position that predicts the first
    student token of its span, ``span_index`` int64 [N] in ``[0, num_spans)`` the span each
    position belongs to. Every span has exactly one start position and may have more positions
    (its other student tokens); positions need not be ordered.

    Returns ``(log_q_first [S, V], student_chain [S])``:

    * ``log_q_first[s]`` = ``log_softmax(logits / T)`` at span s's start position, the
      distribution compared with the teacher's (ordered by span index, not by position);
    * ``student_chain[s]`` = the sum over span s's NON-start positions of
      ``log_softmax(logits)[label]`` at T = 1 (0 for a one-token span): the log-probability
      of the span's actual continuation, the student's counterpart of ``teacher_chain``.

    Differentiable w.r.t. ``student_logits``: a start row only receives gradient through
    ``log_q_first``, every other row only through ``student_chain``. Rows are gathered and the
    chain is summed with one ``index_add``, never a loop over spans or positions. The labels at
    start positions are not read here (the hard CE reads them); the others must be real ids.
    """
    t = _check_temperature(temperature)
    n, _, s = _check_spans(student_logits, labels, span_start, span_index, num_spans)

    z = _as_compute(student_logits)
    first = z[_start_positions(span_start, span_index, s)]
    log_q_first = torch.log_softmax(first / t if t != 1.0 else first, dim=-1)

    if s == n:  # every position starts its span: no continuation anywhere
        return log_q_first, z.new_zeros(s)
    # log q(label) as gathered logit - logsumexp: no [N, V] log-softmax buffer for backward.
    # Start rows gather a dummy id and are zeroed, so they add neither value nor gradient.
    ids = torch.where(span_start, 0, labels).unsqueeze(-1)
    lp = z.gather(-1, ids).squeeze(-1) - torch.logsumexp(z, dim=-1)
    lp = torch.where(span_start, 0.0, lp)
    student_chain = z.new_zeros(s).index_add(0, span_index, lp)
    return log_q_first, student_chain


# --------------------------------------------------------------------------------------------
# losses per span
# --------------------------------------------------------------------------------------------


def uld_loss(
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    log_q_first: Tensor,
    student_chain: Tensor,
    *,
    temperature: float = 1.0,
    weights: Tensor | None = None,
) -> Tensor:
    """ULD (Boizard et al. 2024): sorted-probability L1 between the merged distributions, × T².

    ULD's closed-form stand-in for the Wasserstein-1 distance between two distributions over
    different vocabularies: the L1 distance between the two probability vectors sorted in
    decreasing order, rank against rank. It never compares token ids, which is why it works
    for any pair of tokenizers (and why it cannot tell which token carries which probability).

    * Teacher: ``P = exp(log_p + teacher_chain)`` with ``log_p`` the tempered target on the
      stored top-k (``_teacher_log_target`` in "rest" mode, so the top-k is not renormalised
      to absorb the tail), sorted descending; padding is 0.
    * Student: ``Q = exp(topk(log_q_first, k) + student_chain)``, descending (0 where the
      student vocabulary has fewer than k tokens).
    * Per span: ``sum_r |P_r - Q_r| + |sum(P) - sum(Q)|``. The last term compares the two rest
      buckets ``1 - sum`` (the teacher's unknown tail and other continuations against the
      student's mass outside its own top-k), one bucket each: the cache cannot split the
      teacher's tail by rank; by the triangle inequality this is a lower bound of the
      full-vocabulary sorted L1 (at T = 1, where the teacher's rest is exact), and equal to it
      when both tails are empty.

    ``teacher_topk_logprobs`` [S, k] RAW log-probs (-inf padding), ``teacher_chain`` [S],
    ``log_q_first`` [S, V] and ``student_chain`` [S] from :func:`span_distributions` (at the
    same T). Unlike the id-based losses, a teacher top-k that covers its whole vocabulary keeps
    its rounding-only rest (ULD does not know the teacher's vocabulary size), which at T != 1
    is softened into a small but visible bucket.

    Weighted mean over spans (``weights`` [S] optional).
    """
    t = _check_temperature(temperature)
    _, k, _ = _check_span_targets(teacher_topk_logprobs, teacher_chain, log_q_first, student_chain)
    log_q_top = _topk_values(log_q_first.to(_compute_dtype(log_q_first)), k)
    return _uld_from_top(teacher_topk_logprobs, teacher_chain, log_q_top, student_chain, t, weights)


def _uld_from_top(
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    log_q_top: Tensor,
    student_chain: Tensor,
    t: float,
    weights: Tensor | None,
) -> Tensor:
    """:func:`uld_loss` from the student's k largest first-position log-probs [S, k]
    (descending, ``-inf`` past the vocabulary), in their dtype."""
    dtype = log_q_top.dtype
    log_p, _ = _teacher_log_target(teacher_topk_logprobs, t, "rest", dtype=dtype)
    p = torch.exp(log_p + teacher_chain.to(dtype).unsqueeze(-1))
    p = p.sort(dim=-1, descending=True).values
    q = torch.exp(log_q_top + student_chain.to(dtype).unsqueeze(-1))
    per_row = (p - q).abs().sum(dim=-1) + (p.sum(dim=-1) - q.sum(dim=-1)).abs()
    return _weighted_mean(per_row * t**2, weights)


def hybrid_loss(
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    log_q_first: Tensor,
    student_chain: Tensor,
    vocab_map: Tensor,
    student_mapped: Tensor,
    *,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    temperature: float = 1.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GOLD's hybrid: generalized JSD where tokens correspond, ULD where they do not. × T².

    ULD alone throws away which token carries which probability. Most tokens of two real
    vocabularies write the same bytes, and for those the teacher's probability can be compared
    with the student's probability of the SAME token, as in same-tokenizer distillation.

    ``vocab_map`` int64 [V_t]: teacher id -> student id, -1 where no student token writes the
    same bytes; injective on mapped ids. ``student_mapped`` bool [V]: the student ids that are
    the image of some teacher id. M = stored teacher entries that are real (finite) and map.

    * Matched: ``P_m`` = merged teacher probabilities on M, ``Q_m`` =
      ``exp(log_q_first[vocab_map[id]] + student_chain)`` on M. :func:`losses._gjsd_rows`
      (TRL convention: beta = 0 is KL(P || Q), beta = 1 is KL(Q || P)) compares the
      (k+1)-vectors ``[P_m, 1 - sum P_m]`` and ``[Q_m, 1 - sum Q_m]``: one rest bucket each,
      as in losses' ``tail="rest"``, so that the student is also told how much mass belongs
      outside M. Both rests are computed in log space without cancellation (the student's
      from its exact mass outside the matched ids). When the stored entries cover the
      teacher's whole vocabulary (k real entries = V_t) the teacher's top-k rest is only
      rounding and is dropped, as ``losses`` does.
    * Unmatched: ``P_u`` = merged teacher probabilities of real unmapped entries, sorted
      descending; ``Q_u`` = the student's k largest merged probabilities among unmapped ids
      (0 past the last one); ``l1_u = sum_r |P_u_r - Q_u_r|``, ULD on what ids cannot match.
    * Weights: by default ``w_m`` = the teacher's mapped share ``sum P_m / (sum P_m + sum P_u)``
      per span (detached; taken before the chain factor, which cancels in the ratio but
      could underflow both sums; 0.5 where nothing real is stored), so each part counts in
      proportion to the teacher mass it covers. ``matched_weight`` fixes ``w_m`` instead.
      ``w_u`` is ``unmatched_weight`` when given, else ``1 - w_m``.

    Per span ``w_m * jsd + w_u * l1_u``, times T², weighted mean over spans (``weights`` [S]).
    Returns ``(loss, parts)``; ``parts`` holds detached scalars: "matched" and "unmatched"
    (the weighted means of jsd and l1_u, times T², before w_m / w_u) and "mapped_mass" (the
    weighted mean of the teacher's mapped share).
    """
    t, b, w_fixed_m, w_fixed_u = _hybrid_options(
        temperature, beta, matched_weight, unmatched_weight
    )
    _, k, v = _check_span_targets(
        teacher_topk_logprobs, teacher_chain, log_q_first, student_chain, teacher_topk_ids
    )
    sid, matched, unmatched = _map_teacher_ids(
        teacher_topk_ids, teacher_topk_logprobs, vocab_map, student_mapped, v
    )
    dtype = _compute_dtype(log_q_first)
    log_q_first = log_q_first.to(dtype)
    log_qm, log_q_out = student_sparse(
        log_q_first, torch.where(matched, sid, 0), 1.0, "rest", support_mask=matched
    )
    log_q_u = _topk_values(log_q_first.masked_fill(student_mapped, _NEG_INF), k)
    return _hybrid_from_student(
        teacher_topk_logprobs,
        teacher_chain,
        matched,
        unmatched,
        vocab_map.shape[0],
        log_qm,
        log_q_out,
        log_q_u,
        student_chain,
        b,
        t,
        w_fixed_m,
        w_fixed_u,
        weights,
    )


def _hybrid_options(
    temperature: float, beta: float, matched_weight: float | None, unmatched_weight: float | None
) -> tuple[float, float, float | None, float | None]:
    t = _check_temperature(temperature)
    b = _check_unit("beta", beta)
    w_fixed_m = None if matched_weight is None else _check_weight("matched_weight", matched_weight)
    w_fixed_u = (
        None if unmatched_weight is None else _check_weight("unmatched_weight", unmatched_weight)
    )
    if w_fixed_u is None and w_fixed_m is not None and w_fixed_m > 1.0:
        raise ValueError(
            f"matched_weight {matched_weight!r} > 1 needs an explicit unmatched_weight "
            "(the default 1 - matched_weight would be negative)"
        )
    return t, b, w_fixed_m, w_fixed_u


def _map_teacher_ids(
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    vocab_map: Tensor,
    student_mapped: Tensor,
    v: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(student id of each stored teacher entry [S, k], matched, unmatched) after checking the
    map; -1 where an entry has no student token, matched / unmatched only on real entries."""
    if vocab_map.dim() != 1 or vocab_map.dtype != torch.int64:
        raise ValueError(
            f"vocab_map must be int64 [V_teacher], got {vocab_map.dtype} {tuple(vocab_map.shape)}"
        )
    if student_mapped.shape != (v,) or student_mapped.dtype != torch.bool:
        raise ValueError(
            f"student_mapped must be bool [{v}] (one per student logit), got "
            f"{student_mapped.dtype} {tuple(student_mapped.shape)}"
        )
    v_t = vocab_map.shape[0]
    valid = ~torch.isneginf(teacher_topk_logprobs)  # padding; NaN is not padding
    bad_ids = (valid & ((teacher_topk_ids < 0) | (teacher_topk_ids >= v_t))).any()
    bad_map = (vocab_map >= v).any()
    bad_ids, bad_map = torch.stack([bad_ids, bad_map]).tolist()
    if bad_ids:
        raise ValueError(f"teacher_topk_ids of real entries must lie in [0, {v_t}) (vocab_map)")
    if bad_map:
        raise ValueError(f"vocab_map points past the student's {v} logits")
    sid = vocab_map[torch.where(valid, teacher_topk_ids, 0)]
    return sid, valid & (sid >= 0), valid & (sid < 0)


def _hybrid_from_student(
    teacher_topk_logprobs: Tensor,
    teacher_chain: Tensor,
    matched: Tensor,
    unmatched: Tensor,
    v_t: int,
    log_qm: Tensor,
    log_q_out: Tensor,
    log_q_u: Tensor,
    student_chain: Tensor,
    b: float,
    t: float,
    w_fixed_m: float | None,
    w_fixed_u: float | None,
    weights: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`hybrid_loss` from the student's first-position log-probs it reads (in their
    dtype): ``log_qm`` [S, k] at the matched entries' student ids (-inf elsewhere),
    ``log_q_out`` [S] of everything outside them, ``log_q_u`` [S, k] the k largest among
    unmapped ids (descending, -inf past the last one)."""
    dtype = log_qm.dtype
    c_t = teacher_chain.to(dtype)
    c_s = student_chain.to(dtype)
    valid = matched | unmatched

    tail_exists = valid.sum(dim=-1) < v_t
    log_p, log_rest = _teacher_log_target(
        teacher_topk_logprobs, t, "rest", dtype=dtype, tail_exists=tail_exists
    )
    log_p_merged = log_p + c_t.unsqueeze(-1)  # -inf stays -inf at padding

    # matched: (k+1)-vectors. The teacher's first-position mass outside M is its rest plus its
    # unmapped entries; the student's is its exact mass outside the matched ids.
    log_pm = torch.where(matched, log_p_merged, _NEG_INF)
    log_p_out = torch.logsumexp(
        torch.cat([torch.where(unmatched, log_p, _NEG_INF), log_rest.unsqueeze(-1)], dim=-1), -1
    )
    log_qm = log_qm + c_s.unsqueeze(-1)
    jsd = _gjsd_rows(
        torch.cat([log_pm, _log_merged_rest(c_t, log_p_out).unsqueeze(-1)], dim=-1),
        torch.cat([log_qm, _log_merged_rest(c_s, log_q_out).unsqueeze(-1)], dim=-1),
        b,
    )

    # unmatched: ULD between the sorted unmapped parts (no rest term: the matched JSD's rest
    # bucket already accounts for the mass outside M).
    p_u = torch.where(unmatched, log_p_merged.exp(), 0.0).sort(dim=-1, descending=True).values
    q_u = torch.exp(log_q_u + c_s.unsqueeze(-1))
    l1_u = (p_u - q_u).abs().sum(dim=-1)

    with torch.no_grad():
        p_first = log_p.exp()
        mass_m = torch.where(matched, p_first, 0.0).sum(dim=-1)
        mass = mass_m + torch.where(unmatched, p_first, 0.0).sum(dim=-1)
        share = torch.where(mass > 0, mass_m / torch.where(mass > 0, mass, 1.0), 0.5)
    w_m = share if w_fixed_m is None else torch.full_like(share, w_fixed_m)
    w_u = 1.0 - w_m if w_fixed_u is None else torch.full_like(share, w_fixed_u)

    t2 = t**2
    loss = _weighted_mean((w_m * jsd + w_u * l1_u) * t2, weights)
    with torch.no_grad():
        parts = {
            "matched": _weighted_mean(jsd * t2, weights),
            "unmatched": _weighted_mean(l1_u * t2, weights),
            "mapped_mass": _weighted_mean(share, weights),
        }
    return loss, {name: value.detach() for name, value in parts.items()}


# --------------------------------------------------------------------------------------------
# the training loss
# --------------------------------------------------------------------------------------------


def xtok_loss(
    student_logits: Tensor,
    labels: Tensor,
    span_start: Tensor,
    span_index: Tensor,
    num_spans: int,
    teacher_topk_ids: Tensor | None,
    teacher_topk_logprobs: Tensor | None,
    teacher_chain: Tensor | None,
    *,
    kind: str,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    vocab_map: Tensor | None = None,
    student_mapped: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The cross-tokenizer training loss: ``alpha * soft + (1 - alpha) * hard_ce``.

    Mirrors ``losses.distill_loss``. ``kind`` selects the soft term, computed per aligned span:
    "uld" (:func:`uld_loss`; ``teacher_topk_ids`` is not read and may be None) or "hybrid"
    (:func:`hybrid_loss`, with ``beta``, the weights and the required ``vocab_map`` /
    ``student_mapped``); "ce" trains on the hard labels only (no teacher tensor is read, all
    may be None, and ``soft`` is reported as 0.0). The hard CE is over the N student positions
    on ``labels`` at temperature 1: every student token keeps its own target, whatever span it
    lies in. A term whose mix weight is 0 stays out of the autograd graph; it is still
    evaluated under ``no_grad`` for logging.

    Inputs: ``student_logits`` [N, V], ``labels`` int64 [N], ``span_start`` / ``span_index``
    [N] and ``num_spans`` as in :func:`span_distributions`; ``teacher_topk_ids`` /
    ``teacher_topk_logprobs`` [S, k] and ``teacher_chain`` [S] per span, ordered by span index.

    Returns ``(loss, {"soft": float, "ce": float})`` with detached floats, plus "matched",
    "unmatched" and "mapped_mass" for "hybrid" (see :func:`hybrid_loss`).
    """
    if kind not in XTOK_KINDS:
        raise ValueError(
            f"unknown cross-tokenizer loss kind {kind!r}; expected one of {XTOK_KINDS}"
        )
    t = _check_temperature(temperature)
    a = _check_unit("alpha", alpha)
    b = _check_unit("beta", beta)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    _check_positions("labels", labels, student_logits.shape[0])

    if kind == "ce":
        ce = hard_ce(student_logits, labels)
        return ce, {"soft": 0.0, "ce": float(ce.detach())}
    if teacher_topk_logprobs is None or teacher_chain is None:
        raise ValueError(f"kind {kind!r} needs teacher_topk_logprobs and teacher_chain")
    if kind == "hybrid" and (
        teacher_topk_ids is None or vocab_map is None or student_mapped is None
    ):
        raise ValueError(
            "kind 'hybrid' needs teacher_topk_ids, vocab_map and student_mapped (the teacher -> "
            "student vocabulary map); kind 'uld' works without one"
        )

    # One pass over the [N, V] logits gathers everything both terms read (see logit_stats);
    # the checks are span_distributions' and hybrid_loss's, the values theirs composed.
    n, v, s = _check_spans(student_logits, labels, span_start, span_index, num_spans)
    k = _check_teacher_targets(
        teacher_topk_logprobs,
        teacher_chain,
        s,
        teacher_topk_ids if kind == "hybrid" else None,
    )
    if kind == "hybrid":
        t, b, w_fixed_m, w_fixed_u = _hybrid_options(t, b, matched_weight, unmatched_weight)
        sid, matched, unmatched = _map_teacher_ids(
            teacher_topk_ids, teacher_topk_logprobs, vocab_map, student_mapped, v
        )
    start_pos = _start_positions(span_start, span_index, s)
    stats = logit_stats(
        student_logits,
        labels,
        rows=start_pos,
        ids=torch.where(matched, sid, 0) if kind == "hybrid" else None,
        ids_mask=matched if kind == "hybrid" else None,
        temperature=t,
        rest=kind == "hybrid",
        top_k=k,
        top_allowed=~student_mapped if kind == "hybrid" else None,
    )
    parts: dict[str, float] = {}

    def first(x: Tensor) -> Tensor:
        """log_softmax(z / T) at the span starts, from raw logits gathered there."""
        return (x / t if t != 1.0 else x) - stats.lse_t.unsqueeze(-1)

    def soft_fn() -> Tensor:
        # the chain: log q(label) at the non-start positions, summed per span
        if s == n:
            student_chain = stats.lse.new_zeros(s)
        else:
            lp = torch.where(span_start, 0.0, stats.label_logit - stats.lse)
            student_chain = stats.lse.new_zeros(s).index_add(0, span_index, lp)
        if kind == "uld":
            return _uld_from_top(
                teacher_topk_logprobs, teacher_chain, first(stats.top), student_chain, t, None
            )
        loss, extra = _hybrid_from_student(
            teacher_topk_logprobs,
            teacher_chain,
            matched,
            unmatched,
            vocab_map.shape[0],
            torch.where(matched, first(stats.picked), _NEG_INF),
            stats.lse_rest - stats.lse_t,
            first(stats.top),
            student_chain,
            b,
            t,
            w_fixed_m,
            w_fixed_u,
            None,
        )
        parts.update({name: float(value) for name, value in extra.items()})
        return loss

    loss, mixed = mix_with_ce(soft_fn, lambda: _weighted_mean(_ce_rows(stats, labels), None), a)
    return loss, mixed | parts

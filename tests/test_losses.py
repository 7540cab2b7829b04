"""Sparse-teacher distillation losses against dense, written-out references.

The references below loop over a handful of positions and sum explicitly in float64; the module
under test is vectorised. They share no code beyond torch's softmax.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from stages.train.losses import (
    KINDS,
    distill_loss,
    forward_kl,
    generalized_jsd,
    hard_ce,
    reverse_kl,
    sampled_reverse_kl,
    student_sparse,
    teacher_target,
)
from stages.train.options import LossKind
from stages.train.xtok_losses import XTOK_KINDS

INF = float("inf")
TAILS = ("renorm", "rest")

# --------------------------------------------------------------------------------------------
# fixtures: a small dense case (N=3, V=7) whose teacher top-3 is the cache
# --------------------------------------------------------------------------------------------

TEACHER_LOGITS = torch.tensor(
    [
        [2.0, 0.5, -1.0, 1.2, 0.0, -0.3, 0.8],
        [-0.5, 1.5, 1.4, -2.0, 0.3, 2.2, 0.1],
        [0.0, 0.0, 3.0, 0.5, -1.5, 0.2, 1.0],
    ],
    dtype=torch.float64,
)
STUDENT_LOGITS = torch.tensor(
    [
        [1.0, 1.0, -0.5, 0.2, 0.4, 0.0, 1.5],
        [0.3, 0.7, 2.0, -1.0, 0.0, 1.0, -0.4],
        [-1.0, 0.5, 1.0, 1.2, 0.0, -0.6, 0.3],
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 5, 3])
K = 3


def cache(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the teacher stage stores: top-k ids and RAW (untempered) logprobs."""
    lp, ids = torch.log_softmax(teacher_logits, dim=-1).topk(k, dim=-1)
    return ids, lp


def kl(a: list[float], b: list[float]) -> float:
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)


def gjsd(p: list[float], q: list[float], beta: float) -> float:
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q, strict=True)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def reference_buckets(t_row, s_row, support, temperature, tail):
    """Teacher and student bucket probabilities on the support, textbook formulas."""
    t_row, s_row = t_row.tolist(), s_row.tolist()
    v = len(t_row)
    outside = [j for j in range(v) if j not in support]

    def softmax(xs):
        mx = max(xs)
        e = [math.exp(x - mx) for x in xs]
        return [x / sum(e) for x in e]

    q_full = softmax([x / temperature for x in s_row])
    if tail == "renorm":
        p_full = softmax([x / temperature for x in t_row])
        zp = sum(p_full[i] for i in support)
        zq = sum(q_full[i] for i in support)
        return [p_full[i] / zp for i in support], [q_full[i] / zq for i in support]
    # rest: the teacher's T=1 tail mass r is treated as one token, p_i^(1/T) normalised
    p1 = softmax(t_row)
    r = sum(p1[j] for j in outside)
    w = [p1[i] ** (1 / temperature) for i in support] + [r ** (1 / temperature)]
    p = [x / sum(w) for x in w]
    q = [q_full[i] for i in support] + [sum(q_full[j] for j in outside)]
    return p, q


def reference_loss(kind, teacher_logits, student_logits, k, temperature, tail, beta=0.5):
    total = 0.0
    ids, _ = cache(teacher_logits, k)
    for n in range(teacher_logits.shape[0]):
        p, q = reference_buckets(
            teacher_logits[n], student_logits[n], ids[n].tolist(), temperature, tail
        )
        if kind == "forward_kl":
            total += kl(p, q)
        elif kind == "reverse_kl":
            total += kl(q, p)
        else:
            total += gjsd(p, q, beta)
    return temperature**2 * total / teacher_logits.shape[0]


def call(kind, s, ids, lp, **kw):
    beta = kw.pop("beta", 0.5)
    if kind == "forward_kl":
        return forward_kl(s, ids, lp, **kw)
    if kind == "reverse_kl":
        return reverse_kl(s, ids, lp, **kw)
    return generalized_jsd(s, ids, lp, beta=beta, **kw)


SOFT_CASES = [
    ("forward_kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.5),
    ("jsd", 0.3),
    ("jsd", 0.0),
    ("jsd", 1.0),
]


# --------------------------------------------------------------------------------------------
# dense reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "beta"), SOFT_CASES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_dense_reference(kind, beta, tail, temperature, dtype):
    ids, lp = cache(TEACHER_LOGITS, K)
    got = call(
        kind,
        STUDENT_LOGITS.to(dtype),
        ids,
        lp.to(dtype),
        beta=beta,
        temperature=temperature,
        tail=tail,
    )
    want = reference_loss(kind, TEACHER_LOGITS, STUDENT_LOGITS, K, temperature, tail, beta)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_teacher_target_and_student_sparse_match_reference(tail, temperature):
    ids, lp = cache(TEACHER_LOGITS, K)
    p_topk, p_rest = teacher_target(lp, temperature, tail)
    log_q, log_q_rest = student_sparse(STUDENT_LOGITS, ids, temperature, tail)
    for n in range(3):
        p, q = reference_buckets(
            TEACHER_LOGITS[n], STUDENT_LOGITS[n], ids[n].tolist(), temperature, tail
        )
        want_p_rest = p[K] if tail == "rest" else 0.0
        torch.testing.assert_close(p_topk[n], torch.tensor(p[:K], dtype=torch.float64))
        torch.testing.assert_close(p_rest[n], torch.tensor(want_p_rest, dtype=torch.float64))
        torch.testing.assert_close(log_q[n].exp(), torch.tensor(q[:K], dtype=torch.float64))
        if tail == "rest":
            torch.testing.assert_close(log_q_rest[n].exp(), torch.tensor(q[K], dtype=torch.float64))
        else:
            assert log_q_rest[n] == -INF


def test_rest_at_t1_is_the_raw_cache():
    """At T=1 the rest target is exactly exp(lp) and 1 - sum(exp(lp)), no renormalisation."""
    _, lp = cache(TEACHER_LOGITS, K)
    p_topk, p_rest = teacher_target(lp, 1.0, "rest")
    torch.testing.assert_close(p_topk, lp.exp(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(p_rest, 1 - lp.exp().sum(-1), rtol=1e-14, atol=1e-14)


# --------------------------------------------------------------------------------------------
# literal numbers, by hand: one position, V=3, k=2
# --------------------------------------------------------------------------------------------
# teacher probs p = [1/2, 1/4, 1/4], cache = ids [0, 1], lp = [ln 1/2, ln 1/4]
# student probs q = [1/4, 1/4, 1/2] (logits = ln q), label 0
#
# renorm, T=1: p' = [2/3, 1/3], q' = [1/2, 1/2]
#   forward = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.0566330123...
#   reverse = 1/2 ln(3/4) + 1/2 ln(3/2) = 1/2 ln(9/8) = 0.0588915178...
# rest, T=1: buckets p = [1/2, 1/4, 1/4], q = [1/4, 1/4, 1/2] (rest = token 2 for both)
#   forward = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2 = 0.1732867951...
#   reverse = 1/4 ln(1/2) + 0 + 1/2 ln 2 = 1/4 ln 2
# rest, T=2: buckets ~ sqrt: p = [√½, ½, ½]/(1+√½) = [a, b, b], q = [b, b, a]
#   (the student's rest is exact; the teacher's one-token tail IS exact here: it is one token)
#   forward = 4 * [a ln(a/b) + b ln(b/a)] = 4 (a - b) ln √2 = 2 ln 2 (√½ - ½)/(1 + √½)
#           = 0.1681857081...
# hard CE = -ln q_0 = ln 4 = 1.3862943611...
HAND_S = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64))
HAND_IDS = torch.tensor([[0, 1]])
HAND_LP = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))


def test_hand_computed_literals():
    def close(x, want):
        torch.testing.assert_close(x, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)

    s, ids, lp = HAND_S, HAND_IDS, HAND_LP
    close(forward_kl(s, ids, lp, tail="renorm"), 0.0566330123)
    close(reverse_kl(s, ids, lp, tail="renorm"), 0.0588915178)
    close(forward_kl(s, ids, lp, tail="rest"), 0.1732867951)
    close(reverse_kl(s, ids, lp, tail="rest"), 0.1732867951)
    close(forward_kl(s, ids, lp, tail="rest", temperature=2.0), 0.1681857081)
    close(hard_ce(s, torch.tensor([0])), 1.3862943611)
    # the closed forms behind the literals
    close(forward_kl(s, ids, lp, tail="renorm"), 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3))
    r2 = math.sqrt(0.5)
    close(
        forward_kl(s, ids, lp, tail="rest", temperature=2.0),
        2 * math.log(2) * (r2 - 0.5) / (1 + r2),
    )

    p_topk, p_rest = teacher_target(lp, 1.0, "renorm")
    torch.testing.assert_close(p_topk, torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64))
    assert p_rest.tolist() == [0.0]
    p_topk, p_rest = teacher_target(lp, 1.0, "rest")
    torch.testing.assert_close(p_topk, torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(p_rest, torch.tensor([0.25], dtype=torch.float64))
    log_q, log_q_rest = student_sparse(s, ids, 1.0, "rest")
    torch.testing.assert_close(log_q.exp(), torch.tensor([[0.25, 0.25]], dtype=torch.float64))
    torch.testing.assert_close(log_q_rest.exp(), torch.tensor([0.5], dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# full support (k == V)
# --------------------------------------------------------------------------------------------


def dense_kl(t_logits, s_logits, temperature):
    """KL(softmax(t/T) || softmax(s/T)) * T², mean over rows (torch's kl_div is KL(target||·))."""
    log_p = torch.log_softmax(t_logits / temperature, -1)
    log_q = torch.log_softmax(s_logits / temperature, -1)
    per_row = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return temperature**2 * per_row.mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_support_rest_equals_dense_kl(temperature):
    t, s = TEACHER_LOGITS.float(), STUDENT_LOGITS.float()
    ids, lp = cache(t, 7)
    _, p_rest = teacher_target(lp, temperature, "rest")
    assert p_rest.abs().max() < 1e-6  # only float rounding of 1 - sum(p)
    _, log_q_rest = student_sparse(s, ids, temperature, "rest")
    assert (log_q_rest == -INF).all()  # nothing outside the support
    for tail in TAILS:
        s1 = s.clone().requires_grad_(True)
        s2 = s.clone().requires_grad_(True)
        fwd = forward_kl(s1, ids, lp, temperature=temperature, tail=tail)
        rev = reverse_kl(s1, ids, lp, temperature=temperature, tail=tail)
        torch.testing.assert_close(fwd, dense_kl(t, s2, temperature), rtol=0, atol=1e-5)
        torch.testing.assert_close(rev, dense_kl(s2, t, temperature), rtol=0, atol=1e-5)
        (fwd + rev).backward()  # the empty rest bucket must not leak NaN into the gradient
        (dense_kl(t, s2, temperature) + dense_kl(s2, t, temperature)).backward()
        torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=1e-5)


def test_temperature_squared_scaling():
    """forward_kl at T=2 is 4 x the KL of the T=2-tempered distributions."""
    t, s = TEACHER_LOGITS, STUDENT_LOGITS
    ids, lp = cache(t, 7)
    log_p = torch.log_softmax(t / 2, -1)
    log_q = torch.log_softmax(s / 2, -1)
    tempered = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(forward_kl(s, ids, lp, temperature=2.0), 4 * tempered)
    torch.testing.assert_close(forward_kl(s, ids, lp, temperature=2.0, tail="rest"), 4 * tempered)


@pytest.mark.parametrize(("kind", "beta"), SOFT_CASES)
@pytest.mark.parametrize("tail", TAILS)
def test_divergences_nonnegative_and_zero_at_match(kind, beta, tail):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(16, 11, generator=g) * 3
    s = torch.randn(16, 11, generator=g) * 3
    for k in (1, 4, 11):
        ids, lp = cache(t, k)
        for temperature in (0.5, 1.0, 3.0):
            val = call(kind, s, ids, lp, beta=beta, temperature=temperature, tail=tail)
            assert val >= -1e-6  # float32 rounding only (k=1 is exactly 0)
    ids, lp = cache(t, 11)
    same = call(kind, t.clone(), ids, lp, beta=beta, tail=tail)
    assert abs(same.item()) < 1e-6


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4)])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradcheck(kind, beta, tail, temperature):
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    s = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids, lp = cache(t, 3)
    lp = lp.clone()
    lp[1, 2] = -INF  # a padded entry
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)

    def fn(x):
        return call(
            kind, x, ids, lp, beta=beta, temperature=temperature, tail=tail, weights=weights
        )

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7)


def test_forward_kl_gradient_by_hand():
    """Renorm, T=1, k=V: d/ds mean_n KL(p_n || softmax(s_n)) = (softmax(s) - p) / N."""
    s = STUDENT_LOGITS.clone().requires_grad_(True)
    ids, lp = cache(TEACHER_LOGITS, 7)
    forward_kl(s, ids, lp, tail="renorm").backward()
    want = (torch.softmax(STUDENT_LOGITS, -1) - torch.softmax(TEACHER_LOGITS, -1)) / 3
    torch.testing.assert_close(s.grad, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# padding, vanishing rest mass, weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "beta"), SOFT_CASES)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("pad_id", ["tail_token", "duplicate"])
def test_padding_equals_removing_entries(kind, beta, tail, temperature, pad_id):
    t, s0 = TEACHER_LOGITS.float(), STUDENT_LOGITS.float()
    ids, lp = cache(t, K)
    # "tail_token": the padding carries an id OUTSIDE the support (it must not shrink the
    # student's rest mass); "duplicate": it repeats a real id of the row.
    extra = cache(t, K + 1)[0][:, K:] if pad_id == "tail_token" else ids[:, :1]
    ids_pad = torch.cat([ids, extra], dim=1)
    lp_pad = torch.cat([lp, torch.full((3, 1), -INF)], dim=1)
    kw = {"beta": beta, "temperature": temperature, "tail": tail}

    s1 = s0.clone().requires_grad_(True)
    s2 = s0.clone().requires_grad_(True)
    padded = call(kind, s1, ids_pad, lp_pad, **kw)
    plain = call(kind, s2, ids, lp, **kw)
    padded.backward()
    plain.backward()
    assert torch.isfinite(padded) and torch.isfinite(s1.grad).all()
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("kind", "beta"), SOFT_CASES)
@pytest.mark.parametrize("tail", TAILS)
def test_degenerate_rows_stay_finite(kind, beta, tail):
    """An all-padding row, and a teacher whose stored top-k mass rounds to 1 (rest mass 0)."""
    s = torch.randn(3, 50, generator=torch.Generator().manual_seed(3))
    t = torch.zeros(3, 50)
    t[:, 7] = 40.0  # p(token 7) = 1 - 49 e^-40 -> exactly 1.0 in float32
    ids, lp = cache(t, 2)
    lp[2] = -INF  # row 2: nothing stored
    # row 1: a student whose logits are -inf (masked vocabulary) everywhere off the support
    s[1] = torch.full((50,), -INF).scatter(0, ids[1], s[1].gather(0, ids[1]))
    s.requires_grad_(True)
    _, p_rest = teacher_target(lp, 1.0, "rest")
    assert p_rest[0] == 0.0  # the vanishing-rest case is really exercised
    for temperature in (1.0, 2.0):
        s.grad = None
        val = call(kind, s, ids, lp, beta=beta, temperature=temperature, tail=tail)
        val.backward()
        assert torch.isfinite(val)
        assert torch.isfinite(s.grad).all()


def test_weighted_mean_matches_manual():
    ids, lp = cache(TEACHER_LOGITS, K)
    w = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    args = (STUDENT_LOGITS, ids, lp)
    for tail in TAILS:
        per_pos = [
            forward_kl(STUDENT_LOGITS[n : n + 1], ids[n : n + 1], lp[n : n + 1], tail=tail)
            for n in range(3)
        ]
        want = (0.5 * per_pos[0] + 2.0 * per_pos[1]) / 2.5
        torch.testing.assert_close(forward_kl(STUDENT_LOGITS, ids, lp, tail=tail, weights=w), want)
    # a zero-weight row is dropped, not multiplied by 0: garbage there (NaN) cannot leak
    garbage = STUDENT_LOGITS.clone()
    garbage[2] = float("nan")
    torch.testing.assert_close(
        forward_kl(garbage, ids, lp, weights=w), forward_kl(*args, weights=w)
    )
    ce = [hard_ce(STUDENT_LOGITS[n : n + 1], LABELS[n : n + 1]) for n in range(3)]
    torch.testing.assert_close(
        hard_ce(STUDENT_LOGITS, LABELS, w), (0.5 * ce[0] + 2.0 * ce[1]) / 2.5
    )


@pytest.mark.parametrize("kind", ["ce", "forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", TAILS)
def test_all_zero_weights_give_zero(kind, tail):
    s = STUDENT_LOGITS.clone().requires_grad_(True)
    ids, lp = cache(TEACHER_LOGITS, K)
    loss, parts = distill_loss(
        s, LABELS, ids, lp, kind=kind, alpha=0.5, tail=tail, weights=torch.zeros(3)
    )
    loss.backward()
    assert loss.item() == 0.0
    assert parts["ce"] == 0.0 and parts["soft"] == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = forward_kl(s[:0], ids[:0], lp[:0], tail=tail)  # no positions at all
    assert empty.item() == 0.0


# --------------------------------------------------------------------------------------------
# distill_loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
def test_distill_loss_mixing(tail):
    ids, lp = cache(TEACHER_LOGITS, K)
    s = STUDENT_LOGITS
    soft = forward_kl(s, ids, lp, temperature=2.0, tail=tail)
    ce = hard_ce(s, LABELS)
    loss, parts = distill_loss(
        s, LABELS, ids, lp, kind="forward_kl", temperature=2.0, alpha=0.3, tail=tail
    )
    torch.testing.assert_close(loss, 0.3 * soft + 0.7 * ce)
    assert parts == pytest.approx({"soft": soft.item(), "ce": ce.item()})

    jsd = generalized_jsd(s, ids, lp, beta=0.2, tail=tail)
    loss, _ = distill_loss(s, LABELS, ids, lp, kind="jsd", beta=0.2, alpha=0.3, tail=tail)
    torch.testing.assert_close(loss, 0.3 * jsd + 0.7 * ce)

    rev = reverse_kl(s, ids, lp, tail=tail)
    loss, parts = distill_loss(s, LABELS, ids, lp, kind="reverse_kl", tail=tail)  # alpha=1
    torch.testing.assert_close(loss, rev)
    assert parts["ce"] == pytest.approx(ce.item())  # reported though not trained on

    loss, parts = distill_loss(s, LABELS, ids, lp, kind="ce", alpha=0.3, tail=tail)
    torch.testing.assert_close(loss, ce)
    assert parts == {"soft": 0.0, "ce": pytest.approx(ce.item())}


def test_distill_loss_zero_weight_term_is_not_in_the_graph():
    ids, lp = cache(TEACHER_LOGITS, K)
    s1 = STUDENT_LOGITS.clone().requires_grad_(True)
    distill_loss(s1, LABELS, ids, lp, kind="forward_kl", alpha=1.0)[0].backward()
    s2 = STUDENT_LOGITS.clone().requires_grad_(True)
    forward_kl(s2, ids, lp).backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    s3 = STUDENT_LOGITS.clone().requires_grad_(True)
    distill_loss(s3, LABELS, ids, lp, kind="forward_kl", alpha=0.0)[0].backward()
    s4 = STUDENT_LOGITS.clone().requires_grad_(True)
    hard_ce(s4, LABELS).backward()
    torch.testing.assert_close(s3.grad, s4.grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "kl"}, "kind"),
        ({"kind": "forward_kl", "tail": "drop"}, "tail"),
        ({"kind": "forward_kl", "temperature": 0.0}, "temperature"),
        ({"kind": "forward_kl", "temperature": -1.0}, "temperature"),
        ({"kind": "forward_kl", "alpha": 1.5}, "alpha"),
        ({"kind": "forward_kl", "alpha": -0.1}, "alpha"),
        ({"kind": "jsd", "beta": 2.0}, "beta"),
        ({"kind": "jsd", "beta": float("nan")}, "beta"),
    ],
)
def test_distill_loss_rejects_bad_arguments(kwargs, match):
    ids, lp = cache(TEACHER_LOGITS, K)
    with pytest.raises(ValueError, match=match):
        distill_loss(STUDENT_LOGITS, LABELS, ids, lp, **kwargs)


def test_public_functions_validate_too():
    ids, lp = cache(TEACHER_LOGITS, K)
    with pytest.raises(ValueError, match="tail"):
        forward_kl(STUDENT_LOGITS, ids, lp, tail="full")
    with pytest.raises(ValueError, match="temperature"):
        teacher_target(lp, 0.0, "rest")
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(STUDENT_LOGITS, ids, lp, beta=-0.5)


def test_low_precision_logits_computed_in_float32():
    ids, lp = cache(TEACHER_LOGITS, K)
    s16 = STUDENT_LOGITS.to(torch.bfloat16)
    got = forward_kl(s16, ids, lp.float(), tail="rest")
    assert got.dtype == torch.float32
    want = forward_kl(s16.float(), ids, lp.float(), tail="rest")
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# generalized JSD: TRL's convention
# --------------------------------------------------------------------------------------------


def trl_generalized_jsd(student_logits, teacher_logits, beta, temperature):
    """TRL GKDTrainer.generalized_jsd_loss (per-row sum, batchmean over rows), re-typed here.

    TRL mixes ``student + log(1 - beta)`` with ``teacher + log(beta)``, weights
    ``kl_div(mix, teacher)`` (= KL(teacher || mix)) by beta, and special-cases beta=0 to
    ``kl_div(student, teacher)`` = KL(teacher || student), beta=1 to KL(student || teacher).
    TRL does not scale by T².
    """
    s = torch.log_softmax(student_logits / temperature, -1)
    t = torch.log_softmax(teacher_logits / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mix = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mix, t, reduction="none", log_target=True)
        kl_student = F.kl_div(mix, s, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum(-1).mean()


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
def test_jsd_matches_trl_on_full_support(beta, temperature, tail):
    ids, lp = cache(TEACHER_LOGITS, 7)
    got = generalized_jsd(STUDENT_LOGITS, ids, lp, beta=beta, temperature=temperature, tail=tail)
    want = temperature**2 * trl_generalized_jsd(STUDENT_LOGITS, TEACHER_LOGITS, beta, temperature)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_endpoints_are_trl_forward_and_reverse_kl(tail, temperature):
    ids, lp = cache(TEACHER_LOGITS, K)  # sparse support too
    kw = {"temperature": temperature, "tail": tail}
    s = STUDENT_LOGITS
    torch.testing.assert_close(
        generalized_jsd(s, ids, lp, beta=0.0, **kw), forward_kl(s, ids, lp, **kw)
    )
    torch.testing.assert_close(
        generalized_jsd(s, ids, lp, beta=1.0, **kw), reverse_kl(s, ids, lp, **kw)
    )
    assert forward_kl(s, ids, lp, **kw) != pytest.approx(reverse_kl(s, ids, lp, **kw).item())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_symmetry_on_full_support(temperature):
    """Swapping teacher and student: beta=0.5 is symmetric, beta=b equals 1-b swapped."""
    t, s = TEACHER_LOGITS, STUDENT_LOGITS
    ids_t, lp_t = cache(t, 7)
    ids_s, lp_s = cache(s, 7)
    for tail in TAILS:
        kw = {"temperature": temperature, "tail": tail}
        a = generalized_jsd(s, ids_t, lp_t, beta=0.5, **kw)
        b = generalized_jsd(t, ids_s, lp_s, beta=0.5, **kw)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        a = generalized_jsd(s, ids_t, lp_t, beta=0.2, **kw)
        b = generalized_jsd(t, ids_s, lp_s, beta=0.8, **kw)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# sampled_reverse_kl: on-policy per-token reverse KL on rollout tokens
# --------------------------------------------------------------------------------------------
# The student sampled SAMPLED at the three positions of the N=3, V=7 fixture. All three lie
# outside the teacher's top-3 ({0, 3, 6}, {5, 1, 2}, {2, 6, 3}): the loss never uses the top-k,
# only the teacher's exact logprob of the sampled token (the cache's next_logprob).
SAMPLED = torch.tensor([4, 0, 5])
BEHAVIOR = torch.tensor([-2.0, -2.7, -3.2], dtype=torch.float64)  # the rollout policy's lp
W = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)


def hand_log_softmax(row: torch.Tensor) -> list[float]:
    xs = row.tolist()
    mx = max(xs)
    lse = mx + math.log(sum(math.exp(x - mx) for x in xs))
    return [x - lse for x in xs]


def hand_sampled(behavior=None):
    """Per position: (lp, lp_teacher, ratio, softmax row) from the textbook formulas."""
    out = []
    for n in range(3):
        y = int(SAMPLED[n])
        ls = hand_log_softmax(STUDENT_LOGITS[n])
        lp, lp_t = ls[y], hand_log_softmax(TEACHER_LOGITS[n])[y]
        b = None if behavior is None else float(behavior[n])
        ratio = 1.0 if b is None or not math.isfinite(b) else math.exp(lp - b)
        out.append((lp, lp_t, ratio, [math.exp(x) for x in ls]))
    return out


def hand_mean(values: list[float], weights) -> float:
    if weights is None:
        return sum(values) / len(values)
    w = weights.tolist()
    return sum(wi * x for wi, x in zip(w, values, strict=True)) / sum(w)


TEACHER_NEXT_LP = torch.tensor([lp_t for _, lp_t, _, _ in hand_sampled()], dtype=torch.float64)


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize("weights", [None, W], ids=["unweighted", "weighted"])
def test_sampled_rkl_value_by_hand(weights):
    rows = hand_sampled()
    got = sampled_reverse_kl(STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP, weights=weights)
    want = hand_mean([lp - lp_t for lp, lp_t, _, _ in rows], weights)
    torch.testing.assert_close(got, f64(want), rtol=1e-12, atol=1e-12)

    rows = hand_sampled(BEHAVIOR)
    got = sampled_reverse_kl(
        STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP, behavior_logprob=BEHAVIOR, weights=weights
    )
    want = hand_mean(
        [
            math.exp(lp - b) * (lp - lp_t)
            for (lp, lp_t, _, _), b in zip(rows, BEHAVIOR.tolist(), strict=True)
        ],
        weights,
    )
    torch.testing.assert_close(got, f64(want), rtol=1e-12, atol=1e-12)
    # the ratio really is far from 1 here, so the two values differ
    assert not math.isclose(got.item(), hand_mean([lp - lp_t for lp, lp_t, _, _ in rows], weights))


@pytest.mark.parametrize("weights", [None, W], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("behavior", [None, BEHAVIOR], ids=["on_policy", "behavior"])
def test_sampled_rkl_gradient_by_hand(weights, behavior):
    """d loss / d logits = sum_n w_n r_n (lp_n - lp_t_n) (onehot(y_n) - softmax_n) / sum(w)."""
    s = STUDENT_LOGITS.clone().requires_grad_(True)
    sampled_reverse_kl(
        s, SAMPLED, TEACHER_NEXT_LP, behavior_logprob=behavior, weights=weights
    ).backward()
    w = [1.0] * 3 if weights is None else weights.tolist()
    want = [[0.0] * 7 for _ in range(3)]
    for n, (lp, lp_t, ratio, q) in enumerate(hand_sampled(behavior)):
        for j in range(7):
            onehot = 1.0 if j == int(SAMPLED[n]) else 0.0
            want[n][j] = w[n] * ratio * (lp - lp_t) * (onehot - q[j]) / sum(w)
    torch.testing.assert_close(
        s.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


def test_sampled_rkl_nan_behavior_falls_back_to_ratio_one_per_position():
    behavior = BEHAVIOR.clone()
    behavior[0] = float("nan")
    behavior[2] = float("nan")
    rows = hand_sampled(behavior)
    ratios = [r for _, _, r, _ in rows]
    assert ratios[0] == ratios[2] == 1.0 and ratios[1] != 1.0  # a real mix
    s = STUDENT_LOGITS.clone().requires_grad_(True)
    got = sampled_reverse_kl(s, SAMPLED, TEACHER_NEXT_LP, behavior_logprob=behavior)
    got.backward()
    want = hand_mean([ratio * (lp - lp_t) for lp, lp_t, ratio, _ in rows], None)
    torch.testing.assert_close(got, f64(want), rtol=1e-12, atol=1e-12)
    want_grad = [
        [
            ratio * (lp - lp_t) * ((1.0 if j == int(SAMPLED[n]) else 0.0) - q[j]) / 3
            for j in range(7)
        ]
        for n, (lp, lp_t, ratio, q) in enumerate(rows)
    ]
    torch.testing.assert_close(
        s.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert torch.isfinite(s.grad).all()


def test_sampled_rkl_computes_in_float32_or_float64():
    got = sampled_reverse_kl(STUDENT_LOGITS.to(torch.bfloat16), SAMPLED, TEACHER_NEXT_LP.float())
    assert got.dtype == torch.float32
    want = sampled_reverse_kl(
        STUDENT_LOGITS.to(torch.bfloat16).float(), SAMPLED, TEACHER_NEXT_LP.float()
    )
    torch.testing.assert_close(got, want)
    assert sampled_reverse_kl(STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP).dtype == torch.float64


def test_sampled_rkl_rejects_non_finite_teacher_logprob():
    lp_t = TEACHER_NEXT_LP.clone()
    lp_t[0] = float("nan")  # a row's last position slipped into the selection
    lp_t[2] = -INF
    with pytest.raises(ValueError, match="not finite at 2 of 3 positions"):
        sampled_reverse_kl(STUDENT_LOGITS, SAMPLED, lp_t)
    with pytest.raises(ValueError, match="not finite at 2 of 3 positions"):  # whatever the weight
        sampled_reverse_kl(STUDENT_LOGITS, SAMPLED, lp_t, weights=torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((STUDENT_LOGITS[0], SAMPLED[:1], TEACHER_NEXT_LP[:1]), {}, "student_logits"),
        ((STUDENT_LOGITS, SAMPLED[:2], TEACHER_NEXT_LP), {}, "labels"),
        ((STUDENT_LOGITS, SAMPLED[:, None], TEACHER_NEXT_LP), {}, "labels"),
        ((STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP[:2]), {}, "teacher_logprob"),
        ((STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP[None]), {}, "teacher_logprob"),
        (
            (STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP),
            {"behavior_logprob": BEHAVIOR[:2]},
            "behavior",
        ),
        ((STUDENT_LOGITS, SAMPLED, TEACHER_NEXT_LP), {"weights": W[:2]}, "weights"),
        ((STUDENT_LOGITS, SAMPLED.int(), TEACHER_NEXT_LP), {}, "int64"),
        ((STUDENT_LOGITS, torch.tensor([4, -100, 5]), TEACHER_NEXT_LP), {}, "1 of 3 labels"),
        ((STUDENT_LOGITS, torch.tensor([4, 7, 5]), TEACHER_NEXT_LP), {}, "outside"),
    ],
)
def test_sampled_rkl_rejects_bad_shapes(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sampled_reverse_kl(*args, **kwargs)


def test_distill_loss_sampled_rkl():
    # The config accepts exactly what runs: the per-token kinds and the span kinds.
    assert set(get_args(LossKind)) == set(KINDS) | set(XTOK_KINDS)
    kw = {"kind": "sampled_rkl", "next_logprob": TEACHER_NEXT_LP, "policy_logprob": BEHAVIOR}
    s1 = STUDENT_LOGITS.clone().requires_grad_(True)
    s2 = STUDENT_LOGITS.clone().requires_grad_(True)
    loss, parts = distill_loss(s1, SAMPLED, None, None, **kw)  # alpha=1; no top-k needed
    soft = sampled_reverse_kl(s2, SAMPLED, TEACHER_NEXT_LP, behavior_logprob=BEHAVIOR)
    loss.backward()
    soft.backward()
    torch.testing.assert_close(loss, soft, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-12, atol=1e-12)
    ce = hard_ce(STUDENT_LOGITS, SAMPLED)
    assert parts == pytest.approx({"soft": soft.item(), "ce": ce.item()})

    loss, parts = distill_loss(STUDENT_LOGITS, SAMPLED, None, None, alpha=0.3, **kw)
    torch.testing.assert_close(loss, 0.3 * soft.detach() + 0.7 * ce, rtol=1e-12, atol=1e-12)
    # by hand: CE of the sampled tokens is -lp
    rows = hand_sampled(BEHAVIOR)
    want = 0.3 * hand_mean([r * (lp - lp_t) for lp, lp_t, r, _ in rows], None) + 0.7 * hand_mean(
        [-lp for lp, _, _, _ in rows], None
    )
    torch.testing.assert_close(loss, f64(want), rtol=1e-12, atol=1e-12)

    # the top-k is ignored even when given; so are tail and beta
    ids, lp = cache(TEACHER_LOGITS, K)
    again, _ = distill_loss(STUDENT_LOGITS, SAMPLED, ids, lp, alpha=0.3, tail="renorm", **kw)
    torch.testing.assert_close(again, loss, rtol=0, atol=0)

    zero, parts = distill_loss(STUDENT_LOGITS, SAMPLED, None, None, weights=torch.zeros(3), **kw)
    assert zero.item() == 0.0 and parts == {"soft": 0.0, "ce": 0.0}


def test_distill_loss_sampled_rkl_rejects_bad_arguments():
    kw = {"kind": "sampled_rkl", "next_logprob": TEACHER_NEXT_LP}
    with pytest.raises(ValueError, match="temperature 1"):
        distill_loss(STUDENT_LOGITS, SAMPLED, None, None, temperature=2.0, **kw)
    with pytest.raises(ValueError, match="next_logprob"):
        distill_loss(STUDENT_LOGITS, SAMPLED, None, None, kind="sampled_rkl")
    with pytest.raises(ValueError, match="topk_ids and topk_logprobs"):
        distill_loss(STUDENT_LOGITS, SAMPLED, None, None, kind="reverse_kl")


def test_sampled_rkl_is_an_unbiased_estimator_of_the_reverse_kl_gradient():
    """E_{y~q}[per-sample gradient] is exactly grad KL(q || p), and so is E_{y~b} with r = q/b.

    The exact side is autograd on the dense sum_y q (log q - log p); the estimator side
    enumerates every label of a V=5 vocabulary, weighted by its sampling probability. A wrong
    sign, a missing stop-gradient or a wrong ratio would each break the equality.
    """
    z = torch.tensor([0.4, -1.1, 1.3, 0.0, -0.2], dtype=torch.float64)
    log_p = torch.log_softmax(torch.tensor([1.5, 0.3, -0.7, 0.9, -2.0], dtype=torch.float64), 0)
    log_b = torch.log_softmax(torch.tensor([-0.3, 0.8, 0.5, -1.0, 0.2], dtype=torch.float64), 0)
    v = z.numel()

    zz = z.clone().requires_grad_(True)
    log_q = torch.log_softmax(zz, 0)
    exact_kl = (log_q.exp() * (log_q - log_p)).sum()
    exact_kl.backward()
    exact = zz.grad.clone()
    q = log_q.detach().exp()

    def expected(sampling: torch.Tensor, behavior: torch.Tensor | None):
        value, grad = 0.0, torch.zeros(v, dtype=torch.float64)
        for y in range(v):
            zy = z.clone().requires_grad_(True)
            b = None if behavior is None else behavior[y : y + 1]
            loss = sampled_reverse_kl(
                zy[None], torch.tensor([y]), log_p[y : y + 1], behavior_logprob=b
            )
            loss.backward()
            value += sampling[y].item() * loss.item()
            grad += sampling[y] * zy.grad
        return value, grad

    value, grad = expected(q, None)  # on-policy: y ~ q, ratio 1
    assert value == pytest.approx(exact_kl.item(), rel=1e-12, abs=1e-12)  # E[d] = KL(q || p)
    torch.testing.assert_close(grad, exact, rtol=1e-10, atol=1e-10)
    assert exact.abs().max() > 1e-2  # not trivially zero

    value, grad = expected(log_b.exp(), log_b)  # off-policy: y ~ b, ratio q/b
    torch.testing.assert_close(grad, exact, rtol=1e-10, atol=1e-10)
    _, uncorrected = expected(log_b.exp(), None)  # the same samples without the ratio are biased
    assert (uncorrected - exact).abs().max() > 1e-2

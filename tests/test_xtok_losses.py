"""Cross-tokenizer span losses against hand values and written-out float64 references.

The references loop over spans and entries in plain Python floats (``math``, sorted lists);
the module under test is vectorised. The oracle: with the identity vocabulary map and one-token
spans, the GOLD hybrid is exactly the same-tokenizer generalized JSD with a rest bucket.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stages.train.losses import generalized_jsd, hard_ce
from stages.train.xtok_losses import (
    XTOK_KINDS,
    hybrid_loss,
    span_distributions,
    uld_loss,
    xtok_loss,
)

NEG_INF = float("-inf")
LN = math.log

# --------------------------------------------------------------------------------------------
# float64 references: one span at a time, plain Python
# --------------------------------------------------------------------------------------------


def ref_teacher(lps: list[float], temperature: float, tail_exists: bool = True):
    """Tempered target on the k stored entries (0 at padding) and its rest bucket."""
    real = [x for x in lps if x != NEG_INF]
    rest = max(1.0 - sum(math.exp(x) for x in real), 0.0)
    keep_rest = rest > 0 and tail_exists
    z = sum(math.exp(x / temperature) for x in real)
    z += rest ** (1 / temperature) if keep_rest else 0.0
    p = [0.0 if x == NEG_INF else math.exp(x / temperature) / z for x in lps]
    return p, (rest ** (1 / temperature) / z if keep_rest else 0.0)


def ref_softmax(logits: list[float], temperature: float) -> list[float]:
    m = max(logits)
    e = [math.exp((x - m) / temperature) for x in logits]
    return [x / sum(e) for x in e]


def ref_kl(a: list[float], b: list[float]) -> float:
    return sum(x * (LN(x) - LN(y)) for x, y in zip(a, b, strict=True) if x > 0)


def ref_gjsd(p: list[float], q: list[float], beta: float) -> float:
    if beta == 0:
        return ref_kl(p, q)
    if beta == 1:
        return ref_kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
    return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)


def ref_uld(lps, chain_t, q_first, chain_s, temperature) -> float:
    """Mean over spans of sum |sorted P - sorted Q| + |sum P - sum Q|, times T²."""
    total = 0.0
    for lp_row, ct, q_row, cs in zip(lps, chain_t, q_first, chain_s, strict=True):
        k = len(lp_row)
        p, _ = ref_teacher(lp_row, temperature)
        big_p = sorted((x * math.exp(ct) for x in p), reverse=True)
        big_q = sorted((x * math.exp(cs) for x in q_row), reverse=True)[:k]
        big_q += [0.0] * (k - len(big_q))
        l1 = sum(abs(x - y) for x, y in zip(big_p, big_q, strict=True))
        total += l1 + abs(sum(big_p) - sum(big_q))
    return total / len(lps) * temperature**2


def ref_hybrid(
    ids, lps, chain_t, q_first, chain_s, vmap, smapped, beta, temperature, mw=None, uw=None
):
    """(loss, matched, unmatched, mapped share) as means over spans."""
    v_t = len(vmap)
    out = [0.0, 0.0, 0.0, 0.0]
    for id_row, lp_row, ct, q_row, cs in zip(ids, lps, chain_t, q_first, chain_s, strict=True):
        k = len(lp_row)
        n_real = sum(x != NEG_INF for x in lp_row)
        p, _ = ref_teacher(lp_row, temperature, tail_exists=n_real < v_t)
        real = [j for j in range(k) if lp_row[j] != NEG_INF]
        m_idx = [j for j in real if vmap[id_row[j]] >= 0]
        u_idx = [j for j in real if vmap[id_row[j]] < 0]
        pm = [p[j] * math.exp(ct) for j in m_idx]
        qm = [q_row[vmap[id_row[j]]] * math.exp(cs) for j in m_idx]
        jsd = ref_gjsd([*pm, 1 - sum(pm)], [*qm, 1 - sum(qm)], beta)
        pu = sorted((p[j] * math.exp(ct) for j in u_idx), reverse=True)
        pu += [0.0] * (k - len(pu))
        qu = sorted(q_row[i] * math.exp(cs) for i in range(len(q_row)) if not smapped[i])
        qu = qu[::-1][:k]
        qu += [0.0] * (k - len(qu))
        l1 = sum(abs(x - y) for x, y in zip(pu, qu, strict=True))
        sm, su = sum(p[j] for j in m_idx), sum(p[j] for j in u_idx)
        share = sm / (sm + su) if sm + su > 0 else 0.5
        w_m = share if mw is None else mw
        w_u = 1 - w_m if uw is None else uw
        t2 = temperature**2
        for i, x in enumerate(((w_m * jsd + w_u * l1) * t2, jsd * t2, l1 * t2, share)):
            out[i] += x / len(lps)
    return out


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.tolist()


# --------------------------------------------------------------------------------------------
# a hand case: S=2 spans, k=3, V=5 student ids, V_t=6 teacher ids
# --------------------------------------------------------------------------------------------

T_LPS = torch.tensor(
    [[LN(0.5), LN(0.3), LN(0.1)], [LN(0.6), LN(0.2), NEG_INF]], dtype=torch.float64
)
T_IDS = torch.tensor([[0, 1, 4], [2, 3, 5]])  # row 1's last entry is padding
T_CHAIN = torch.tensor([0.0, LN(0.5)], dtype=torch.float64)
Q_FIRST = torch.tensor(
    [[0.4, 0.1, 0.2, 0.25, 0.05], [0.1, 0.6, 0.1, 0.1, 0.1]], dtype=torch.float64
)
S_CHAIN = torch.tensor([0.0, LN(0.5)], dtype=torch.float64)
VMAP = torch.tensor([0, -1, 2, -1, 3, -1])  # teacher 0->0, 2->2, 4->3; 1, 3, 5 unmapped
SMAPPED = torch.tensor([True, False, True, True, False])  # only 2 unmapped student ids < k


def test_uld_hand_values() -> None:
    # span 0: P = [.5, .3, .1] vs student top-3 [.4, .25, .2]: .1 + .05 + .1, rests .1 vs .15
    # span 1: P = .5 * [.6, .2, 0] vs .5 * [.6, .1, .1]: 0 + .05 + .05, rests .6 vs .6
    loss = uld_loss(T_LPS, T_CHAIN, Q_FIRST.log(), S_CHAIN)
    torch.testing.assert_close(loss, torch.tensor((0.30 + 0.10) / 2, dtype=torch.float64))
    weighted = uld_loss(T_LPS, T_CHAIN, Q_FIRST.log(), S_CHAIN, weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(weighted, torch.tensor((3 * 0.30 + 0.10) / 4, dtype=torch.float64))


def test_hybrid_hand_values() -> None:
    # span 0: M = {t0->s0, t4->s3}: P_m = [.5, .1] (rest .4), Q_m = [.4, .25] (rest .35);
    #   U = {t1}: P_u = [.3, 0, 0] vs the student's unmapped s1, s4: [.1, .05, 0]; share 2/3.
    # span 1 (chains .5): P_m = [.3] (rest .7), Q_m = [.5 * .1] (rest .95);
    #   P_u = [.1, 0, 0] vs .5 * [.6, .1] = [.3, .05, 0]; share .6 / .8.
    kl0 = 0.5 * LN(0.5 / 0.4) + 0.1 * LN(0.1 / 0.25) + 0.4 * LN(0.4 / 0.35)
    kl1 = 0.3 * LN(0.3 / 0.05) + 0.7 * LN(0.7 / 0.95)
    l1_0, l1_1 = 0.2 + 0.05, 0.2 + 0.05
    loss, parts = hybrid_loss(
        T_IDS, T_LPS, T_CHAIN, Q_FIRST.log(), S_CHAIN, VMAP, SMAPPED, beta=0.0
    )
    expected = ((2 / 3) * kl0 + (1 / 3) * l1_0 + 0.75 * kl1 + 0.25 * l1_1) / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(parts["matched"], torch.tensor((kl0 + kl1) / 2).double())
    torch.testing.assert_close(parts["unmatched"], torch.tensor((l1_0 + l1_1) / 2).double())
    torch.testing.assert_close(parts["mapped_mass"], torch.tensor((2 / 3 + 0.75) / 2).double())
    # reverse KL: KL(Q || P) on the same (k+1)-vectors
    rkl0 = 0.4 * LN(0.4 / 0.5) + 0.25 * LN(0.25 / 0.1) + 0.35 * LN(0.35 / 0.4)
    rkl1 = 0.05 * LN(0.05 / 0.3) + 0.95 * LN(0.95 / 0.7)
    loss, _ = hybrid_loss(T_IDS, T_LPS, T_CHAIN, Q_FIRST.log(), S_CHAIN, VMAP, SMAPPED, beta=1.0)
    expected = ((2 / 3) * rkl0 + (1 / 3) * l1_0 + 0.75 * rkl1 + 0.25 * l1_1) / 2
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("weights", [(None, None), (0.8, None), (0.25, 2.0), (None, 0.5)])
def test_hybrid_hand_case_matches_reference(weights) -> None:
    mw, uw = weights
    for temperature in (1.0, 2.0, 0.7):
        log_q = torch.log_softmax(Q_FIRST.log() / temperature, dim=-1)
        for beta in (0.0, 0.3, 1.0):
            kw = {"beta": beta, "temperature": temperature}
            loss, parts = hybrid_loss(
                T_IDS, T_LPS, T_CHAIN, log_q, S_CHAIN, VMAP, SMAPPED,
                matched_weight=mw, unmatched_weight=uw, **kw,
            )  # fmt: skip
            ref = ref_hybrid(
                rows(T_IDS), rows(T_LPS), T_CHAIN.tolist(), rows(log_q.exp()), S_CHAIN.tolist(),
                VMAP.tolist(), SMAPPED.tolist(), beta, temperature, mw, uw,
            )  # fmt: skip
            got = torch.stack([loss, parts["matched"], parts["unmatched"], parts["mapped_mass"]])
            torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# random cases against the references
# --------------------------------------------------------------------------------------------


def random_case(seed: int, s: int = 6, k: int = 4, v: int = 9, v_t: int = 11):
    """A teacher cache with padding and chains, a student, and an injective partial map."""
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(s, v_t, generator=g, dtype=torch.float64) * 2
    lps, ids = torch.log_softmax(t_logits, dim=-1).topk(k, dim=-1)
    lps[1, -1] = NEG_INF
    lps[2, 1:] = NEG_INF
    lps[4, :] = NEG_INF  # nothing stored for this span
    ids[1, -1] = 0  # padding may carry any id, even a real one
    t_chain = -torch.rand(s, generator=g, dtype=torch.float64) * 3
    t_chain[0] = 0.0
    s_logits = torch.randn(s, v, generator=g, dtype=torch.float64) * 2
    s_chain = -torch.rand(s, generator=g, dtype=torch.float64) * 3
    s_chain[3] = 0.0
    vmap = torch.full((v_t,), -1, dtype=torch.int64)
    teacher_mapped = torch.randperm(v_t, generator=g)[: v - 3]
    vmap[teacher_mapped] = torch.randperm(v, generator=g)[: v - 3]
    smapped = torch.zeros(v, dtype=torch.bool)
    smapped[vmap[vmap >= 0]] = True
    return ids, lps, t_chain, s_logits, s_chain, vmap, smapped


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_reference(seed, temperature) -> None:
    _, lps, t_chain, s_logits, s_chain, _, _ = random_case(seed)
    log_q = torch.log_softmax(s_logits / temperature, dim=-1)
    loss = uld_loss(lps, t_chain, log_q, s_chain, temperature=temperature)
    ref = ref_uld(rows(lps), t_chain.tolist(), rows(log_q.exp()), s_chain.tolist(), temperature)
    torch.testing.assert_close(loss, torch.tensor(ref, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_hybrid_matches_reference(seed, temperature, beta) -> None:
    ids, lps, t_chain, s_logits, s_chain, vmap, smapped = random_case(seed)
    log_q = torch.log_softmax(s_logits / temperature, dim=-1)
    loss, parts = hybrid_loss(
        ids, lps, t_chain, log_q, s_chain, vmap, smapped, beta=beta, temperature=temperature
    )
    ref = ref_hybrid(
        rows(ids),
        rows(lps),
        t_chain.tolist(),
        rows(log_q.exp()),
        s_chain.tolist(),
        vmap.tolist(),
        smapped.tolist(),
        beta,
        temperature,
    )
    got = [loss, parts["matched"], parts["unmatched"], parts["mapped_mass"]]
    torch.testing.assert_close(torch.stack(got), torch.tensor(ref, dtype=torch.float64))
    # float32 inputs: the same numbers to float32 accuracy
    loss32, _ = hybrid_loss(
        ids,
        lps.float(),
        t_chain.float(),
        log_q.float(),
        s_chain.float(),
        vmap,
        smapped,
        beta=beta,
        temperature=temperature,
    )
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, torch.tensor(ref[0], dtype=torch.float32))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [3, 7])  # k == V: the top-k covers the whole vocabulary
def test_hybrid_identity_map_is_generalized_jsd(temperature, beta, k) -> None:
    g = torch.Generator().manual_seed(k)
    n, v = 5, 7
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lps, ids = torch.log_softmax(torch.randn(n, v, generator=g) * 2, -1).double().topk(k, -1)
    lps[0, -1] = NEG_INF
    start, index = torch.ones(n, dtype=torch.bool), torch.arange(n)
    labels = torch.randint(0, v, (n,), generator=g)
    log_q, s_chain = span_distributions(logits, labels, start, index, n, temperature)
    loss, _ = hybrid_loss(
        ids,
        lps,
        torch.zeros(n, dtype=torch.float64),
        log_q,
        s_chain,
        torch.arange(v),
        torch.ones(v, dtype=torch.bool),
        beta=beta,
        temperature=temperature,
    )
    jsd = generalized_jsd(logits, ids, lps, beta=beta, temperature=temperature, tail="rest")
    torch.testing.assert_close(loss, jsd)


# --------------------------------------------------------------------------------------------
# span_distributions
# --------------------------------------------------------------------------------------------

# 7 positions in 3 spans, not in order: span 0 = {2 (start), 5}, span 1 = {0 (start)},
# span 2 = {6 (start), 1, 4, 3}
SPAN_INDEX = torch.tensor([1, 2, 0, 2, 2, 0, 2])
SPAN_START = torch.tensor([True, False, True, False, False, False, True])
LABELS = torch.tensor([3, 0, 4, 1, 1, 2, 0])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_span_distributions_values(temperature) -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_q, chain = span_distributions(logits, LABELS, SPAN_START, SPAN_INDEX, 3, temperature)
    starts = [2, 0, 6]
    for s, pos in enumerate(starts):
        ref = [LN(x) for x in ref_softmax(logits[pos].tolist(), temperature)]
        torch.testing.assert_close(log_q[s], torch.tensor(ref, dtype=torch.float64))
    lp = [LN(ref_softmax(logits[i].tolist(), 1.0)[LABELS[i]]) for i in range(7)]
    torch.testing.assert_close(
        chain, torch.tensor([lp[5], 0.0, lp[1] + lp[4] + lp[3]], dtype=torch.float64)
    )


def test_span_distributions_gradients() -> None:
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    log_q, chain = span_distributions(logits, LABELS, SPAN_START, SPAN_INDEX, 3)
    assert log_q.dtype == chain.dtype == torch.float32
    (g_chain,) = torch.autograd.grad(chain.sum(), logits, retain_graph=True)
    assert torch.isfinite(g_chain).all()
    assert (g_chain[SPAN_START] == 0).all()  # start rows do not predict the continuation
    assert (g_chain[~SPAN_START].abs().sum(-1) > 0).all()
    probe = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    (g_first,) = torch.autograd.grad((log_q * probe).sum(), logits)
    assert torch.isfinite(g_first).all()
    assert (g_first[~SPAN_START] == 0).all()
    assert (g_first[SPAN_START].abs().sum(-1) > 0).all()


def test_span_distributions_one_token_spans_have_zero_chain() -> None:
    logits = torch.randn(4, 6, requires_grad=True)
    log_q, chain = span_distributions(
        logits, torch.full((4,), -100), torch.ones(4, dtype=torch.bool), torch.arange(4), 4
    )  # labels at start positions are never read
    torch.testing.assert_close(log_q, torch.log_softmax(logits, -1))
    assert (chain == 0).all()


@pytest.mark.parametrize(
    ("start", "index", "labels", "match"),
    [
        ([True, False, True], [0, 0, 2], [1, 1, 1], "span_index"),  # 2 >= num_spans
        ([True, True, False], [0, 0, 1], [1, 1, 1], "exactly one start"),
        ([True, False, False], [0, 0, 1], [1, 1, 1], "exactly one start"),  # span 1 has none
        ([True, False, True], [0, 0, 1], [1, -100, 1], "labels"),
    ],
)
def test_span_distributions_rejects_bad_spans(start, index, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        span_distributions(
            torch.randn(3, 4), torch.tensor(labels), torch.tensor(start), torch.tensor(index), 2
        )


# --------------------------------------------------------------------------------------------
# ULD properties
# --------------------------------------------------------------------------------------------


def test_uld_ignores_which_token_carries_which_probability() -> None:
    # Permuting the student's vocabulary, or the order of the teacher's stored entries
    # (padding included), leaves the sorted comparison unchanged.
    _, lps, t_chain, s_logits, s_chain, _, _ = random_case(3)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(s_logits.shape[1], generator=g)
    t_perm = torch.randperm(lps.shape[1], generator=g)
    assert not torch.equal(t_perm, torch.arange(lps.shape[1]))
    for t in (1.0, 2.0):
        a = uld_loss(lps, t_chain, torch.log_softmax(s_logits / t, -1), s_chain, temperature=t)
        b = uld_loss(
            lps[:, t_perm],
            t_chain,
            torch.log_softmax(s_logits[:, perm] / t, -1),
            s_chain,
            temperature=t,
        )
        torch.testing.assert_close(a, b)
        assert a > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_and_hybrid_vanish_when_the_student_is_the_teacher(temperature) -> None:
    # Full support (k == V), multi-token spans, the teacher's chain equal to the student's.
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    log_q, chain = span_distributions(logits, LABELS, SPAN_START, SPAN_INDEX, 3, temperature)
    lps, ids = torch.log_softmax(logits[[2, 0, 6]], -1).topk(5, -1)  # the RAW log-probs
    assert (chain < 0).any()
    uld = uld_loss(lps, chain, log_q, chain, temperature=temperature)
    torch.testing.assert_close(uld, torch.tensor(0.0, dtype=torch.float64))
    hybrid, _ = hybrid_loss(
        ids,
        lps,
        chain,
        log_q,
        chain,
        torch.arange(5),
        torch.ones(5, dtype=torch.bool),
        temperature=temperature,
    )
    torch.testing.assert_close(hybrid, torch.tensor(0.0, dtype=torch.float64))


def test_uld_is_a_lower_bound_of_the_full_sorted_l1() -> None:
    # Teacher vocabulary of 12, student of 9: the full sorted L1 pads the student with zeros.
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(20, 12, generator=g, dtype=torch.float64) * 2, -1)
    q = torch.softmax(torch.randn(20, 9, generator=g, dtype=torch.float64) * 2, -1)
    q_padded = torch.cat([q, torch.zeros(20, 3, dtype=torch.float64)], -1)
    exact = (p.sort(-1).values - q_padded.sort(-1).values).abs().sum(-1)
    zero = torch.zeros(1, dtype=torch.float64)
    for k in (1, 4, 12):
        top = p.log().topk(k, -1).values
        per_span = torch.stack(
            [uld_loss(top[i : i + 1], zero, q[i : i + 1].log(), zero) for i in range(20)]
        )
        assert (per_span <= exact + 1e-12).all()
        if k == 12:  # the teacher's whole vocabulary: the bound is the full L1
            torch.testing.assert_close(per_span, exact)
        else:
            assert (per_span < exact - 1e-6).any()


# --------------------------------------------------------------------------------------------
# finite values and gradients at the edges
# --------------------------------------------------------------------------------------------


def edge_case(name: str):
    """(student logits [N, V], teacher ids / lps [S, k], teacher chain, map, student_mapped)."""
    n, v, v_t, k = 5, 6, 8, 4
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(n, v, generator=g)
    lps, ids = torch.log_softmax(torch.randn(3, v_t, generator=g), -1).topk(k, -1)
    chain = torch.tensor([0.0, -1.5, -0.2])
    vmap = torch.tensor([0, -1, 1, -1, 2, 3, -1, -1])
    smapped = torch.tensor([True, True, True, True, False, False])
    if name == "padding":
        lps[0, 2:] = NEG_INF
        lps[2, :] = NEG_INF  # nothing stored at all
    elif name == "huge_logits":
        logits = logits * 1e4
        lps = torch.log_softmax(torch.randn(3, v_t, generator=g) * 1e4, -1).topk(k, -1).values
    elif name == "all_unmapped":
        vmap = torch.full((v_t,), -1)
        smapped = torch.zeros(v, dtype=torch.bool)
    elif name == "all_mapped":
        vmap = torch.arange(v_t) % v
        vmap[v:] = -1
        ids = torch.tensor([[0, 1, 2, 3], [5, 4, 3, 2], [1, 0, 5, 4]])
        smapped = torch.ones(v, dtype=torch.bool)
    elif name == "few_unmapped":  # 1 unmapped student id < k
        smapped = torch.tensor([True, True, True, True, False, True])
        vmap = torch.tensor([0, -1, 1, -1, 2, 3, 5, -1])
    elif name == "student_has_no_tail":  # the matched ids are all the student's mass
        logits[:, 4:] = NEG_INF
        chain = torch.zeros(3)
    return logits, ids, lps, chain, vmap, smapped


EDGES = [
    "padding",
    "huge_logits",
    "all_unmapped",
    "all_mapped",
    "few_unmapped",
    "student_has_no_tail",
]


@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_finite_values_and_gradients(edge, kind) -> None:
    logits, ids, lps, chain, vmap, smapped = edge_case(edge)
    logits.requires_grad_(True)
    start = torch.tensor([True, False, True, True, False])
    index = torch.tensor([0, 0, 1, 2, 2])
    labels = torch.tensor([1, 2, 3, 0, 1])
    maps = {"vocab_map": vmap, "student_mapped": smapped}
    for temperature, beta in itertools.product((1.0, 2.0), (0.0, 0.5, 1.0)):
        loss, parts = xtok_loss(
            logits, labels, start, index, 3, ids, lps, chain,
            kind=kind, temperature=temperature, beta=beta, alpha=0.7, **maps,
        )  # fmt: skip
        assert torch.isfinite(loss)
        assert all(math.isfinite(x) for x in parts.values())
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all()
        if kind == "hybrid" and edge == "all_unmapped":
            assert parts["mapped_mass"] == 0.0
        if kind == "hybrid" and edge == "all_mapped":
            assert parts["mapped_mass"] == 1.0 and parts["unmatched"] == 0.0


def test_hybrid_stays_finite_when_matched_entries_hold_all_the_mass() -> None:
    # k == V_t == V with the identity map and zero chains: both rest buckets are empty.
    logits = torch.randn(3, 4, requires_grad=True)
    lps, ids = torch.log_softmax(torch.randn(3, 4), -1).topk(4, -1)
    log_q, s_chain = span_distributions(
        logits,
        torch.zeros(3, dtype=torch.long),
        torch.ones(3, dtype=torch.bool),
        torch.arange(3),
        3,
    )
    for beta in (0.0, 0.5, 1.0):
        loss, _ = hybrid_loss(
            ids,
            lps,
            torch.zeros(3),
            log_q,
            s_chain,
            torch.arange(4),
            torch.ones(4, dtype=torch.bool),
            beta=beta,
            temperature=2.0,
        )
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# --------------------------------------------------------------------------------------------
# xtok_loss
# --------------------------------------------------------------------------------------------


def xtok_inputs():
    logits, ids, lps, chain, vmap, smapped = edge_case("padding")
    start = torch.tensor([True, False, True, True, False])
    index = torch.tensor([0, 0, 1, 2, 2])
    labels = torch.tensor([1, 2, 3, 0, 1])
    return (logits, labels, start, index, 3, ids, lps, chain), {
        "vocab_map": vmap,
        "student_mapped": smapped,
    }


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_xtok_loss_mixes_soft_and_hard_ce(kind) -> None:
    args, maps = xtok_inputs()
    logits, labels, start, index, s, ids, lps, chain = args
    soft, parts = xtok_loss(*args, kind=kind, alpha=1.0, temperature=2.0, **maps)
    log_q, s_chain = span_distributions(logits, labels, start, index, s, 2.0)
    if kind == "uld":
        direct = uld_loss(lps, chain, log_q, s_chain, temperature=2.0)
    else:
        direct, extra = hybrid_loss(
            ids,
            lps,
            chain,
            log_q,
            s_chain,
            maps["vocab_map"],
            maps["student_mapped"],
            temperature=2.0,
        )
        assert parts["matched"] == pytest.approx(float(extra["matched"]))
        assert parts["mapped_mass"] == pytest.approx(float(extra["mapped_mass"]))
    torch.testing.assert_close(soft, direct)
    ce = hard_ce(logits, labels)
    assert parts["soft"] == pytest.approx(float(soft)) and parts["ce"] == pytest.approx(float(ce))
    mixed, mixed_parts = xtok_loss(*args, kind=kind, alpha=0.3, temperature=2.0, **maps)
    torch.testing.assert_close(mixed, 0.3 * soft + 0.7 * ce)
    assert mixed_parts["soft"] == pytest.approx(parts["soft"])


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_xtok_loss_alpha_zero_keeps_the_soft_term_out_of_the_graph(kind) -> None:
    args, maps = xtok_inputs()
    logits = args[0].clone().requires_grad_(True)
    loss, parts = xtok_loss(logits, *args[1:], kind=kind, alpha=0.0, **maps)
    assert parts["soft"] > 0
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ce,) = torch.autograd.grad(hard_ce(logits, args[1]), logits)
    torch.testing.assert_close(grad, grad_ce)


def test_xtok_loss_ce_ignores_the_teacher() -> None:
    logits = torch.randn(4, 6)
    labels = torch.tensor([1, 0, 5, 2])
    start = torch.tensor([True, False, True, True])
    loss, parts = xtok_loss(
        logits, labels, start, torch.tensor([0, 0, 1, 2]), 3, None, None, None, kind="ce"
    )
    torch.testing.assert_close(loss, hard_ce(logits, labels))
    assert parts == {"soft": 0.0, "ce": pytest.approx(float(loss))}
    assert set(XTOK_KINDS) == {"ce", "uld", "hybrid"}


def test_xtok_loss_uld_needs_no_ids_or_map() -> None:
    args, _ = xtok_inputs()
    loss, parts = xtok_loss(*args[:5], None, *args[6:], kind="uld")
    assert torch.isfinite(loss) and set(parts) == {"soft", "ce"}


def test_xtok_loss_errors() -> None:
    args, maps = xtok_inputs()
    with pytest.raises(ValueError, match="unknown cross-tokenizer loss kind"):
        xtok_loss(*args, kind="forward_kl", **maps)
    with pytest.raises(ValueError, match="vocab_map"):
        xtok_loss(*args, kind="hybrid")
    with pytest.raises(ValueError, match="teacher_topk_logprobs"):
        xtok_loss(*args[:6], None, None, kind="uld")
    with pytest.raises(ValueError, match="labels"):
        xtok_loss(args[0], args[1][:3], *args[2:], kind="uld")
    with pytest.raises(ValueError, match=r"teacher_chain must have shape \(3,\)"):
        xtok_loss(*args[:7], args[7][:2], kind="uld")
    with pytest.raises(ValueError, match=r"\[S, k\] with S = 3"):
        xtok_loss(*args[:6], args[6][:2], args[7], kind="uld")
    with pytest.raises(ValueError, match="student_mapped"):
        xtok_loss(
            *args,
            kind="hybrid",
            vocab_map=maps["vocab_map"],
            student_mapped=maps["student_mapped"][:4],
        )
    with pytest.raises(ValueError, match="past the student"):
        xtok_loss(
            *args,
            kind="hybrid",
            vocab_map=maps["vocab_map"] + 3,
            student_mapped=maps["student_mapped"],
        )
    with pytest.raises(ValueError, match="matched_weight"):
        xtok_loss(*args, kind="hybrid", matched_weight=1.5, **maps)
    with pytest.raises(ValueError, match="alpha"):
        xtok_loss(*args, kind="uld", alpha=1.5)

"""The fused loss path (`logit_stats`, `logits_at`) against the formulas it replaced.

`logit_stats` is checked against plain torch ops (values and gradients, several chunkings,
rest buckets that underflow, bf16 logits) and by gradcheck. The training losses built on it
(`xtok_loss`, `distill_loss`, `hard_ce`, `sampled_reverse_kl`) are checked against the path
as it was before, which bench/student_step.py keeps for its before/after timing
(`reference_xtok_loss`, `reference_distill_loss`): same values, same gradients, to float64
rounding. `logits_at` must give the logits of a plain forward at the trained positions.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import stages.train.logit_stats as logit_stats_module
from bench.student_step import reference_distill_loss, reference_xtok_loss
from stages.train.logit_stats import logit_stats
from stages.train.losses import distill_loss, hard_ce, sampled_reverse_kl
from stages.train.trainer import logits_at
from stages.train.xtok_losses import xtok_loss

NEG_INF = float("-inf")
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


@pytest.fixture(params=[None, 1, 3], ids=["one-chunk", "1-row-chunks", "3-row-chunks"])
def chunk_rows(request, monkeypatch):
    """Run under several chunkings: the default, one row per chunk, three rows per chunk."""
    if request.param is not None:
        original = logit_stats_module._Chunks.__init__

        def init(self, n, v, rows, device):
            original(self, n, v, rows, device)
            step = request.param
            self.bounds = [(a, min(a + step, n)) for a in range(0, n, step)]
            if rows is not None:
                edges = torch.tensor([a for a, _ in self.bounds] + [n], device=device)
                self.cuts = torch.searchsorted(self.local, edges).tolist()

        monkeypatch.setattr(logit_stats_module._Chunks, "__init__", init)
    return request.param


# --------------------------------------------------------------------------------------------
# logit_stats against plain torch
# --------------------------------------------------------------------------------------------


def reference_stats(z, labels, rows, ids, mask, t, top_k, allowed):
    """The same statistics with plain autograd ops over the full rows."""
    z = z.double() if z.dtype == torch.float64 else z.float()
    lse = torch.logsumexp(z, -1)
    label_ok = labels != -100
    label_logit = torch.where(
        label_ok, z.gather(1, torch.where(label_ok, labels, 0)[:, None]).squeeze(1), 0.0
    )
    zr = z[rows]
    lse_t = torch.logsumexp(zr / t, -1)
    picked = zr.gather(1, torch.where(mask, ids, 0))
    support = torch.zeros(zr.shape[0], zr.shape[1] + 1, dtype=torch.bool)
    support.scatter_(1, torch.where(mask, ids, zr.shape[1]), True)
    outside = ~support[:, :-1] & (zr > NEG_INF)
    lse_rest = torch.logsumexp((zr / t).masked_fill(~outside, NEG_INF), -1)
    cand = zr if allowed is None else zr.masked_fill(~allowed, NEG_INF)
    top = cand.topk(min(top_k, zr.shape[1]), -1).values
    if top_k > zr.shape[1]:
        top = torch.cat([top, top.new_full((top.shape[0], top_k - zr.shape[1]), NEG_INF)], -1)
    return lse, label_logit, lse_t, picked, lse_rest, top


def stats_case(seed: int, n=9, v=11, k=4, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2] = -100
    rows = torch.tensor([5, 0, 7, 3, 8])  # unordered subset
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in rows])
    mask = torch.rand(len(rows), k, generator=g) < 0.8
    mask[1] = False  # a row of padding only
    ids[2, 1] = ids[2, 0]  # padding may repeat a real id
    mask[2, 1] = False
    allowed = torch.rand(v, generator=g) < 0.6
    return z, labels, rows, ids, mask, allowed


def _combine(outputs, probes):
    total = 0.0
    for x, p in zip(outputs, probes, strict=True):
        finite = torch.isfinite(x)
        total = total + torch.where(finite, x, 0.0).mul(p).sum()
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [0, 4, 12])
@pytest.mark.parametrize("restrict", [False, True])
def test_logit_stats_match_plain_torch(chunk_rows, temperature, top_k, restrict) -> None:
    z, labels, rows, ids, mask, allowed = stats_case(0)
    allowed = allowed if restrict else None
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    st = logit_stats(
        z1, labels, rows=rows, ids=ids, ids_mask=mask, temperature=temperature, rest=True,
        top_k=top_k, top_allowed=allowed,
    )  # fmt: skip
    got = (st.lse, st.label_logit, st.lse_t, st.picked, st.lse_rest, st.top)
    ref = reference_stats(z2, labels, rows, ids, mask, temperature, top_k, allowed)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    g = torch.Generator().manual_seed(1)
    probes = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in ref]
    probes[3] = torch.where(mask, probes[3], 0.0)  # picked is meaningless at padding
    (g1,) = torch.autograd.grad(_combine(got, probes), z1)
    (g2,) = torch.autograd.grad(_combine(ref, probes), z2)
    torch.testing.assert_close(g1, g2, **TIGHT)


def test_logit_stats_all_rows_and_no_labels(chunk_rows) -> None:
    z, _, _, _, _, _ = stats_case(3)
    ids = torch.stack([torch.randperm(11)[:3] for _ in range(9)])
    mask = torch.ones(9, 3, dtype=torch.bool)
    z1 = z.clone().requires_grad_(True)
    st = logit_stats(z1, ids=ids, ids_mask=mask, temperature=0.7, rest=True)
    assert (st.label_logit == 0).all()
    ref = reference_stats(z, torch.full((9,), -100), torch.arange(9), ids, mask, 0.7, 0, None)
    torch.testing.assert_close(st.lse_rest, ref[4], **TIGHT)
    (g1,) = torch.autograd.grad((st.lse_rest * torch.arange(9.0).double()).sum(), z1)
    z2 = z.clone().requires_grad_(True)
    ref = reference_stats(z2, torch.full((9,), -100), torch.arange(9), ids, mask, 0.7, 0, None)
    (g2,) = torch.autograd.grad((ref[4] * torch.arange(9.0).double()).sum(), z2)
    torch.testing.assert_close(g1, g2, **TIGHT)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_stats_rest_that_underflows_is_exact(chunk_rows, temperature) -> None:
    # Row 0: the support holds all but ~e^-2995 of the mass, so the rest cannot be read off
    # exp(z - max) and is recomputed with its own shift. Row 3: every finite logit is in the
    # support, so the rest is empty and stays -inf, without NaN gradients.
    z = torch.tensor(
        [
            [3000.0, 2999.0, 0.0, -1.0, 5.0],
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [9.0, 8.0, 7.0, 6.0, 5.0],
            [1.0, 2.0, 3.0, NEG_INF, NEG_INF],
        ],
        dtype=torch.float64,
    )
    ids = torch.tensor([[0, 1, 0], [4, 0, 0], [0, 1, 2], [0, 1, 2]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    rows = torch.arange(4)
    no_labels = torch.full((4,), -100)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    st = logit_stats(z1, rows=rows, ids=ids, ids_mask=mask, temperature=temperature, rest=True)
    ref = reference_stats(z2, no_labels, rows, ids, mask, temperature, 0, None)
    torch.testing.assert_close(st.lse_rest, ref[4], **TIGHT)
    assert torch.isneginf(st.lse_rest[3])
    assert torch.isfinite(st.lse_rest[0]) and st.lse_rest[0] < 100 / temperature
    w = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def objective(lse_rest, lse_t):
        return (torch.where(torch.isfinite(lse_rest), lse_rest, 0.0) * w).sum() + lse_t.sum()

    (g1,) = torch.autograd.grad(objective(st.lse_rest, st.lse_t), z1)
    (g2,) = torch.autograd.grad(objective(ref[4], ref[2]), z2)
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(g1, g2, **TIGHT)


def test_logit_stats_gradcheck(chunk_rows) -> None:
    z, labels, rows, ids, mask, allowed = stats_case(5, n=6, v=7, k=3)
    rows = torch.tensor([4, 1, 2])
    ids, mask = ids[:3], mask[:3]

    def fn(x):
        st = logit_stats(
            x, labels, rows=rows, ids=ids, ids_mask=mask, temperature=1.7, rest=True,
            top_k=2, top_allowed=allowed,
        )  # fmt: skip
        return (
            st.lse,
            st.label_logit,
            st.lse_t,
            torch.where(mask, st.picked, 0),
            st.lse_rest,
            st.top,
        )

    assert torch.autograd.gradcheck(fn, (z.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_logit_stats_bf16_logits() -> None:
    z, labels, rows, ids, mask, _ = stats_case(2, dtype=torch.bfloat16)
    z1 = z.clone().requires_grad_(True)
    st = logit_stats(z1, labels, rows=rows, ids=ids, ids_mask=mask, rest=True, top_k=3)
    assert st.lse.dtype == torch.float32
    (g,) = torch.autograd.grad(st.lse.sum() + st.lse_rest.sum(), z1)
    assert g.dtype == torch.bfloat16
    z2 = z.float().requires_grad_(True)
    ref = reference_stats(z2, labels, rows, ids, mask, 1.0, 3, None)
    (g2,) = torch.autograd.grad(ref[0].sum() + ref[4].sum(), z2)
    torch.testing.assert_close(g.float(), g2, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------
# xtok_loss against the span losses as they were composed
# --------------------------------------------------------------------------------------------


def span_case(seed: int, n=23, v=40, v_t=30, k=6, scale=3.0):
    """Random spans over unordered positions, teacher top-k with padding, a partial map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    s = 9
    span_index = torch.cat([torch.arange(s), torch.randint(0, s, (n - s,), generator=g)])
    span_start = torch.zeros(n, dtype=torch.bool)
    span_start[:s] = True
    perm = torch.randperm(n, generator=g)
    span_index, span_start = span_index[perm], span_start[perm]
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = torch.log_softmax(torch.randn(s, v_t, generator=g, dtype=torch.float64) * 2, -1)
    lps, ids = teacher.topk(k, -1)
    lps[1, 3:] = NEG_INF
    lps[4] = NEG_INF  # nothing stored
    chain = -torch.rand(s, generator=g, dtype=torch.float64) * (torch.rand(s, generator=g) < 0.5)
    vmap = torch.full((v_t,), -1)
    mapped = torch.rand(v_t, generator=g) < 0.7
    mapped &= torch.cumsum(mapped, 0) <= v  # no more images than student ids
    vmap[mapped] = torch.randperm(v, generator=g)[: int(mapped.sum())]
    smapped = torch.zeros(v, dtype=torch.bool)
    smapped[vmap[mapped]] = True
    return (logits, labels, span_start, span_index, s, ids, lps, chain), {
        "vocab_map": vmap,
        "student_mapped": smapped,
    }


def _both(args, maps, dtype=torch.float64, **options):
    logits = args[0].to(dtype)
    out = []
    for fn in (xtok_loss, reference_xtok_loss):
        x = logits.clone().requires_grad_(True)
        loss, parts = fn(x, *args[1:], **options, **maps)
        (grad,) = torch.autograd.grad(loss, x)
        out.append((loss, parts, grad))
    return out


XTOK_GRID = list(itertools.product(["uld", "hybrid"], [1.0, 2.0], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]))


@pytest.mark.parametrize(("kind", "temperature", "beta", "alpha"), XTOK_GRID)
def test_xtok_loss_equals_the_previous_composition(kind, temperature, beta, alpha) -> None:
    for seed in range(3):
        args, maps = span_case(seed)
        (new, p_new, g_new), (old, p_old, g_old) = _both(
            args, maps, kind=kind, temperature=temperature, beta=beta, alpha=alpha
        )
        torch.testing.assert_close(new, old, **TIGHT)
        torch.testing.assert_close(g_new, g_old, **TIGHT)
        assert set(p_new) == set(p_old)
        for key in p_new:
            assert p_new[key] == pytest.approx(p_old[key], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("weights", [(0.3, None), (2.0, 0.25), (None, 0.7)])
def test_xtok_hybrid_fixed_weights_equal_the_previous_composition(chunk_rows, weights) -> None:
    args, maps = span_case(11)
    matched_weight, unmatched_weight = weights
    (new, _, g_new), (old, _, g_old) = _both(
        args, maps, kind="hybrid", alpha=0.6, temperature=1.5,
        matched_weight=matched_weight, unmatched_weight=unmatched_weight,
    )  # fmt: skip
    torch.testing.assert_close(new, old, **TIGHT)
    torch.testing.assert_close(g_new, g_old, **TIGHT)


@pytest.mark.parametrize("kind", ["ce", "uld", "hybrid"])
def test_xtok_loss_float32_and_chunks(chunk_rows, kind) -> None:
    args, maps = span_case(7, n=31, v=50)
    (new, _, g_new), (old, _, g_old) = _both(args, maps, torch.float32, kind=kind, alpha=0.5)
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["uld", "hybrid"])
def test_xtok_loss_edge_cases_equal_the_previous_composition(kind) -> None:
    # few unmapped ids (fewer than k), -inf student logits, one-token spans only
    args, maps = span_case(3, v=12, k=6)
    logits = args[0].clone()
    logits[:, -3:] = NEG_INF
    maps["student_mapped"] = torch.ones(12, dtype=torch.bool)
    maps["student_mapped"][:2] = False
    maps["vocab_map"] = torch.where(
        maps["student_mapped"][maps["vocab_map"].clamp_min(0)], maps["vocab_map"], -1
    )
    args = (logits, *args[1:])
    (new, _, g_new), (old, _, g_old) = _both(args, maps, kind=kind, alpha=0.5, temperature=2.0)
    torch.testing.assert_close(new, old, **TIGHT)
    torch.testing.assert_close(g_new, g_old, **TIGHT)
    assert torch.isfinite(g_new).all()


def test_xtok_loss_at_a_large_vocabulary() -> None:
    # several default-size chunks of 151,936 logits
    g = torch.Generator().manual_seed(0)
    n, v, s, k = 120, 151_936, 80, 16
    logits = torch.randn(n, v, generator=g) * 2
    span_index = torch.cat([torch.arange(s), torch.randint(0, s, (n - s,), generator=g)])
    span_start = torch.arange(n) < s
    lps, ids = torch.log_softmax(torch.randn(s, 500, generator=g), -1).topk(k, -1)
    vmap = torch.randperm(v, generator=g)[:500]
    vmap[::5] = -1
    smapped = torch.zeros(v, dtype=torch.bool)
    smapped[vmap[vmap >= 0]] = True
    chain = -torch.rand(s, generator=g)
    big = (
        logits,
        torch.randint(0, v, (n,), generator=g),
        span_start,
        span_index,
        s,
        ids,
        lps,
        chain,
    )
    (new, _, g_new), (old, _, g_old) = _both(
        big, {"vocab_map": vmap, "student_mapped": smapped}, torch.float32,
        kind="hybrid", alpha=0.5, beta=0.0,
    )  # fmt: skip
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_new, g_old, rtol=1e-4, atol=1e-8)


# --------------------------------------------------------------------------------------------
# same-tokenizer losses against the path as it was
# --------------------------------------------------------------------------------------------


def token_case(seed: int, n=13, v=30, k=5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    lps, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64), -1).topk(k)
    lps[2, 2:] = NEG_INF
    lps[5] = NEG_INF
    labels = torch.randint(0, v, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    return logits, labels, ids, lps, weights


@pytest.mark.parametrize(
    ("kind", "tail", "temperature", "alpha"),
    list(
        itertools.product(
            ["forward_kl", "reverse_kl", "jsd", "ce"], ["rest", "renorm"], [1.0, 2.0], [0, 0.5, 1]
        )
    ),
)
def test_distill_loss_equals_the_previous_path(kind, tail, temperature, alpha) -> None:
    logits, labels, ids, lps, weights = token_case(0)
    out = []
    for fn in (distill_loss, reference_distill_loss):
        x = logits.clone().requires_grad_(True)
        loss, parts = fn(
            x, labels, ids, lps, kind=kind, tail=tail, temperature=temperature, alpha=alpha,
            beta=0.3, weights=weights,
        )  # fmt: skip
        (grad,) = torch.autograd.grad(loss, x)
        out.append((loss, parts, grad))
    (new, p_new, g_new), (old, p_old, g_old) = out
    torch.testing.assert_close(new, old, **TIGHT)
    torch.testing.assert_close(g_new, g_old, **TIGHT)
    assert p_new == pytest.approx(p_old, rel=1e-10, abs=1e-12)


def test_distill_loss_float32_chunks(chunk_rows) -> None:
    logits, labels, ids, lps, _ = token_case(4, n=21, v=60)
    out = []
    for fn in (distill_loss, reference_distill_loss):
        x = logits.float().requires_grad_(True)
        loss, _ = fn(x, labels, ids, lps.float(), kind="forward_kl", alpha=0.5, temperature=1.3)
        out.append((loss, torch.autograd.grad(loss, x)[0]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-7)


def test_hard_ce_equals_cross_entropy(chunk_rows) -> None:
    logits, labels, _, _, weights = token_case(1)
    labels[[0, 4]] = -100
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    for w in (None, weights):
        a = hard_ce(x1, labels, w)
        per_row = F.cross_entropy(x2, labels, reduction="none")
        b = (per_row * w).sum() / w.sum() if w is not None else per_row.mean()
        torch.testing.assert_close(a, b, **TIGHT)
        torch.testing.assert_close(
            torch.autograd.grad(a, x1)[0], torch.autograd.grad(b, x2)[0], **TIGHT
        )
    with pytest.raises(ValueError, match="outside"):
        hard_ce(logits, torch.full_like(labels, 30))


def test_sampled_reverse_kl_equals_the_previous_formula() -> None:
    logits, labels, _, _, weights = token_case(2)
    g = torch.Generator().manual_seed(3)
    teacher = -torch.rand(len(labels), generator=g, dtype=torch.float64) * 3
    behavior = torch.where(torch.arange(len(labels)) % 3 == 0, torch.nan, teacher - 0.1)
    x1 = logits.clone().requires_grad_(True)
    new = sampled_reverse_kl(x1, labels, teacher, behavior_logprob=behavior, weights=weights)
    x2 = logits.clone().requires_grad_(True)
    lp = x2.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(x2, -1)
    lp_b = torch.where(torch.isfinite(behavior), behavior, lp.detach())
    old = (torch.exp(lp - lp_b) * (lp - teacher).detach() * weights).sum() / weights.sum()
    torch.testing.assert_close(new, old, **TIGHT)
    torch.testing.assert_close(
        torch.autograd.grad(new, x1)[0], torch.autograd.grad(old, x2)[0], **TIGHT
    )


# --------------------------------------------------------------------------------------------
# logits_at: the output layer on the trained positions only
# --------------------------------------------------------------------------------------------


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).double()


def test_logits_at_gives_the_trained_positions_logits() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[1, 5:] = 0
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) < 0.6
    mask[1, 5:] = False
    probe = torch.randn(int(mask.sum()), 50, dtype=torch.float64)

    full = model(input_ids=ids, attention_mask=attention).logits[mask]
    grads_full = torch.autograd.grad((full * probe).sum(), list(model.parameters()))
    with logits_at(model, mask) as at:
        out = model(input_ids=ids, attention_mask=attention)
    assert at.applied and out.logits.shape == (1, int(mask.sum()), 50)
    picked = at.select(out.logits)
    torch.testing.assert_close(picked, full, **TIGHT)
    grads = torch.autograd.grad((picked * probe).sum(), list(model.parameters()))
    for a, b in zip(grads, grads_full, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    # the hook is gone afterwards
    assert model(input_ids=ids, attention_mask=attention).logits.shape == (3, 7, 50)


def test_logits_at_falls_back_without_an_output_layer() -> None:
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * 2

    mask = torch.tensor([[True, False], [False, True]])
    with logits_at(Plain(), mask) as at:
        logits = Plain()(torch.arange(12.0).reshape(2, 2, 3))
    assert not at.applied
    torch.testing.assert_close(at.select(logits), logits[mask])

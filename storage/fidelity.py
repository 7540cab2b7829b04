"""How faithful a decoded top-k cache is to the exact one: KL, top-1 agreement, rest mass.

A stored top-k is a distribution over the whole vocabulary once its rest mass
``r = 1 - sum(p_topk)`` is spread evenly over the tokens it does not name (the usual way to
complete a sparse target). `kl_to_exact` compares two such completions, the exact cache
(``fp32``) against a decoded one, token by token over the full vocabulary, in closed form:

    KL(P || Q) = sum_{i in exact top-k} p_i log(p_i / q(i))
                 + r_p log( (r_p / (V - k_p)) / (r_q / (V - k_q)) )

where ``q(i)`` is the decoded probability of token i if the decoded entries name it, else its
share ``r_q / (V - k_q)`` of the decoded rest mass, and the second term covers the
``V - k_p`` tokens neither names. This needs the decoded entries to be a subset of the exact
ones (true of every codec here: they only drop, never add) and is finite exactly when the
decoded distribution leaves no exact entry without mass. Padding entries (``-inf``) count as
absent on both sides.

A decoded rest below ``REST_FLOOR`` counts as ``REST_FLOOR``: value codecs round the top-k
mass, and where the exact rest is tiny they can decode a top-k summing to 1 or more, which
would make the KL infinite over a tail that carries next to nothing. With the floor such
positions cost ``r_p log(r_p / REST_FLOOR)``-ish: small when the exact tail is small, large
when a codec really loses tail mass. Everything is vectorised over positions, in chunks.
"""

from __future__ import annotations

import numpy as np

REST_FLOOR = 1e-7  # about float32's resolution of a rest mass computed as 1 - sum(p)
_CHUNK = 2048  # positions per [chunk, k, k] comparison block (~70 MB of float64)


def _rest(p: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)


def kl_to_exact(
    exact_ids: np.ndarray,
    exact_logprobs: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    vocab_size: int,
) -> np.ndarray:
    """Per-position KL(exact || decoded) in nats over the full vocabulary (float64 [T])."""
    out = np.empty(len(exact_ids), dtype=np.float64)
    for lo in range(0, len(exact_ids), _CHUNK):
        hi = lo + _CHUNK
        out[lo:hi] = _kl_chunk(
            exact_ids[lo:hi], exact_logprobs[lo:hi], ids[lo:hi], logprobs[lo:hi], vocab_size
        )
    return out


def _match(e_ids, p: np.ndarray, d_ids, q: np.ndarray) -> np.ndarray:
    """match[t, j, i]: decoded entry j names exact entry i (real entries only)."""
    return (d_ids[:, :, None] == e_ids[:, None, :]) & (q > 0)[:, :, None] & (p > 0)[:, None, :]


def mass_on_exact(
    exact_ids: np.ndarray, exact_logprobs: np.ndarray, ids: np.ndarray, logprobs: np.ndarray
) -> np.ndarray:
    """The decoded probability of each exact entry (0 where the decoded entries do not name
    it), float64 [T, k]: decoded entries laid out on the exact ones, e.g. to average them."""
    out = np.empty(exact_ids.shape, dtype=np.float64)
    for lo in range(0, len(exact_ids), _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        p = np.exp(exact_logprobs[sl].astype(np.float64))
        q = np.exp(logprobs[sl].astype(np.float64))
        out[sl] = np.einsum("tj,tji->ti", q, _match(exact_ids[sl], p, ids[sl], q))
    return out


def _kl_chunk(e_ids, e_lp, d_ids, d_lp, vocab_size: int) -> np.ndarray:
    p = np.exp(e_lp.astype(np.float64))
    q = np.exp(d_lp.astype(np.float64))
    p_real, q_real = p > 0, q > 0
    match = _match(e_ids, p, d_ids, q)
    unmatched = q_real & ~match.any(axis=2)
    if unmatched.any():
        t, j = np.argwhere(unmatched)[0]
        raise ValueError(
            f"decoded position {t} names token {d_ids[t, j]}, which the exact top-k lacks"
        )
    k_p, k_q = p_real.sum(axis=1), q_real.sum(axis=1)
    r_p, r_q = _rest(p), np.maximum(_rest(q), REST_FLOOR)
    share = r_q / np.maximum(vocab_size - k_q, 1)  # each unnamed token's decoded probability
    named = match.any(axis=1)
    q_on_exact = np.where(named, np.einsum("tj,tji->ti", q, match), share[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_real, p * (np.log(p) - np.log(q_on_exact)), 0.0)
        tail = np.where(
            r_p > 0,
            r_p * (np.log(r_p / np.maximum(vocab_size - k_p, 1)) - np.log(share)),
            0.0,
        )
    return terms.sum(axis=1) + tail


def top1_agreement(exact_ids: np.ndarray, ids: np.ndarray) -> float:
    """Share of positions whose most probable decoded token is the exact top-1 (column 0:
    both sides are ordered by decreasing logprob)."""
    return float(np.mean(exact_ids[:, 0] == ids[:, 0]))


def rest_mass_error(exact_logprobs: np.ndarray, logprobs: np.ndarray) -> float:
    """Mean |rest mass decoded - rest mass exact| per position (the tail a "rest" loss sees)."""
    p = np.exp(exact_logprobs.astype(np.float64))
    q = np.exp(logprobs.astype(np.float64))
    return float(np.mean(np.abs(_rest(q) - _rest(p))))

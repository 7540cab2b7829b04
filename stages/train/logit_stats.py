"""The few numbers per position that the training losses read from vocabulary-wide logits.

Every loss of this stage compares the student with a sparse teacher: at each trained position
it needs only a handful of numbers out of the student's V logits,

* ``lse`` -- ``logsumexp(z)``, the log-normaliser at T = 1 (hard CE, span chains, on-policy);
* ``label_logit`` -- the logit of the label, ``z[label]``;
* at the rows that carry a teacher target, at the distillation temperature T:
  ``lse_t = logsumexp(z / T)``, ``picked`` -- the raw logits of the teacher's top-k ids (or of
  their images under a vocabulary map), ``lse_rest`` -- ``logsumexp(z / T)`` over the ids
  OUTSIDE those (the "rest" bucket, without cancellation), and for ULD ``top`` -- the k largest
  logits, optionally among an allowed subset of the vocabulary only.

``log_softmax(z / T)[i]`` is then ``z[i] / T - lse_t``, so every loss is a small computation on
these [N] and [N, k] tensors. Written with plain autograd ops, the same losses allocate
several [N, V] float32 tensors per step (the log-softmax, masks, masked copies, exp buffers of
each ``logsumexp`` backward, the zero-filled [N, V] gradients of ``gather``, ``index`` and
``topk``, summed one into the other): at a 151k vocabulary each is 0.6 GB for 1,000 positions,
and most of the step went to writing and page-faulting those buffers.

:func:`logit_stats` computes all of them in one pass over the logits, ``_CHUNK_BYTES`` of rows at
a time into buffers allocated once per call (nothing vocabulary-sized is mapped fresh per
op), and its backward writes the gradient of the logits once, chunk by chunk, into a single
[N, V] buffer:

    d/dz = g_lse softmax(z) + g_lse_t softmax(z / T) / T + g_rest softmax_rest(z / T) / T
           + scatter(label, g_label) + scatter(ids, g_picked) + scatter(top ids, g_top)

with ``softmax_rest`` the softmax over the rest entries only (0 on the excluded ids). A row
whose normaliser is ``-inf`` (every entry ``-inf``: an empty rest bucket) gets no gradient from
that term, so empty buckets never produce NaN. Everything is vectorised: the only Python loop
is over chunks of rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["LogitStats", "logit_stats"]

_NEG_INF = float("-inf")
# Rows per chunk: as many as fit in this many bytes (at least one). The loop's temporaries are
# two buffers of this size, allocated once per call; fewer, larger chunks mean fewer parallel
# regions per op, which is what costs most when the cores are shared with other jobs (on a
# shared 2-core machine, 1,039 x 151,936 logits: the backward took 2.0 s at 8 MB and 1.1 s at
# 32 MB with 2 threads, while 1 thread ran 0.5-0.7 s at any size from 8 to 64 MB).
_CHUNK_BYTES = 32 << 20


class LogitStats(NamedTuple):
    """Per-row statistics of logits z [N, V]; see :func:`logit_stats`."""

    lse: Tensor  # [N] logsumexp(z)
    label_logit: Tensor  # [N] z[label] (0 where the label is -100 or not given)
    lse_t: Tensor  # [R] logsumexp(z[rows] / T)
    picked: Tensor  # [R, m] z[rows, ids] (raw, untempered; meaningless where ids_mask is False)
    lse_rest: Tensor  # [R] logsumexp(z[rows] / T) outside ids[ids_mask]; -inf if empty
    top: Tensor  # [R, top_k] the largest z[rows] among allowed ids, descending; -inf past them
    top_ids: Tensor  # [R, top_k] their ids (no gradient)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _finite_or_zero(x: Tensor) -> Tensor:
    """A shift safe to subtract: ``-inf`` (an all ``-inf`` row) becomes 0, so that row's
    ``exp(z - shift)`` is 0, not NaN."""
    return torch.where(torch.isneginf(x), 0.0, x)


def _log(x: Tensor) -> Tensor:
    """log of a non-negative sum; log 0 = -inf without a warning path."""
    return torch.where(x > 0, torch.log(torch.where(x > 0, x, 1.0)), _NEG_INF)


class _Chunks:
    """Row chunks of ``_CHUNK_BYTES``, and where the selected rows (``rows``) fall in them.

    ``sel[n]`` is the position r of row n in ``rows`` (-1: not selected); ``selected(i)``
    gives the local rows of chunk i that are selected and their r, from one host sync.
    """

    def __init__(self, n: int, v: int, rows: Tensor | None, device: torch.device):
        chunk = max(1, _CHUNK_BYTES // max(4 * (v + 1), 1))
        self.bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
        self.all_rows = rows is None
        if rows is None:
            return
        self.rows = rows
        self.sel = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.sel[rows] = torch.arange(rows.shape[0], device=device)
        local = torch.nonzero(self.sel >= 0).squeeze(-1)  # selected rows, ascending
        self.local, self.r = local, self.sel[local]
        edges = torch.tensor([a for a, _ in self.bounds] + [n], device=device)
        self.cuts = torch.searchsorted(local, edges).tolist()

    def selected(self, i: int, a: int, b: int) -> tuple[Tensor | slice, Tensor | slice]:
        """(local row indices within chunk i, their positions r in ``rows``)."""
        if self.all_rows:
            return slice(None), slice(a, b)
        lo, hi = self.cuts[i], self.cuts[i + 1]
        return self.local[lo:hi] - a, self.r[lo:hi]

    def spread(self, x: Tensor, n: int, fill: float) -> Tensor:
        """Per-selected-row values [R, ...] laid out per row [N, ...] (``fill`` elsewhere)."""
        if self.all_rows:
            return x
        out = x.new_full((n, *x.shape[1:]), fill)
        out[self.local] = x[self.r]
        return out


def _exact_rest(zt: Tensor, ids: Tensor, ids_mask: Tensor) -> Tensor:
    """``zt`` [s, V] with the real ids of each row set to ``-inf`` (padding marks nothing)."""
    s, v = zt.shape
    buf = zt.new_empty(s, v + 1)
    buf[:, :v] = zt
    buf.scatter_(1, torch.where(ids_mask, ids, v), _NEG_INF)  # padding lands in column V
    return buf[:, :v]


class _LogitStats(torch.autograd.Function):
    """Forward: per chunk, ``e = exp((z - max) / T)`` once into a reused buffer; its row sum
    is the normaliser, and the same sum after zeroing the excluded ids is the rest bucket's
    (no subtraction, so nothing cancels). Where that rest sum is too small to be resolved
    from ``e`` (below ``sqrt(tiny)``: entries may have underflowed), the row's rest is
    recomputed with its own shift.

    Backward: the gradient of each row is ``e * coef`` plus a correction at the excluded ids
    (where the rest term is absent) and scatters at the gathered ids: a few passes per chunk,
    written straight into the gradient buffer.
    """

    @staticmethod
    def forward(ctx, z, labels, rows, ids, ids_mask, t, rest, top_k, top_allowed):
        n, v = z.shape
        dtype = _compute_dtype(z)
        chunks = _Chunks(n, v, rows, z.device)
        r_count = n if rows is None else rows.shape[0]
        has_labels = labels is not None
        label_ok = labels != -100 if has_labels else None
        label_ids = torch.where(label_ok, labels, 0).unsqueeze(-1) if has_labels else None
        # ids and their mask per row of z (no ids on rows that are not selected)
        ids_n = chunks.spread(ids, n, 0)
        mask_n = chunks.spread(ids_mask, n, False)
        safe_ids = torch.where(mask_n, ids_n, 0)
        excl_ids = torch.where(mask_n, ids_n, v)  # padding -> the spare column V
        kk = min(top_k, v)
        penalty = None
        if kk and top_allowed is not None:
            penalty = torch.zeros(v, dtype=dtype, device=z.device).masked_fill_(
                ~top_allowed, _NEG_INF
            )

        shift = z.new_empty(n, dtype=dtype)  # row max of z
        lse = z.new_empty(n, dtype=dtype)
        label_logit = z.new_zeros(n, dtype=dtype)
        lse_t = z.new_empty(n, dtype=dtype)
        rest_sum = z.new_empty(n if rest else 0, dtype=dtype)
        picked = z.new_empty(ids_n.shape, dtype=dtype)
        top = z.new_full((r_count, top_k), _NEG_INF, dtype=dtype)
        top_ids = torch.zeros(r_count, top_k, dtype=torch.int64, device=z.device)
        rows_chunk = chunks.bounds[0][1] - chunks.bounds[0][0] if chunks.bounds else 0
        buf = z.new_empty(rows_chunk, v + 1, dtype=dtype)
        tmp = z.new_empty(rows_chunk, v, dtype=dtype) if kk or t != 1.0 else None
        for i, (a, b) in enumerate(chunks.bounds):
            zc = z[a:b].to(dtype)
            e = buf[: b - a]
            m = _finite_or_zero(zc.amax(dim=-1))
            shift[a:b] = m
            torch.sub(zc, m.unsqueeze(-1), out=e[:, :v])
            if t != 1.0:
                lse[a:b] = m + _log(torch.exp(e[:, :v], out=tmp[: b - a]).sum(dim=-1))
                e[:, :v].div_(t)
            e[:, :v].exp_()
            total = e[:, :v].sum(dim=-1)
            if t == 1.0:
                lse[a:b] = m + _log(total)
            lse_t[a:b] = m / t + _log(total)
            if rest:
                e.scatter_(1, excl_ids[a:b], 0.0)
                rest_sum[a:b] = e[:, :v].sum(dim=-1)
            if has_labels:
                label_logit[a:b] = zc.gather(1, label_ids[a:b]).squeeze(1)
            picked[a:b] = zc.gather(1, safe_ids[a:b])
            if kk:
                loc, r = chunks.selected(i, a, b)
                if chunks.all_rows:
                    cand = zc if penalty is None else torch.add(zc, penalty, out=tmp[: b - a])
                else:  # the selected rows, copied into a reused buffer
                    cand = torch.index_select(zc, 0, loc, out=tmp[: loc.shape[0]])
                    if penalty is not None:
                        cand.add_(penalty)
                if cand.shape[0]:
                    values, index = cand.topk(kk, dim=-1)
                    top[r, :kk] = values
                    top_ids[r, :kk] = index
        lse_rest = z.new_full((n if rest else 0,), _NEG_INF, dtype=dtype)
        exact = torch.zeros(0, dtype=torch.int64, device=z.device)
        if rest:
            tiny = torch.finfo(dtype).tiny ** 0.5
            lse_rest = shift / t + _log(rest_sum)
            exact = torch.nonzero(rest_sum < tiny).squeeze(-1)
            if rows is not None:
                exact = exact[chunks.sel[exact] >= 0]
            if exact.numel():
                zt = z[exact].to(dtype)
                zt = zt / t if t != 1.0 else zt
                lse_rest[exact] = torch.logsumexp(
                    _exact_rest(zt, ids_n[exact], mask_n[exact]), dim=-1
                )
        if has_labels:
            label_logit = torch.where(label_ok, label_logit, 0.0)
        # Where the top entry is a disallowed id or past the vocabulary it is -inf: no gradient.
        top_real = top > _NEG_INF
        if rows is not None:
            lse_t, picked = lse_t[rows], picked[rows]
            lse_rest = lse_rest[rows] if rest else lse_rest
        ctx.save_for_backward(
            z, shift, lse, lse_t, lse_rest, label_ids, label_ok, ids_n, mask_n, top_ids
        )
        ctx.extra = (exact, top_real, chunks, t, rest)
        ctx.mark_non_differentiable(top_ids)
        ctx.set_materialize_grads(False)
        return lse, label_logit, lse_t, picked, lse_rest, top, top_ids

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lse, g_label, g_lse_t, g_picked, g_rest, g_top, _g_top_ids):
        (z, shift, lse, lse_t, lse_rest, label_ids, label_ok, ids_n, mask_n, top_ids) = (
            ctx.saved_tensors
        )
        exact, top_real, chunks, t, rest = ctx.extra
        n, v = z.shape
        dtype = _compute_dtype(z)
        zero = z.new_zeros(n, dtype=dtype)
        # Row coefficients of e1 = exp(z - shift) and eT = exp((z - shift) / T):
        #   d lse / dz = e1 / sum(e1),  d lse_t / dz = eT / sum(eT) / T,
        #   d lse_rest / dz = eT [not excluded] / sum(eT [not excluded]) / T.
        a1 = zero if g_lse is None else g_lse * torch.exp(shift - _finite_or_zero(lse))
        # the tempered factors on the selected rows only (elsewhere they are 0)
        shift_r = shift if chunks.all_rows else shift[chunks.rows]
        at = bt = zero
        if g_lse_t is not None:
            factor = torch.exp(shift_r / t - _finite_or_zero(lse_t))
            at = chunks.spread(
                torch.where(torch.isneginf(lse_t), 0.0, g_lse_t / t * factor), n, 0.0
            )
        if g_rest is not None:
            exact_n = torch.zeros(n, dtype=torch.bool, device=z.device)
            exact_n[exact] = True
            exact_r = exact_n if chunks.all_rows else exact_n[chunks.rows]
            resolved = ~torch.isneginf(lse_rest) & ~exact_r  # exact rows: added below
            factor = torch.exp(shift_r / t - torch.where(resolved, lse_rest, 0.0))
            bt = chunks.spread(torch.where(resolved, g_rest / t * factor, 0.0), n, 0.0)
            gr = chunks.spread(g_rest, n, 0.0)
            rest_n = chunks.spread(lse_rest, n, _NEG_INF)
        excluding = rest and g_rest is not None and ids_n.shape[1] > 0
        if t == 1.0:
            c_ex = a1 + at  # the e1 coefficient at the excluded ids
            c_all = c_ex + bt  # and everywhere else
        else:
            c_ex = c_all = a1
        g_label_n = None if g_label is None else torch.where(label_ok, g_label, 0.0)
        g_picked_n = None
        if g_picked is not None and g_picked.shape[1]:
            g_picked_n = torch.where(mask_n, chunks.spread(g_picked, n, 0.0), 0.0)
        g_top_n = top_ids_n = None
        if g_top is not None and g_top.shape[1]:
            g_top_n = chunks.spread(torch.where(top_real, g_top, 0.0), n, 0.0)
            top_ids_n = chunks.spread(top_ids, n, 0)
        safe_ids = torch.where(mask_n, ids_n, 0)
        spare_ids = torch.where(mask_n, ids_n, v)  # padding -> the spare column V
        # An overwrite at the excluded ids must leave padding entries harmless: they repeat
        # the row's first real entry (same id, same value), or rewrite column 0 with its own
        # value where the row has none.
        if excluding:
            first_col = mask_n.int().argmax(dim=-1, keepdim=True)
            has_real = mask_n.gather(1, first_col)

        grad = torch.empty_like(z)
        direct = z.dtype == dtype  # compute straight into the gradient buffer
        tempered = t != 1.0 and (g_lse_t is not None or g_rest is not None)
        rows_chunk = chunks.bounds[0][1] - chunks.bounds[0][0] if chunks.bounds else 0
        buf = z.new_empty(rows_chunk, v + 1, dtype=dtype) if tempered else None
        for a, b in chunks.bounds:
            zc = z[a:b].to(dtype)
            gc = grad[a:b] if direct else zc.new_empty(zc.shape)
            m = shift[a:b].unsqueeze(-1)
            torch.sub(zc, m, out=gc)
            gc.exp_()
            if t == 1.0 and excluding:
                e_ex = gc.gather(1, safe_ids[a:b])  # e1 at the excluded ids, before scaling
                gc.mul_(c_all[a:b].unsqueeze(-1))
                fix = e_ex * c_ex[a:b].unsqueeze(-1)
                mask, col = mask_n[a:b], first_col[a:b]
                keep = torch.where(has_real[a:b], fix.gather(1, col), gc[:, :1])
                gc.scatter_(
                    1,
                    torch.where(mask, safe_ids[a:b], safe_ids[a:b].gather(1, col)),
                    torch.where(mask, fix, keep),
                )
            else:
                gc.mul_(c_all[a:b].unsqueeze(-1))
            if buf is not None:
                e = buf[: b - a]
                torch.sub(zc, m, out=e[:, :v])
                e[:, :v].div_(t)
                e[:, :v].exp_()
                if excluding:
                    e_ex = e.gather(1, spare_ids[a:b])
                    e.mul_((at[a:b] + bt[a:b]).unsqueeze(-1))
                    e.scatter_(1, spare_ids[a:b], e_ex * at[a:b].unsqueeze(-1))
                else:
                    e.mul_(at[a:b].unsqueeze(-1))
                gc.add_(e[:, :v])
            if g_label_n is not None:
                gc.scatter_add_(1, label_ids[a:b], g_label_n[a:b].unsqueeze(-1))
            if g_picked_n is not None:
                gc.scatter_add_(1, safe_ids[a:b], g_picked_n[a:b])
            if g_top_n is not None:
                gc.scatter_add_(1, top_ids_n[a:b], g_top_n[a:b])
            if not direct:
                grad[a:b] = gc
        if excluding and exact.numel():
            # rows whose rest could not be resolved from eT: their exact softmax over the rest
            zt = z[exact].to(dtype)
            zt = zt / t if t != 1.0 else zt
            masked = _exact_rest(zt, ids_n[exact], mask_n[exact])
            lr = rest_n[exact].unsqueeze(-1)
            empty = torch.isneginf(lr)
            term = torch.exp(masked - torch.where(empty, 0.0, lr))
            term = torch.where(empty, 0.0, term) * (gr[exact] / t).unsqueeze(-1)
            grad.index_add_(0, exact, term.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None


def logit_stats(
    z: Tensor,
    labels: Tensor | None = None,
    *,
    rows: Tensor | None = None,
    ids: Tensor | None = None,
    ids_mask: Tensor | None = None,
    temperature: float = 1.0,
    rest: bool = False,
    top_k: int = 0,
    top_allowed: Tensor | None = None,
) -> LogitStats:
    """Per-row statistics of the logits ``z`` [N, V], differentiable w.r.t. ``z``.

    * ``labels`` int64 [N] (optional): ``label_logit = z[label]``; -100 (torch's ignore_index)
      gives 0 and no gradient. Other ids must lie in ``[0, V)``.
    * ``rows`` int64 [R] (optional, distinct positions in ``[0, N)``; default all rows in
      order): where the tempered statistics are computed, returned in the order of ``rows``.
    * ``ids`` int64 [R, m] with ``ids_mask`` bool [R, m] (default: no ids): ``picked`` =
      ``z[rows, ids]``; with ``rest``, ``lse_rest`` = ``logsumexp(z / T)`` over the entries of
      each selected row that are not a masked-in id (padding excludes nothing; ``-inf`` when
      nothing is left). Real ids must be distinct within a row.
    * ``top_k``: ``top`` / ``top_ids`` = the ``top_k`` largest logits of each selected row
      among ``top_allowed`` (bool [V], default all), descending; ``-inf`` (and no gradient)
      past the last allowed id or past V.

    Statistics are computed in float32 (float64 kept); the gradient comes back in ``z``'s
    dtype. Only first derivatives are supported.
    """
    if z.dim() != 2:
        raise ValueError(f"logits must be [N, V], got {tuple(z.shape)}")
    n, v = z.shape
    r_count = n if rows is None else rows.shape[0]
    if ids is None:
        ids = torch.zeros(r_count, 0, dtype=torch.int64, device=z.device)
    if ids_mask is None:
        ids_mask = torch.ones_like(ids, dtype=torch.bool)
    if ids.shape[0] != r_count or ids_mask.shape != ids.shape:
        raise ValueError(
            f"ids and ids_mask must be [R, m] with R = {r_count} selected rows, got "
            f"{tuple(ids.shape)} and {tuple(ids_mask.shape)}"
        )
    if top_allowed is not None and top_allowed.shape != (v,):
        raise ValueError(f"top_allowed must be bool [{v}], got {tuple(top_allowed.shape)}")
    out = _LogitStats.apply(
        z, labels, rows, ids, ids_mask, float(temperature), bool(rest), int(top_k), top_allowed
    )
    return LogitStats(*out)

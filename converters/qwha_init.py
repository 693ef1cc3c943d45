"""Quantization-aware initialisation of a QWHA spectrum (AdaAlloc + value refinement), all in float64.

Given a full-precision weight ``W``, its dequantized quantization ``W_q`` and the calibration Gram ``G = X^T X``
(damped by ``damp_ratio * mean(diag G)``), the adapter ``Delta W = c * F @ M`` (``c = s / (d_in sqrt(d_out))``) is
fitted to cancel the error ``E = W - W_q`` in the layer's output, i.e. to minimise ``||(E - Delta W) R||_F`` with
``R = sqrt(G)``:

1. **Budget** (AdaAlloc): ``p = rank * (d_in + d_out)`` entries (capped at ``d_out * d_in``), split over output
   channels ``p_i ∝ ||(E R)_i||^t``; floor, cap at ``d_in``, leftovers go one by one to the channels with the
   smallest budgets, at least one per channel. ``||(E R)_i||^2 = e_i G e_i^T``, so no square root is formed.
2. **Selection**: per channel, the ``p_i`` Walsh coefficients of largest activation-weighted magnitude
   ``|C_ij| * ||M_j R||``, where ``C = wht(E) / (d_in c)`` is the error's full spectrum and ``||M_j R||^2`` the
   diagonal of ``G_hat = M G M^T``.
3. **Refinement**: per channel, least squares on the selected basis rows ``M_S``:
   ``c * f (G_hat[S, S] + ridge) = (E G M^T)[i, S]``. Channels with equal budgets are solved together as one batched
   Cholesky solve (chunked to bound memory); no Python loop over channels.

Memory: everything is streamed over blocks of output channels (``InitConfig.block_bytes`` of float64 rows) and
done in the transformed basis (``Ê = E M^T``; ``M^T M = n I``), so besides its inputs a layer holds ``G_hat`` and
``E G M^T`` in float64 plus a few blocks: ~2.3 GB for a 4096 x 14336 layer, not the ~10 GB of forming ``G``,
``E G``, ``G_hat``, the full spectrum and its sort order at once.

Baselines: ``method="random"`` (uniform budgets, random indices, then the same refinement) and ``method="zeros"``
(plain WHA: random indices, zero values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels import DEFAULT_SCALE, dense_delta, hadamard_transform
from .calibration import InputRows

__all__ = [
    "InitConfig",
    "LayerInit",
    "Support",
    "TransformedGram",
    "allocate_budget",
    "init_layer",
    "output_error",
    "refine_values",
    "refine_values_loop",
    "report_errors",
    "row_blocks",
    "select_support",
    "spectral_delta_rows",
    "gram_damping",
    "transformed_gram",
]

_METHODS = ("adaalloc", "random", "zeros")


@dataclass(frozen=True)
class InitConfig:
    """Settings of the QWHA initialisation (see the module docstring)."""

    rank: int = 64
    method: str = "adaalloc"
    temperature: float = 1.0
    damp_ratio: float = 1e-4
    ridge: float = 1e-8
    scale: float = DEFAULT_SCALE
    seed: int = 0
    max_solve_bytes: int = 128 * 2**20
    block_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if self.method not in _METHODS:
            raise ValueError(f"init method must be one of {_METHODS}, got {self.method!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.damp_ratio < 0 or self.ridge < 0:
            raise ValueError(f"damp_ratio and ridge must be >= 0, got {self.damp_ratio!r}, {self.ridge!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        for name in ("max_solve_bytes", "block_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of bytes, got {getattr(self, name)!r}")

    def budget(self, d_out: int, d_in: int) -> int:
        return min(self.rank * (d_in + d_out), d_out * d_in)


@dataclass
class LayerInit:
    """An initialised spectrum (COO, sorted by row then column) and its error report."""

    values: torch.Tensor  # (nnz,) float32
    rows: torch.Tensor  # (nnz,) int64
    cols: torch.Tensor  # (nnz,) int64
    scale: float
    budgets: torch.Tensor  # (d_out,) int64
    report: dict[str, float] = field(default_factory=dict)


def output_error(err: torch.Tensor, gram: torch.Tensor) -> float:
    """``||err X^T||_F = sqrt(trace(err G err^T))`` in float64."""
    e = err.to(torch.float64)
    return math.sqrt(max(float(((e @ gram.to(torch.float64)) * e).sum()), 0.0))


def allocate_budget(norms: torch.Tensor, total: int, d_in: int, temperature: float = 1.0) -> torch.Tensor:
    """AdaAlloc: per-channel budgets ``p_i ∝ norms_i^t`` summing to ``min(total, d_out * d_in)``.

    Floor, cap at ``d_in``, at least 1 per channel; leftovers go one at a time to the channels with the smallest
    budgets (that are below the cap); an excess (from the minimum of 1) is taken from the largest.
    """
    d_out = norms.numel()
    total = min(int(total), d_out * d_in)
    if total < d_out:
        raise ValueError(f"budget {total} is smaller than the number of output channels {d_out}")
    w = norms.to(torch.float64).clamp_min(0) ** temperature
    w = torch.ones_like(w) if float(w.sum()) <= 0 or not torch.isfinite(w).all() else w
    p = torch.floor(total * w / w.sum()).long().clamp(1, d_in)
    left = total - int(p.sum())
    while left != 0:
        if left > 0:
            room = p < d_in
            cand = torch.nonzero(room).flatten()
            order = cand[torch.argsort(p[cand], stable=True)]
            take = order[:left]
            p[take] += 1
        else:
            cand = torch.nonzero(p > 1).flatten()
            order = cand[torch.argsort(p[cand], descending=True, stable=True)]
            take = order[:-left]
            p[take] -= 1
        left = total - int(p.sum())
    return p


def row_blocks(n_rows: int, row_bytes: int, block_bytes: int) -> list[slice]:
    """Consecutive row slices of at most ``block_bytes // row_bytes`` rows (at least one) covering ``n_rows``."""
    step = max(1, block_bytes // max(1, row_bytes))
    return [slice(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]


def transformed_gram(
    gram: torch.Tensor, damp_ratio: float, block_bytes: int = 64 * 2**20, inplace: bool = False
) -> torch.Tensor:
    """``G_hat = M G_d M^T`` in one float64 buffer, ``G_d = (G + G^T) / 2 + damp I`` the damped Gram.

    ``damp = damp_ratio * mean(diag G)`` (``damp_ratio`` when that mean is not positive). Rows of ``gram`` are
    transformed block by block into the buffer (``G M^T``), then its columns in place (``M G M^T``: the transform
    along dim 0 acts on every column alone), then it is symmetrised in place; the damping lands on the diagonal as
    ``n * damp`` (``M M^T = n I``). Peak memory: the ``n x n`` float64 result plus ``O(block_bytes)``; ``gram`` is
    read, never copied whole. ``inplace=True`` (a float64 ``gram`` the caller gives up) writes the result into
    ``gram`` itself: no second ``n x n`` buffer.
    """
    n = gram.shape[0]
    damp = gram_damping(gram, damp_ratio)
    if inplace and (gram.dtype != torch.float64 or not gram.is_contiguous()):
        raise ValueError(f"an in-place transformed Gram needs a contiguous float64 Gram, got {gram.dtype}")
    out = gram if inplace else torch.empty(n, n, dtype=torch.float64, device=gram.device)
    blocks = row_blocks(n, 8 * n, block_bytes)
    for rows in blocks:
        out[rows] = hadamard_transform(gram[rows].to(torch.float64))
    for cols in blocks:
        out[:, cols] = hadamard_transform(out[:, cols].T.contiguous()).T
    for i, bi in enumerate(blocks):
        for bj in blocks[i:]:
            mean_block = 0.5 * (out[bi, bj] + out[bj, bi].T)
            out[bi, bj] = mean_block
            out[bj, bi] = mean_block.T
    out.diagonal().add_(n * damp)
    return out


def gram_damping(gram: torch.Tensor, damp_ratio: float) -> float:
    """``damp = damp_ratio * mean(diag G)`` (``damp_ratio`` when that mean is not positive)."""
    mean = float(gram.diagonal().to(torch.float64).mean())
    return damp_ratio * mean if mean > 0 else damp_ratio


@dataclass
class TransformedGram:
    """A calibration Gram already in the transformed basis: ``g_hat = M G_d M^T`` (:func:`transformed_gram`) and the
    ``damp`` it carries. Layers fed the same input (q/k/v, gate/up) share one, built once and in place of the Gram
    (:meth:`of`), so a layer's init holds no second ``d_in x d_in`` buffer. As a Gram for :func:`report_errors`:
    ``a G a^T = (â G_hat â^T) / n^2 - damp ||a||^2`` with ``â = a M^T``."""

    g_hat: torch.Tensor
    damp: float

    @classmethod
    def of(cls, gram: torch.Tensor, config: InitConfig, inplace: bool = False) -> TransformedGram:
        damp = gram_damping(gram, config.damp_ratio)
        return cls(transformed_gram(gram, config.damp_ratio, config.block_bytes, inplace=inplace), damp)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.g_hat.shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TransformedGram:
        return TransformedGram(self.g_hat.to(device=device, dtype=dtype), self.damp)

    def quadratic(self, stack: torch.Tensor) -> torch.Tensor:
        """``(a G a^T)`` summed over the rows of each ``stack[k]`` (``stack``: ``(k, rows, n)`` float64)."""
        n = self.g_hat.shape[0]
        out = torch.empty(stack.shape[0], dtype=torch.float64, device=stack.device)
        for k, a in enumerate(stack):  # one (rows, n) block at a time
            spec = hadamard_transform(a)
            out[k] = ((spec @ self.g_hat) * spec).sum() / (n * n) - self.damp * (a * a).sum()
        return out


def _select_topk(importance: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``budgets[i]`` columns of largest importance. Returns (rows, cols), sorted by row then col."""
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    keep = torch.arange(importance.shape[1], device=importance.device)[None, :] < budgets[:, None]
    rows = torch.arange(importance.shape[0], device=importance.device)[:, None].expand_as(order)[keep]
    cols = order[keep]
    key = torch.argsort(rows * importance.shape[1] + cols)
    return rows[key], cols[key]


def refine_values(
    rows: torch.Tensor,
    cols: torch.Tensor,
    e_hat: torch.Tensor,
    g_hat: torch.Tensor,
    coefficient: float,
    ridge: float = 1e-8,
    max_solve_bytes: int = 128 * 2**20,
) -> torch.Tensor:
    """Least-squares values for a fixed support, batched over channels with equal budgets.

    For channel ``i`` with support ``S``: ``coefficient * f (G_hat[S, S] + ridge * mean(diag G_hat) I) = e_hat[i, S]``
    where ``e_hat = E G M^T`` and ``G_hat = M G M^T``. ``rows``/``cols`` must be sorted by row. Returns float64
    values aligned with ``rows``/``cols``.
    """
    d_out = e_hat.shape[0]
    counts = torch.bincount(rows, minlength=d_out)
    starts = torch.zeros(d_out + 1, dtype=torch.long, device=rows.device)
    starts[1:] = torch.cumsum(counts, 0)
    values = torch.zeros(rows.numel(), dtype=torch.float64, device=e_hat.device)
    reg = ridge * float(g_hat.diagonal().mean())
    for p in torch.unique(counts).tolist():
        if p == 0:
            continue
        channels = torch.nonzero(counts == p).flatten()
        chunk = max(1, max_solve_bytes // (8 * p * p))
        eye = torch.eye(p, dtype=torch.float64, device=e_hat.device) * reg
        for c0 in range(0, channels.numel(), chunk):
            ch = channels[c0 : c0 + chunk]
            pos = starts[ch][:, None] + torch.arange(p, device=rows.device)[None, :]  # (m, p) entry positions
            s = cols[pos]
            a = g_hat[s[:, :, None], s[:, None, :]] + eye
            b = e_hat[ch[:, None], s]
            chol, info = torch.linalg.cholesky_ex(a)
            if bool((info != 0).any()):
                sol = torch.linalg.lstsq(a, b.unsqueeze(-1)).solution.squeeze(-1)
            else:
                sol = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
            values[pos.flatten()] = (sol / coefficient).flatten()
    return values


def refine_values_loop(
    rows: torch.Tensor,
    cols: torch.Tensor,
    e_hat: torch.Tensor,
    g_hat: torch.Tensor,
    coefficient: float,
    ridge: float = 1e-8,
) -> torch.Tensor:
    """The per-channel Python-loop formulation (as in the published code); for benchmarks and tests only."""
    values = torch.zeros(rows.numel(), dtype=torch.float64, device=e_hat.device)
    reg = ridge * float(g_hat.diagonal().mean())
    for i in range(e_hat.shape[0]):
        pos = torch.nonzero(rows == i).flatten()
        if pos.numel() == 0:
            continue
        s = cols[pos]
        a = g_hat[s][:, s] + reg * torch.eye(s.numel(), dtype=torch.float64, device=e_hat.device)
        values[pos] = torch.linalg.solve(a, e_hat[i, s]) / coefficient
    return values


def _random_support(
    d_out: int, d_in: int, budgets: torch.Tensor, seed: int, blocks: list[slice]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, ``budgets[i]`` columns at random: the top-k of ``torch.rand(d_out, d_in)`` (seeded), drawn one
    row block at a time (the same stream as one whole draw)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for rows in blocks:
        scores = torch.rand(rows.stop - rows.start, d_in, generator=gen, dtype=torch.float64)
        r, c = _select_topk(scores, budgets[rows])
        parts.append((r + rows.start, c))
    return torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts])


@dataclass
class Support:
    """What the refinement needs of one layer: the support (sorted by row then column), per-channel budgets,
    ``e_hat = E G_d M^T`` and ``g_hat = M G_d M^T`` (float64; both ``None`` for ``method="zeros"``) and the
    coefficient ``c`` of ``Delta W = c F M``."""

    rows: torch.Tensor
    cols: torch.Tensor
    budgets: torch.Tensor
    e_hat: torch.Tensor | None
    g_hat: torch.Tensor | None
    coefficient: float


def _error_block(weight: torch.Tensor, w_deq: torch.Tensor, rows: slice) -> torch.Tensor:
    """``E[rows] = W[rows] - W_q[rows]`` in float64."""
    w = weight[rows].detach().to(torch.float64)
    return w - w_deq[rows].detach().to(device=w.device, dtype=torch.float64)


def select_support(weight: torch.Tensor, w_deq: torch.Tensor, gram: torch.Tensor, config: InitConfig) -> Support:
    """Budgets and support of one layer (steps 1–2 of the module docstring), streamed over output-channel blocks.

    ``weight``/``w_deq``: ``(d_out, d_in)`` (any float dtype); ``gram``: ``X^T X`` (``d_in x d_in``). All float64
    work is done in the transformed basis, so the only ``d_in x d_in`` buffer is ``G_hat``: with ``Ê = E M^T``,
    ``E G_d M^T = Ê G_hat / n`` and ``||(E R)_i||^2 = (Ê G_hat Ê^T)_ii / n^2``. One pass over blocks of
    ``config.block_bytes`` computes ``e_hat`` (kept, ``d_out x d_in``) and the channel norms; after the budgets, a
    second pass re-forms ``Ê`` per block and selects its top-k. Peak memory: ``G_hat`` + ``e_hat`` + ``O(block)``.
    """
    d_out, d_in = weight.shape
    if tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected {(d_in, d_in)}")
    coefficient = config.scale / (d_in * math.sqrt(d_out))
    total = config.budget(d_out, d_in)
    blocks = row_blocks(d_out, 8 * d_in, config.block_bytes)
    device = weight.device
    if config.method != "adaalloc":
        budgets = allocate_budget(torch.ones(d_out, dtype=torch.float64), total, d_in)
        rows, cols = _random_support(d_out, d_in, budgets, config.seed, blocks)
        rows, cols = rows.to(device), cols.to(device)
        if config.method == "zeros":
            return Support(rows, cols, budgets, None, None, coefficient)
    if isinstance(gram, TransformedGram):
        g_hat = gram.g_hat.to(device)
    else:
        g_hat = transformed_gram(gram.to(device), config.damp_ratio, config.block_bytes)
    e_hat = torch.empty(d_out, d_in, dtype=torch.float64, device=device)
    norms = torch.empty(d_out, dtype=torch.float64, device=device)
    for blk in blocks:
        spec = hadamard_transform(_error_block(weight, w_deq, blk))  # Ê = E M^T
        e_hat[blk] = spec @ g_hat / d_in
        norms[blk] = ((e_hat[blk] * spec).sum(1) / d_in).clamp_min(0).sqrt()
    if config.method == "adaalloc":
        budgets = allocate_budget(norms, total, d_in, config.temperature)
        weight_of_column = g_hat.diagonal().clamp_min(0).sqrt()[None, :] / (d_in * coefficient)
        parts = []
        for blk in blocks:
            importance = hadamard_transform(_error_block(weight, w_deq, blk)).abs_() * weight_of_column
            r, c = _select_topk(importance, budgets[blk.start : blk.stop].to(device))
            parts.append((r + blk.start, c))
            del importance
        rows, cols = torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts])
    return Support(rows, cols, budgets.cpu(), e_hat, g_hat, coefficient)


def spectral_delta_rows(support: Support, values: torch.Tensor) -> Callable[[slice, int], torch.Tensor]:
    """``(rows, d_in) -> Delta W[rows]`` (float64) of the spectrum ``values`` on ``support`` (sorted by row)."""
    bounds = torch.searchsorted(support.rows, torch.arange(0, int(support.budgets.numel()) + 1).to(support.rows))

    def rows_of(blk: slice, width: int) -> torch.Tensor:
        lo, hi = int(bounds[blk.start]), int(bounds[blk.stop])
        n = blk.stop - blk.start
        r, c = support.rows[lo:hi] - blk.start, support.cols[lo:hi]
        return dense_delta(values[lo:hi], r, c, n, width, support.coefficient)

    return rows_of


def report_errors(
    weight: torch.Tensor,
    w_deq: torch.Tensor,
    delta_rows: Callable[[slice, int], torch.Tensor],
    grams: dict[str, torch.Tensor | None],
    block_bytes: int = 64 * 2**20,
) -> dict[str, float]:
    """Relative output errors over output-channel blocks: ``rel_err_before_<tag>`` = ``||E X^T|| / ||W X^T||`` and
    ``rel_err_after_<tag>`` (``E - Delta W``) for each ``{tag: gram}`` (``None`` skipped), in float64.

    ``delta_rows(rows, d_in)`` gives ``Delta W[rows]`` (e.g. :func:`spectral_delta_rows`); only a block of rows of
    ``W``, ``E`` and ``Delta W`` is formed at a time, and each Gram is read as it is (no copy when float64). A Gram
    may be an :class:`~.calibration.InputRows` (``G = X^T X`` as its rows): ``a G a^T = ||a X^T||^2``, or a
    :class:`TransformedGram`."""
    d_out, d_in = weight.shape
    grams = {tag: g.to(device=weight.device, dtype=torch.float64) for tag, g in grams.items() if g is not None}
    sums = {tag: torch.zeros(3, dtype=torch.float64) for tag in grams}
    for blk in row_blocks(d_out, 8 * d_in, block_bytes):
        e = _error_block(weight, w_deq, blk)
        delta = delta_rows(blk, d_in).to(e)
        stack = torch.stack([weight[blk].detach().to(e), e, e - delta])  # (3, rows, d_in)
        for tag, gm in grams.items():
            if isinstance(gm, InputRows):  # G = X^T X: a G a^T = ||a X^T||^2
                prod = stack @ gm.rows.T
                sums[tag] += (prod * prod).sum((1, 2)).cpu()
            elif isinstance(gm, TransformedGram):
                sums[tag] += gm.quadratic(stack).cpu()
            else:
                prod = stack @ gm
                sums[tag] += (prod * stack).sum((1, 2)).cpu()
    out: dict[str, float] = {}
    for tag, total in sums.items():
        ref, before, after = total.clamp_min(0).sqrt().tolist()
        out[f"rel_err_before_{tag}"] = before / ref
        out[f"rel_err_after_{tag}"] = after / ref
    return out


def init_layer(
    weight: torch.Tensor,
    w_deq: torch.Tensor,
    gram: torch.Tensor,
    config: InitConfig = InitConfig(),
    eval_gram: torch.Tensor | None = None,
    report_calibration: bool = True,
) -> LayerInit:
    """Initialise one layer's spectrum so that ``W_q + Delta W`` approximates ``W`` on the calibration activations.

    ``weight``/``w_deq``: ``(d_out, d_in)``; ``gram``: ``X^T X`` (``d_in x d_in``) of the layer's calibration input.
    The report holds relative output errors ``||(.) X^T|| / ||W X^T||`` before and after, on ``gram`` and (when
    given) on ``eval_gram`` (held-out activations); ``report_calibration=False`` skips the calibration figures.
    Streamed over output-channel blocks (:func:`select_support`, :func:`refine_values`, :func:`report_errors`):
    besides its inputs, one layer holds ``G_hat`` and ``e_hat`` in float64 plus ``O(config.block_bytes)``.
    """
    support = select_support(weight, w_deq, gram, config)
    if config.method == "zeros":
        values = torch.zeros(support.rows.numel(), dtype=torch.float64, device=weight.device)
    else:
        values = refine_values(
            support.rows,
            support.cols,
            support.e_hat,
            support.g_hat,
            support.coefficient,
            config.ridge,
            config.max_solve_bytes,
        )
    support.e_hat = support.g_hat = None  # free the float64 buffers before the report
    d_out, d_in = weight.shape
    report = {"d_out": d_out, "d_in": d_in, "budget": int(support.rows.numel())}
    grams = {"calib": gram if report_calibration else None, "heldout": eval_gram}
    report.update(report_errors(weight, w_deq, spectral_delta_rows(support, values), grams, config.block_bytes))
    return LayerInit(
        values.float().cpu(), support.rows.cpu(), support.cols.cpu(), config.scale, support.budgets.cpu(), report
    )

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

Baselines: ``method="random"`` (uniform budgets, random indices, then the same refinement) and ``method="zeros"``
(plain WHA: random indices, zero values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels import dense_delta, hadamard_transform

__all__ = [
    "InitConfig",
    "LayerInit",
    "allocate_budget",
    "init_layer",
    "output_error",
    "refine_values",
    "refine_values_loop",
    "relative_errors",
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
    scale: float = 1.0
    seed: int = 0
    max_solve_bytes: int = 256 * 2**20

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


def _damped(gram: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    mean = float(g.diagonal().mean())
    damp = damp_ratio * mean if mean > 0 else damp_ratio
    return g + damp * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def output_error(err: torch.Tensor, gram: torch.Tensor) -> float:
    """``||err X^T||_F = sqrt(trace(err G err^T))`` in float64."""
    e = err.to(torch.float64)
    return math.sqrt(max(float(((e @ gram.to(torch.float64)) * e).sum()), 0.0))


def relative_errors(
    w: torch.Tensor, err: torch.Tensor, delta: torch.Tensor, grams: dict[str, torch.Tensor | None]
) -> dict[str, float]:
    """``rel_err_before_<tag>`` = ``||err X^T|| / ||W X^T||`` and ``rel_err_after_<tag>`` (``err - delta``) for each
    ``{tag: gram}`` (``None`` grams skipped), float64."""
    out: dict[str, float] = {}
    for tag, gm in grams.items():
        if gm is None:
            continue
        gm = gm.to(device=w.device, dtype=torch.float64)
        ref = output_error(w, gm)
        out[f"rel_err_before_{tag}"] = output_error(err, gm) / ref
        out[f"rel_err_after_{tag}"] = output_error(err - delta, gm) / ref
    return out


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


def _transformed_gram(g: torch.Tensor) -> torch.Tensor:
    """``G_hat = M G M^T`` (G symmetric): transform rows, then columns."""
    return hadamard_transform(hadamard_transform(g).T.contiguous())


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
    max_solve_bytes: int = 256 * 2**20,
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


def _random_support(d_out: int, d_in: int, budgets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(d_out, d_in, generator=gen, dtype=torch.float64)
    return _select_topk(scores, budgets)


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
    """
    w = weight.detach().to(torch.float64)
    e = w - w_deq.detach().to(device=w.device, dtype=torch.float64)
    d_out, d_in = e.shape
    if gram.shape != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected {(d_in, d_in)}")
    g = _damped(gram.to(w.device), config.damp_ratio)
    coefficient = config.scale / (d_in * math.sqrt(d_out))
    total = config.budget(d_out, d_in)

    if config.method == "adaalloc":
        eg = e @ g
        norms = ((eg * e).sum(1)).clamp_min(0).sqrt()  # ||(E R)_i||
        budgets = allocate_budget(norms, total, d_in, config.temperature)
        g_hat = _transformed_gram(g)
        spectrum = hadamard_transform(e) / (d_in * coefficient)  # E = c * C @ M
        importance = spectrum.abs() * g_hat.diagonal().clamp_min(0).sqrt()[None, :]
        rows, cols = _select_topk(importance, budgets)
        del spectrum, importance
    else:
        budgets = allocate_budget(torch.ones(d_out, dtype=torch.float64), total, d_in)
        rows, cols = _random_support(d_out, d_in, budgets.cpu(), config.seed)
        rows, cols = rows.to(w.device), cols.to(w.device)
        eg = e @ g if config.method == "random" else None
        g_hat = _transformed_gram(g) if config.method == "random" else None

    if config.method == "zeros":
        values = torch.zeros(rows.numel(), dtype=torch.float64, device=w.device)
    else:
        e_hat = hadamard_transform(eg)  # E G M^T
        values = refine_values(rows, cols, e_hat, g_hat, coefficient, config.ridge, config.max_solve_bytes)

    delta = dense_delta(values, rows, cols, d_out, d_in, coefficient)
    report = {"d_out": d_out, "d_in": d_in, "budget": int(rows.numel())}
    report.update(relative_errors(w, e, delta, {"calib": gram if report_calibration else None, "heldout": eval_gram}))
    return LayerInit(values.float().cpu(), rows.cpu(), cols.cpu(), config.scale, budgets.cpu(), report)

"""Quality metrics for comparing a model with its quantized / adapted / exported versions.

Every function accepts a Hugging Face causal LM, any ``nn.Module`` or any plain callable: it is called as
``model(input_ids)`` (Hugging Face models get ``input_ids=..., use_cache=False``) and may return an object with a
``.logits`` attribute, a tuple whose first item is the logits, or the logits tensor itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LogitComparison", "compare_logits", "extract_logits", "logits_for", "next_token_nll", "perplexity"]


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor in a model output (``.logits``, first tuple item, or the tensor itself)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _device_of(model: Any) -> torch.device | None:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
        for b in model.buffers():
            return b.device
    return None


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    if isinstance(model, torch.nn.Module):
        was_training = model.training
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)
    else:
        yield


def _forward(model: Callable[..., Any], input_ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    return extract_logits(out)


def _batches(model: Any, chunks: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(input_ids, logits)`` per batch, under no_grad and eval mode."""
    if chunks.dim() != 2:
        raise ValueError(f"chunks must be a 2-D (n_chunks, seq_len) tensor of token ids, got {tuple(chunks.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = _device_of(model)
    # no_grad around each forward only, never around the yield: grad mode is thread-global, so a generator that
    # yields inside no_grad switches it off in its caller too, and two such generators interleaved (reference and
    # export compared batch by batch) restore each other's state in the wrong order and leave it off for good.
    with _eval_mode(model):
        for start in range(0, chunks.shape[0], batch_size):
            ids = chunks[start : start + batch_size].long()
            if device is not None:
                ids = ids.to(device)
            with torch.no_grad():
                logits = _forward(model, ids)
            yield ids, logits


def perplexity(model: Any, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted causal-LM perplexity over all chunks (``exp`` of the mean next-token NLL).

    Each chunk of length L contributes L-1 predictions (positions 1..L-1 are predicted from their prefix).  The
    per-token losses come from float32 log-softmax and are summed in float64.
    """
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for ids, logits in _batches(model, chunks, batch_size):
        nll, n = next_token_nll(logits, ids)
        total += nll
        count += n
    if count == 0:
        raise ValueError("perplexity needs chunks of at least 2 tokens")
    return math.exp(total.item() / count)


def logits_for(model: Any, chunks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Logits of ``model`` on ``chunks`` as one float32 CPU tensor of shape ``(n_chunks, seq_len, vocab)``."""
    return torch.cat([logits.float().cpu() for _, logits in _batches(model, chunks, batch_size)], dim=0)


BLOCK_BYTES = 16 << 20  # float64 bytes of one row block of logits (a handful of such copies are live at once)


class LogitComparison:
    """:func:`compare_logits` accumulated chunk by chunk: ``update(ref, test, input_ids)`` per batch of logits
    (float64 sums over row blocks of ``block_rows`` tokens; by default as many as fit :data:`BLOCK_BYTES`, so the
    memory does not grow with the vocabulary: 512 rows of a 128,256-token vocabulary were 0.5 GB a copy),
    ``result()`` the totals. With ``input_ids`` (the batch's token ids) both
    perplexities are accumulated as :func:`perplexity` computes them (float32 log-softmax, float64 sums) and
    ``result()`` adds ``ppl_reference`` and ``ppl_test``."""

    def __init__(self, block_rows: int | None = None) -> None:
        self.block_rows = block_rows
        self.n = self.vocab = self.agree = self.nll_count = 0
        self.max_abs = self.sum_abs = self.sum_kl = 0.0
        self.nll = [0.0, 0.0]

    def update(
        self, logits_ref: torch.Tensor, logits_test: torch.Tensor, input_ids: torch.Tensor | None = None
    ) -> None:
        if logits_ref.shape != logits_test.shape:
            raise ValueError(f"logits shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits_test.shape)}")
        if logits_ref.dim() < 1 or logits_ref.numel() == 0:
            raise ValueError("compare_logits needs non-empty logits")
        self.vocab = vocab = logits_ref.shape[-1]
        ref, test = logits_ref.reshape(-1, vocab), logits_test.reshape(-1, vocab)
        rows = self.block_rows or max(1, BLOCK_BYTES // (8 * vocab))
        for s in range(0, ref.shape[0], rows):
            r = ref[s : s + rows].double()
            t = test[s : s + rows].to(device=r.device).double()
            diff = (r - t).abs()
            self.max_abs = max(self.max_abs, diff.max().item())
            self.sum_abs += diff.sum().item()
            lp_r = torch.log_softmax(r, dim=-1)
            lp_t = torch.log_softmax(t, dim=-1)
            # p*(log p - log q) with 0*log0 := 0 (exp(-inf) = 0 rows contribute nothing)
            kl = torch.where(lp_r.isneginf(), torch.zeros_like(lp_r), lp_r.exp() * (lp_r - lp_t)).sum(dim=-1)
            self.sum_kl += kl.sum().item()
            self.agree += (r.argmax(dim=-1) == t.argmax(dim=-1)).sum().item()
        self.n += ref.shape[0]
        if input_ids is not None:
            for i, logits in enumerate((logits_ref, logits_test)):
                total, count = next_token_nll(logits, input_ids)
                self.nll[i] += total
            self.nll_count += count

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("compare_logits needs non-empty logits")
        out = {
            "tokens": int(self.n),
            "max_abs_logit_diff": float(self.max_abs),
            "mean_abs_logit_diff": float(self.sum_abs / (self.n * self.vocab)),
            "kl_per_token": float(self.sum_kl / self.n),
            "top1_agreement": float(self.agree / self.n),
        }
        if self.nll_count:
            out["ppl_reference"] = math.exp(self.nll[0] / self.nll_count)
            out["ppl_test"] = math.exp(self.nll[1] / self.nll_count)
        return out


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """``(sum of next-token NLLs in float64, number of predictions)`` of one batch of logits ``(b, seq, vocab)``."""
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match input shape {tuple(input_ids.shape)}")
    pred = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    target = input_ids[:, 1:].reshape(-1).long().to(pred.device)
    nll = F.cross_entropy(pred, target, reduction="none")
    return float(nll.double().sum().cpu()), int(target.numel())


def compare_logits(
    logits_ref: torch.Tensor, logits_test: torch.Tensor, block_rows: int | None = None
) -> dict[str, float]:
    """Compare two sets of logits for the same tokens (all leading dims are flattened into tokens).

    Returns ``tokens`` (int), ``max_abs_logit_diff``, ``mean_abs_logit_diff``, ``kl_per_token`` (mean over tokens
    of KL(softmax(ref) || softmax(test)), in float64) and ``top1_agreement`` (fraction of tokens whose argmax
    agrees).  Computed in row blocks so large vocabularies do not need float64 copies of everything
    (:class:`LogitComparison` accumulates the same over several calls).
    """
    comparison = LogitComparison(block_rows)
    comparison.update(logits_ref, logits_test)
    return comparison.result()

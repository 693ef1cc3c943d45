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

__all__ = ["compare_logits", "extract_logits", "logits_for", "perplexity"]


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
    with _eval_mode(model), torch.no_grad():
        for start in range(0, chunks.shape[0], batch_size):
            ids = chunks[start : start + batch_size].long()
            if device is not None:
                ids = ids.to(device)
            yield ids, _forward(model, ids)


def perplexity(model: Any, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted causal-LM perplexity over all chunks (``exp`` of the mean next-token NLL).

    Each chunk of length L contributes L-1 predictions (positions 1..L-1 are predicted from their prefix).  The
    per-token losses come from float32 log-softmax and are summed in float64.
    """
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for ids, logits in _batches(model, chunks, batch_size):
        if logits.shape[:2] != ids.shape:
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match input shape {tuple(ids.shape)}")
        pred = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
        target = ids[:, 1:].reshape(-1)
        nll = F.cross_entropy(pred, target, reduction="none")
        total += nll.double().sum().cpu()
        count += target.numel()
    if count == 0:
        raise ValueError("perplexity needs chunks of at least 2 tokens")
    return math.exp(total.item() / count)


def logits_for(model: Any, chunks: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Logits of ``model`` on ``chunks`` as one float32 CPU tensor of shape ``(n_chunks, seq_len, vocab)``."""
    return torch.cat([logits.float().cpu() for _, logits in _batches(model, chunks, batch_size)], dim=0)


def compare_logits(logits_ref: torch.Tensor, logits_test: torch.Tensor, block_rows: int = 512) -> dict[str, float]:
    """Compare two sets of logits for the same tokens (all leading dims are flattened into tokens).

    Returns ``tokens`` (int), ``max_abs_logit_diff``, ``mean_abs_logit_diff``, ``kl_per_token`` (mean over tokens
    of KL(softmax(ref) || softmax(test)), in float64) and ``top1_agreement`` (fraction of tokens whose argmax
    agrees).  Computed in row blocks so large vocabularies do not need float64 copies of everything.
    """
    if logits_ref.shape != logits_test.shape:
        raise ValueError(f"logits shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits_test.shape)}")
    if logits_ref.dim() < 1 or logits_ref.numel() == 0:
        raise ValueError("compare_logits needs non-empty logits")
    vocab = logits_ref.shape[-1]
    ref = logits_ref.reshape(-1, vocab)
    test = logits_test.reshape(-1, vocab)
    n = ref.shape[0]
    max_abs = 0.0
    sum_abs = 0.0
    sum_kl = 0.0
    agree = 0
    for s in range(0, n, block_rows):
        r = ref[s : s + block_rows].double()
        t = test[s : s + block_rows].to(device=r.device).double()
        diff = (r - t).abs()
        max_abs = max(max_abs, diff.max().item())
        sum_abs += diff.sum().item()
        lp_r = torch.log_softmax(r, dim=-1)
        lp_t = torch.log_softmax(t, dim=-1)
        # p*(log p - log q) with 0*log0 := 0 (exp(-inf) = 0 rows contribute nothing)
        kl = torch.where(lp_r.isneginf(), torch.zeros_like(lp_r), lp_r.exp() * (lp_r - lp_t)).sum(dim=-1)
        sum_kl += kl.sum().item()
        agree += (r.argmax(dim=-1) == t.argmax(dim=-1)).sum().item()
    return {
        "tokens": int(n),
        "max_abs_logit_diff": float(max_abs),
        "mean_abs_logit_diff": float(sum_abs / (n * vocab)),
        "kl_per_token": float(sum_kl / n),
        "top1_agreement": float(agree / n),
    }

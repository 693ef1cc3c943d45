"""Serve an exported causal-LM ONNX folder with onnxruntime: tokenize, prefill, decode with the KV cache, sample.

The folder holds ``model.onnx`` (+ external data), the tokenizer files and ``config.json`` /
``generation_config.json`` and/or ``genai_config.json``.  The graph follows the optimum / onnxruntime-genai
convention: inputs ``input_ids`` and ``attention_mask`` (int64), optional ``position_ids``, and
``past_key_values.N.key|value`` ``[batch, kv_heads, past_seq, head_dim]``; outputs ``logits`` and
``present.N.key|value``.  Folders written by ``qwha-export export-onnx`` and by the onnxruntime-genai model builder
both load.

Example::

    lm = OnnxCausalLM.from_folder("runs/q4-onnx")
    out = lm.generate(["What is a Hadamard matrix?"], GenerationConfig(max_new_tokens=64))
    print(out.texts[0])
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GenerationConfig", "GenerationOutput", "IncrementalDecoder", "OnnxCausalLM", "check_onnx_folder"]

MODEL_FILE = "model.onnx"
PROVIDERS = ("auto", "cpu", "cuda")
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings. ``do_sample=False`` is greedy (``temperature``/``top_p``/``top_k`` unused).

    ``top_k=0`` keeps every token; ``seed`` seeds a ``numpy.random.Generator`` (None: fresh entropy);
    ``eos_token_id`` overrides the folder's end-of-sequence ids; ``ignore_eos`` generates ``max_new_tokens`` always.
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature} (use greedy decoding)")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {self.seed!r}")
        ids = (self.eos_token_id,) if isinstance(self.eos_token_id, int) else self.eos_token_id
        if ids is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"eos_token_id must be token ids >= 0, got {self.eos_token_id!r}")


@dataclass
class GenerationOutput:
    """Generated token ids per prompt (EOS included when it stopped the prompt), decoded texts, and timings."""

    token_ids: list[list[int]]
    finish_reasons: list[str]  # "eos", "length" (max_new_tokens), or "context" (context window full)
    prompt_lengths: list[int]
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    texts: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Decode steps (tokens per prompt after the first) per second of decode time."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class IncrementalDecoder:
    """Turn a stream of token ids into text pieces; holds back bytes of a multi-byte character until complete.

    Decodes a small window (the previous piece plus the new tokens), so each step costs O(1) in the text length.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (may be empty)."""
        self.ids.append(int(token_id))
        seen = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(seen) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(seen) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        seen = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(seen) :]


# --------------------------------------------------------------------------------------------------------------
# folder checks


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def check_onnx_folder(folder: str | Path) -> Path:
    """Return the path of the folder's model file after checking that it and all its external data exist.

    Raises ``ValueError`` (one line) for a missing folder or model file, or external data that is missing or too
    short, so a broken folder never reaches onnxruntime (:func:`qwha_export.formats.onnx_folder.check_onnx_folder`).
    """
    return _open_folder(folder)[0]


def _open_folder(folder: str | Path) -> tuple[Path, Any]:
    """``(model path, ModelProto without external data)`` after the checks of :func:`check_onnx_folder`."""
    from .formats.onnx_folder import check_onnx_folder as check

    return check(folder)


def _needs_right_padding(proto: Any) -> bool:
    """True when the graph attends with ``com.microsoft::GroupQueryAttention`` without an ``attention_bias`` input
    (the onnxruntime-genai builder's graphs): such a graph takes each row's length from the attention mask's row
    sum and treats the first that many cache slots as valid, so batches must be right-padded. Graphs that mask
    padding through ``attention_bias`` (ours) or plain attention take left padding."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    return any(len(n.input) <= 10 or not n.input[10] for n in gqa)


def _pick_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if provider == "cuda" and not has_cuda_ep:
        raise ValueError("provider 'cuda' needs onnxruntime-gpu (pip install 'qwha-export[gpu]') and a CUDA GPU")
    if provider == "cuda" or (provider == "auto" and has_cuda_ep and _gpu_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# --------------------------------------------------------------------------------------------------------------
# the model


class OnnxCausalLM:
    """A causal LM in an onnxruntime session with a KV cache; see :meth:`from_folder` and :meth:`generate`."""

    def __init__(
        self,
        session: Any,
        folder: Path,
        tokenizer: Any = None,
        device: str = "cpu",
        pad_right: bool = False,
        qwha_ops: str = "none",
    ):
        self.session = session
        self.qwha_ops = qwha_ops  # "native" (qwha kernels of qwha_export.ortops), "function" (ONNX bodies) or "none"
        self.pad_right = pad_right  # GroupQueryAttention graphs without attention_bias: rows padded on the right
        self.folder = folder
        self.tokenizer = tokenizer
        self.device = device
        config = _read_json(folder / "config.json")
        genai = _read_json(folder / "genai_config.json").get("model", {})
        gen = _read_json(folder / "generation_config.json")
        self.context_length: int | None = genai.get("context_length") or config.get("max_position_embeddings")
        eos = gen.get("eos_token_id", genai.get("eos_token_id", config.get("eos_token_id")))
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = _as_id_tuple(eos)
        pad = gen.get("pad_token_id", genai.get("pad_token_id", config.get("pad_token_id")))
        pad_ids = _as_id_tuple(pad) or self.eos_token_ids
        self.pad_token_id = pad_ids[0] if pad_ids else 0

        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        for name in ("input_ids", "attention_mask"):
            if name not in inputs:
                raise ValueError(f"{folder}: the graph has no {name!r} input (inputs: {', '.join(inputs)})")
        if "logits" not in outputs:
            raise ValueError(f"{folder}: the graph has no 'logits' output")
        layers: dict[int, dict[str, str]] = {}
        for name in inputs:
            m = _PAST.match(name)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        self.past_names = [layers[i][kind] for i in sorted(layers) for kind in ("key", "value")]
        self.present_names = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise ValueError(f"{folder}: the graph has past inputs but no {missing[0]!r} output")
        self.has_position_ids = "position_ids" in inputs
        unknown = set(inputs) - {"input_ids", "attention_mask", "position_ids", *self.past_names}
        if unknown:
            raise ValueError(f"{folder}: the graph has inputs this runner does not know: {', '.join(sorted(unknown))}")
        if self.past_names:
            first = inputs[self.past_names[0]]
            self.kv_dtype = _KV_DTYPES.get(first.type, np.float32)
            heads, head_dim = first.shape[1], first.shape[3]
            decoder = genai.get("decoder", {})
            n_heads = config.get("num_attention_heads") or decoder.get("num_attention_heads")
            if not isinstance(heads, int):
                heads = config.get("num_key_value_heads") or decoder.get("num_key_value_heads") or n_heads
            if not isinstance(head_dim, int):
                head_dim = config.get("head_dim") or decoder.get("head_size")
                if head_dim is None and n_heads:
                    head_dim = config["hidden_size"] // n_heads
            if not heads or not head_dim:
                raise ValueError(f"{folder}: cannot tell the KV-cache shape (no config.json or genai_config.json)")
            self.kv_heads, self.head_dim = int(heads), int(head_dim)
        self._output_names = ["logits", *self.present_names]

    # ----------------------------------------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        load_tokenizer: bool = True,
    ) -> OnnxCausalLM:
        """Open an exported folder. ``provider``: ``auto`` (CUDA when onnxruntime-gpu and a GPU are present, else
        CPU), ``cpu`` or ``cuda``; ``threads`` sets onnxruntime's intra-op threads (None: its default). On the CPU
        provider a fused export runs the native qwha kernels when they are available (:mod:`qwha_export.ortops`);
        ``qwha_ops`` says which path ran (``native``, ``function`` or ``none``)."""
        import onnxruntime as ort

        from .ortops import inference_session, model_uses_qwha_ops

        providers = _pick_providers(provider)
        d = Path(folder).expanduser()
        path, proto = _open_folder(d)
        pad_right = _needs_right_padding(proto)
        uses_qwha_ops = model_uses_qwha_ops(proto)
        del proto
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        try:
            session, qwha_ops = inference_session(path, options, providers, uses_qwha_ops=uses_qwha_ops)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"onnxruntime cannot load {path}: {first}") from None
        device = "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if provider == "cuda" and device != "cuda":
            raise ValueError("onnxruntime could not start the CUDA execution provider (no usable GPU?)")
        tokenizer = None
        has_tok = any((d / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        if load_tokenizer and has_tok:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        return cls(session, d, tokenizer=tokenizer, device=device, pad_right=pad_right, qwha_ops=qwha_ops)

    # ----------------------------------------------------------------------------------------------------------
    # one forward pass

    def empty_past(self, batch: int) -> list[Any]:
        """Zero-length KV cache for ``batch`` sequences (OrtValues on the session's device)."""
        import onnxruntime as ort

        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(z, self.device, 0) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[Any]) -> tuple[np.ndarray, list]:
        """Run the graph on new tokens ``input_ids [b, s]`` with ``attention_mask [b, past + s]`` (1 = real token,
        left padding) and the cache ``past``; return ``(logits [b, s, vocab] float32, present cache)``."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.has_position_ids:
            pos = np.clip(np.cumsum(mask, axis=-1) - 1, 0, None)[:, -ids.shape[1] :]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos, dtype=np.int64))
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return outs[0].numpy(), list(outs[1:])

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits ``[b, s, vocab]`` of unpadded ``input_ids [b, s]`` (no cache)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {ids.shape}")
        self._check_context(ids.shape[1])
        return self.forward(ids, np.ones_like(ids), self.empty_past(ids.shape[0]))[0]

    def _check_context(self, n: int) -> None:
        if self.context_length is not None and n > self.context_length:
            raise ValueError(f"the prompt has {n} tokens, longer than the model's context of {self.context_length}")

    # ----------------------------------------------------------------------------------------------------------
    # prompts

    def encode(self, prompts: Sequence[str], chat_template: bool = True) -> list[list[int]]:
        """Token ids of each prompt: the tokenizer's chat template (one user turn + generation prompt) when it has
        one and ``chat_template`` is True, else plain tokenization with the tokenizer's special tokens."""
        if self.tokenizer is None:
            raise ValueError(f"{self.folder} has no tokenizer files; pass token ids to generate_ids instead")
        use_template = chat_template and getattr(self.tokenizer, "chat_template", None)
        encoded = []
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {type(p).__name__}")
            if use_template:
                out = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
                ids = out["input_ids"] if hasattr(out, "keys") else out
            else:
                ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
            encoded.append([int(i) for i in ids])
        return encoded

    def generate(
        self,
        prompts: str | Sequence[str],
        config: GenerationConfig | None = None,
        stream: Callable[[int, str], None] | None = None,
        chat_template: bool = True,
    ) -> GenerationOutput:
        """Generate for each prompt (one batch, left-padded). ``stream(prompt_index, text_piece)`` is called as
        text is produced (multi-byte characters are held back until complete)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.encode(prompts, chat_template=chat_template)
        decoders = [IncrementalDecoder(self.tokenizer) for _ in prompts]
        on_token = None
        if stream is not None:

            def on_token(i: int, token: int) -> None:
                piece = decoders[i].push(token)
                if piece:
                    stream(i, piece)

        out = self.generate_ids(ids, config, on_token=on_token)
        if stream is not None:
            for i, dec in enumerate(decoders):
                rest = dec.flush()
                if rest:
                    stream(i, rest)
        out.texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.token_ids]
        return out

    # ----------------------------------------------------------------------------------------------------------
    # the decoding loop

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        on_token: Callable[[int, int], None] | None = None,
    ) -> GenerationOutput:
        """Generate from token-id prompts: one padded prefill, then one decode step per new token.

        ``on_token(prompt_index, token_id)`` is called for every generated token. Each prompt stops at an EOS id
        (kept in its output), after ``max_new_tokens``, or when the context window is full.
        """
        cfg = config or GenerationConfig()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no prompt may be empty")
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        if self.context_length is not None and longest >= self.context_length:
            raise ValueError(
                f"a prompt has {longest} tokens; the model's context is {self.context_length} tokens, "
                "so there is no room to generate"
            )
        budget = cfg.max_new_tokens
        if self.context_length is not None:
            budget = min(budget, self.context_length - longest)
        eos = set(_as_id_tuple(cfg.eos_token_id) if cfg.eos_token_id is not None else self.eos_token_ids)
        if cfg.ignore_eos:
            eos = set()
        rng = np.random.default_rng(cfg.seed)
        b = len(prompts)
        lens = np.asarray(lengths, dtype=np.int64)
        ids = np.full((b, longest), self.pad_token_id, dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = np.asarray(p, dtype=np.int64)
        if not self.pad_right:  # move each prompt to the right end (left padding)
            shift = (np.arange(longest)[None, :] - (longest - lens)[:, None]) % longest
            ids = np.take_along_axis(ids, shift, axis=1)

        t0 = time.perf_counter()
        logits, past = self.forward(ids, self._mask(lens, longest), self.empty_past(b))
        last = logits[np.arange(b), lens - 1] if self.pad_right else logits[:, -1]
        prefill_s = time.perf_counter() - t0
        tokens: list[list[int]] = [[] for _ in range(b)]
        reasons = ["length"] * b
        done = np.zeros(b, dtype=bool)
        steps, width = 0, longest
        t1 = time.perf_counter()
        for step in range(budget):
            nxt = select_next_tokens(last, cfg, rng)
            for i in np.flatnonzero(~done):
                tok = int(nxt[i])
                tokens[i].append(tok)
                if on_token is not None:
                    on_token(int(i), tok)
                if tok in eos:
                    done[i], reasons[i] = True, "eos"
            if done.all() or step == budget - 1:
                break
            nxt[done] = self.pad_token_id
            lens, width = lens + 1, width + 1
            logits, past = self.forward(nxt[:, None], self._mask(lens, width), past)
            last = logits[:, -1]
            steps += 1
        decode_s = time.perf_counter() - t1
        if budget < cfg.max_new_tokens:
            reasons = [r if r == "eos" else "context" for r in reasons]
        return GenerationOutput(tokens, reasons, lengths, prefill_s, decode_s, steps)

    def _mask(self, lens: np.ndarray, width: int) -> np.ndarray:
        """Attention mask ``[b, width]`` for rows of ``lens`` real tokens: ones first when padding on the right,
        ones last when padding on the left (a finished row keeps receiving pad tokens; they are never read)."""
        cols = np.arange(width)[None, :]
        ones = cols < lens[:, None] if self.pad_right else cols >= width - lens[:, None]
        return ones.astype(np.int64)


def select_next_tokens(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of ``logits [b, vocab]``: argmax (greedy), or a sample after temperature, top-k and
    top-p (nucleus: the smallest set of most likely tokens whose probability reaches ``top_p``)."""
    if not cfg.do_sample:
        return np.argmax(logits, axis=-1).astype(np.int64)
    x = logits.astype(np.float64) / cfg.temperature
    order = np.argsort(-x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, axis=-1)
    if cfg.top_k:
        xs[:, cfg.top_k :] = -np.inf
    p = np.exp(xs - xs[:, :1])
    p /= p.sum(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        before = np.cumsum(p, axis=-1) - p  # probability of the more likely tokens
        p = np.where(before < cfg.top_p, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random((x.shape[0], 1)) * cdf[:, -1:]
    pick = np.minimum((cdf <= u).sum(axis=-1), x.shape[1] - 1)
    return order[np.arange(x.shape[0]), pick].astype(np.int64)

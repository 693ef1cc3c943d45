"""Calibration activations, streamed block by block: float64 Gram matrices ``X^T X`` of each target linear's input.

How it works (the GPTQ "Catcher" pattern):

1. The inputs of the decoder blocks are captured once: the model is run on each calibration batch with every block
   replaced by a recorder that keeps the hidden states entering block 0 **and every other argument each block
   receives** (attention mask, ``position_embeddings``, ``position_ids``, ...; whatever this transformers version
   passes, which differs between local and global layers of Gemma 2/3), and the last recorder raises a sentinel
   exception, so nothing past the embeddings is computed.
2. For each block in order: forward hooks on its target linears accumulate ``X^T X`` in float64 while the block
   runs on the stored inputs; the grams are yielded (``(block_index, block, grams)``); then
   ``transform_block(block_index, block, grams)`` is called if given; then the block is run **again** on the same
   inputs and its outputs become the next block's inputs.

Sequential mode (the default, ``sequential=True``) is what GPTQ calls "true sequential" across blocks: whatever
the caller does to the block while it holds the yielded item (in the body of its ``for`` loop) or in
``transform_block`` -- e.g. quantizing or adapting its weights -- happens *before* the block's outputs are
recomputed, so block ``i+1`` is calibrated on the activations the already-modified blocks ``0..i`` produce.
With ``sequential=False`` the outputs are taken in the same pass that collects the grams (one block forward
instead of two), so modifications do not propagate; use it when the model is not being changed.

Memory: the hidden states of all calibration sequences (two copies, inputs and outputs of the current block) and
only one block's grams at a time.  Everything runs under ``torch.no_grad`` on the device the model is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .architectures import architecture_for, decoder_layers

TARGET_MODULES_DEFAULT: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

__all__ = [
    "TARGET_MODULES_DEFAULT",
    "BlockGrams",
    "InputRows",
    "collect_grams",
    "default_targets",
    "find_decoder_layers",
    "gram_hooks",
    "gram_to_root",
    "iter_block_grams",
    "rows_are_smaller",
    "run_block",
]


class BlockGrams(dict):
    """``dict[qualified_linear_name -> X^T X]`` (float64, ``d_in x d_in``) with token counts.

    ``token_counts[name]`` is the number of input rows (tokens) accumulated into that gram; ``n_tokens`` is the
    largest of them (every linear of a dense block sees every token, so they are all equal there).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_counts: dict[str, int] = {}

    @property
    def n_tokens(self) -> int:
        return max(self.token_counts.values(), default=0)


class InputRows:
    """A linear's Gram ``X^T X`` kept as its factor: the input rows ``X`` themselves (``(tokens, d_in)``, float32, as
    the block computed them), for a layer whose float64 Gram (``8 d_in^2`` bytes) would be larger than its rows
    (``4 tokens d_in``): held-out activations of wide layers (a Llama-3-8B ``down_proj`` on 2,048 tokens: 117 MB of
    rows against a 1.6 GB Gram). Read-only; ``gram()`` forms the Gram in float64 for a caller that needs it."""

    def __init__(self, n_rows: int, d_in: int, device: torch.device | str = "cpu") -> None:
        self.rows = torch.empty(n_rows, d_in, dtype=torch.float32, device=device)
        self.filled = 0

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the Gram it stands for, ``(d_in, d_in)``."""
        return (self.rows.shape[1], self.rows.shape[1])

    def append(self, x2: torch.Tensor) -> None:
        n = x2.shape[0]
        if self.filled + n > self.rows.shape[0]:
            raise RuntimeError(f"InputRows: {self.filled + n} rows for a store of {self.rows.shape[0]}")
        self.rows[self.filled : self.filled + n] = x2
        self.filled += n

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> InputRows:
        """The filled rows on ``device`` in ``dtype`` (no copy when they already are), as ``Tensor.to`` does."""
        out = InputRows(0, self.rows.shape[1])
        out.rows, out.filled = self.rows[: self.filled].to(device=device, dtype=dtype), self.filled
        return out

    def gram(self) -> torch.Tensor:
        x = self.rows[: self.filled].to(torch.float64)
        return x.T @ x


def rows_are_smaller(n_tokens: int, d_in: int) -> bool:
    """Whether ``n_tokens`` float32 input rows of width ``d_in`` take less memory than their float64 Gram."""
    return 4 * n_tokens * d_in < 8 * d_in * d_in


class _StopForward(Exception):
    """Raised by the last block's recorder once the inputs are captured."""


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a supported causal LM (``model.model.layers``, or ``model.layers`` for a bare base
    model), as the architecture registry (:mod:`.architectures`) lays them out; ``ValueError`` otherwise."""
    return decoder_layers(model)


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The architecture's target linears (``TARGET_MODULES_DEFAULT`` for a model without a config)."""
    config = getattr(model, "config", None)
    return architecture_for(config).target_modules if config is not None else TARGET_MODULES_DEFAULT


def _is_linear_like(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return hasattr(module, "in_features") and isinstance(w, torch.Tensor) and w.dim() == 2


def _target_linears(model: nn.Module, block: nn.Module, target_modules: Sequence[str]) -> dict[str, nn.Module]:
    """``{qualified name in model -> module}`` for the block's linears whose last name part is a target."""
    full_names = {id(m): n for n, m in model.named_modules()}
    targets = set(target_modules)
    found: dict[str, nn.Module] = {}
    for _, module in block.named_modules():
        name = full_names.get(id(module))
        if name is None or name.rsplit(".", 1)[-1] not in targets or not _is_linear_like(module):
            continue
        found[name] = module
    return found


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, tuple):
        return tuple(_detach(o) for o in obj)
    if isinstance(obj, list):
        return [_detach(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def _block_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"decoder block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _split_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple[Any, ...], dict]:
    """``(hidden_states, other args, kwargs without any cache)`` of one decoder-block call."""
    kw = dict(kwargs)
    if args:
        h, rest = args[0], tuple(args[1:])
    else:
        h, rest = kw.pop("hidden_states"), ()
    kw.pop("use_cache", None)
    for cache_key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        kw.pop(cache_key, None)
    return h, _detach(rest), _detach(kw)


def _capture_block_inputs(
    model: nn.Module, layers: list[nn.Module], input_ids: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """Run the model on each batch up to its decoder blocks: block 0's hidden-states input per batch, and the other
    args/kwargs **each** block receives per batch (``extras[block][batch]``).

    Blocks are not computed here: each one is replaced for the call by a recorder that passes the hidden states
    through, and the last raises :class:`_StopForward`. The per-block kwargs matter for architectures whose layers
    differ (Gemma 2/3, Qwen2 with sliding layers: a sliding-window or a full causal mask, local or global RoPE).
    """
    hidden: list[torch.Tensor] = []
    extras: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layers]

    def recorder(index: int):
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            h, rest, kw = _split_inputs(args, kwargs)
            if index == 0:
                hidden.append(h.detach())
            extras[index].append((rest, kw))
            if index == len(layers) - 1:
                raise _StopForward
            return h

        return forward

    device = _model_device(model)
    for index, block in enumerate(layers):
        block.forward = recorder(index)  # an instance attribute shadows the class's forward
    try:
        with torch.no_grad():
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].long().to(device)
                try:
                    if hasattr(model, "config"):
                        model(input_ids=ids, use_cache=False)
                    else:
                        model(ids)
                except _StopForward:
                    pass
                else:
                    raise RuntimeError("the model ran without calling its last decoder block")
    finally:
        for block in layers:
            del block.forward
    return hidden, extras


def run_block(block: nn.Module, hidden: Sequence[torch.Tensor], extras: Sequence[tuple[tuple, dict]]) -> list:
    """The block's outputs for each batch's hidden states and captured other inputs (no grad)."""
    with torch.no_grad():
        return [_block_output(block(h, *rest, **kw)).detach() for h, (rest, kw) in zip(hidden, extras, strict=True)]


@contextlib.contextmanager
def gram_hooks(
    model: nn.Module, block: nn.Module, target_modules: Sequence[str], index: int, rows_of_tokens: int | None = None
) -> Iterator[BlockGrams]:
    """Forward hooks on ``block``'s target linears that accumulate float64 ``X^T X`` of their inputs while the
    block runs inside the ``with``; yields the :class:`BlockGrams` they fill (names qualified in ``model``).
    Linears fed the very same input tensor (q/k/v, gate/up) share one Gram tensor: read it, never change it in
    place. ``rows_of_tokens`` (the number of tokens the block will run on): a linear whose input rows are smaller
    than its Gram (:func:`rows_are_smaller`) gets an :class:`InputRows` of them instead. ``RuntimeError`` on exit
    when a target linear was never called."""
    linears = _target_linears(model, block, target_modules)
    grams = BlockGrams()
    last: dict[str, Any] = {"x": None}
    owner_of: dict[str, str] = {}  # linear -> the first linear that received the same input tensor

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0]
            # q/k/v (and gate/up) receive the very same tensor: one X^T X, one Gram tensor shared by all of them
            d_in = x.shape[-1]
            as_rows = rows_of_tokens is not None and rows_are_smaller(rows_of_tokens, d_in)
            if last["x"] is not x:
                x2 = x.detach().reshape(-1, d_in)
                last.update(x=x, x2=x2, rows=x2.shape[0], owner=name)
            owner = owner_of.setdefault(name, last["owner"])
            if owner != name:
                grams[name] = grams[owner]
            elif as_rows:
                if name not in grams:
                    grams[name] = InputRows(rows_of_tokens, d_in, x.device)
                grams[name].append(last["x2"])
            else:
                x64 = last["x2"].to(torch.float64)
                if name in grams:  # accumulated in place: no second d_in x d_in buffer per batch
                    grams[name].addmm_(x64.T, x64)
                else:
                    grams[name] = x64.T @ x64
            grams.token_counts[name] = grams.token_counts.get(name, 0) + last["rows"]

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        yield grams
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    missing = [n for n in linears if n not in grams]
    if missing:
        raise RuntimeError(f"block {index}: target linears were never called: {missing}")


def iter_block_grams(
    model: nn.Module,
    input_ids: torch.Tensor,
    target_modules: Sequence[str] | None = None,
    batch_size: int = 8,
    transform_block: Callable[[int, nn.Module, BlockGrams], Any] | None = None,
    sequential: bool = True,
) -> Iterator[tuple[int, nn.Module, BlockGrams]]:
    """Yield ``(block_index, block, grams)`` for each decoder block, in order (see the module docstring).

    ``target_modules`` are last name parts of linears (peft style); None means the architecture's
    (:attr:`~.architectures.Architecture.target_modules`: q/k/v/o + gate/up/down, Phi-3's qkv_proj/gate_up_proj).

    ``input_ids`` is a ``LongTensor (n, seq)`` of calibration sequences (e.g. from
    :func:`qwha_export.data.calibration_and_heldout`).  ``grams`` is a :class:`BlockGrams`: qualified linear name
    (as in ``model.named_modules()``, e.g. ``model.layers.3.self_attn.q_proj``) -> float64 ``X^T X`` of that
    linear's input over all calibration tokens, with ``grams.token_counts``.  The grams are freshly allocated for
    each block (safe to modify in place) and dropped by this function once the next block starts.

    ``transform_block(block_index, block, grams)`` runs after the yield and before the block's outputs are
    recomputed (GPTQ sequential mode); its return value is ignored.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (n_sequences, seq_len), got shape {tuple(input_ids.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    layers = find_decoder_layers(model)
    if target_modules is None:
        target_modules = default_targets(model)
    was_training = model.training
    model.eval()
    try:
        hidden, all_extras = _capture_block_inputs(model, layers, input_ids, batch_size)
        for index, block in enumerate(layers):
            extras = all_extras[index]
            with gram_hooks(model, block, target_modules, index) as grams:
                outputs = run_block(block, hidden, extras)
            if sequential:
                outputs = []  # recomputed after the caller has changed the block

            yield index, block, grams

            if transform_block is not None:
                transform_block(index, block, grams)
            del grams
            if sequential:
                outputs = run_block(block, hidden, extras)
            hidden = outputs
    finally:
        model.train(was_training)


def collect_grams(
    model: nn.Module,
    input_ids: torch.Tensor,
    target_modules: Sequence[str] | None = None,
    batch_size: int = 8,
) -> BlockGrams:
    """All blocks' grams in one dict (for tiny models; the model is not modified, so one pass per block)."""
    result = BlockGrams()
    for _, _, grams in iter_block_grams(model, input_ids, target_modules, batch_size=batch_size, sequential=False):
        result.update(grams)
        result.token_counts.update(grams.token_counts)
    return result


def gram_to_root(xtx: torch.Tensor, damp_ratio: float = 1e-4) -> torch.Tensor:
    """Symmetric square root ``R`` of ``XtX + damp_ratio * mean(diag(XtX)) * I`` (so ``R @ R == that``), float64.

    Computed with ``torch.linalg.eigh`` in float64; eigenvalues are clamped at 0 before the square root so tiny
    negative round-off never produces NaNs.  Used by the QWHA initialisation (``||(W - W') R||_F`` weighs the
    weight error by the calibration activations).
    """
    if xtx.dim() != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be a square matrix, got shape {tuple(xtx.shape)}")
    a = xtx.to(torch.float64)
    a = 0.5 * (a + a.T)
    diag_mean = a.diagonal().mean()
    damp = damp_ratio * diag_mean if diag_mean > 0 else torch.tensor(damp_ratio, dtype=torch.float64, device=a.device)
    a = a + damp * torch.eye(a.shape[0], dtype=torch.float64, device=a.device)
    evals, evecs = torch.linalg.eigh(a)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    return 0.5 * (root + root.T)

"""Bit packing of integer codes into ``int32`` words (pure bit layout: no quantization math).

Every layout here is the SAME little-endian bit stream, applied along different axes:

**Dense little-endian int32 bit stream** (:func:`pack_int32` / :func:`unpack_int32`)
    Along the packed axis, value ``i`` (an unsigned integer ``< 2**bits``) occupies stream bits
    ``[i * bits, (i + 1) * bits)``, least-significant bit first; stream bit ``k`` is bit ``k % 32`` of word
    ``k // 32``. 32 consecutive values therefore fill exactly ``bits`` words with no padding bits, and for
    ``bits`` in {1, 2, 4, 8} (which divide 32) no value straddles a word: word ``w`` holds values
    ``w * 32/bits .. (w + 1) * 32/bits - 1``, value ``j`` of the word at bits ``[bits*j, bits*(j+1))``.
    For 3 bits a block of 32 values spans 3 words (10 | 1 | 10 | 1 | 10):

    ========  ============================================================================
    word 0    values 0..9 at bits 0,3,..,27; bits 0-1 of value 10 at bits 30-31
    word 1    bit 2 of value 10 at bit 0; values 11..20 at bits 1,4,..,28; bit 0 of value 21 at bit 31
    word 2    bits 1-2 of value 21 at bits 0-1; values 22..31 at bits 2,5,..,29
    ========  ============================================================================

    A line of ``n`` values is zero-padded to a multiple of 32 values and the result truncated to
    ``ceil(n * bits / 32)`` words. Words are stored as ``torch.int32`` (two's complement of the unsigned word, so
    a word with bit 31 set is negative). Packing is exact and :func:`unpack_int32` inverts it bit for bit.

Sources checked (read, not copied):

* AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` ``QuantLinear.pack`` and its ``forward``
  (``wf`` shift tables, incl. the 3-bit ``[[0,3,..,30,0],[0,1,4,..,31],[0,2,5,..,29,0]]`` table) and GPTQModel
  ``gptqmodel/nn_modules/qlinear/__init__.py`` ``PackableQuantLinear.pack_block`` / ``dequantize_weight``
  (``_pack_rows_2_4_8``: value ``j`` of a 32/bits group at ``j * bits``; ``_pack_rows_3``: the 10|1|10|1|10 scheme
  above). The 3-bit scheme is exactly the dense stream (value 10 at stream bit 30, value 21 at 63).
* compressed-tensors 0.20.1 (installed) ``compressors/pack_quantized/helpers.py`` ``pack_to_int32`` /
  ``unpack_from_int32``: dense cross-element packing, element ``i`` at global bit ``i * num_bits``, padded to 32
  elements, truncated to ``ceil(E * num_bits / 32)`` words. Older compressed-tensors releases used
  ``pack_factor = 32 // num_bits`` values per word with wasted bits -- identical for 1/2/4/8 bits, DIFFERENT for
  3 bits (10 values per word), so 3-bit compressed-tensors checkpoints are not portable across versions.

**GPTQ** (AutoGPTQ / GPTQModel / transformers / vLLM ``gptq``), for ``codes`` ``(d_out, d_in)``:

* ``qweight`` ``int32 [d_in * bits / 32, d_out]`` -- column ``o`` is the stream of ``codes[o, :]`` (packed along
  the INPUT dim): ``qweight = pack_int32(codes, bits, dim=-1).T``. For 4 bits word ``qweight[k, o]`` holds
  ``codes[o, 8k + j]`` at bits ``4j .. 4j+3``.
* ``qzeros`` ``int32 [n_groups, d_out * bits / 32]`` -- row ``g`` is the stream of ``zeros[:, g]`` (packed along
  the OUTPUT dim): ``qzeros = pack_int32(zeros.T, bits, dim=-1)``.
  (The v1 "zero - 1" convention is applied by :mod:`.gptq`, not here.)

Loaders allocate ``qweight`` as ``[d_in // 32 * bits, d_out]`` and ``qzeros`` as ``[n_groups, d_out // 32 * bits]``,
so a loadable GPTQ layer needs ``d_in % 32 == 0`` and ``d_out % 32 == 0`` (GPTQModel's packer checks both);
:mod:`.gptq` enforces that, the functions here accept any length.

**compressed-tensors ``pack-quantized``**, for ``codes`` ``(d_out, d_in)`` and ``zeros`` ``(d_out, n_groups)``:

* ``weight_packed`` ``int32 [d_out, ceil(d_in * bits / 32)]`` -- row ``o`` is the stream of ``codes[o, :]`` (packed
  along the LAST dim): ``pack_int32(codes, bits, dim=-1)``.
* ``weight_zero_point`` ``int32 [ceil(d_out * bits / 32), n_groups]`` -- column ``g`` is the stream of
  ``zeros[:, g]`` (``pack_to_int32(..., packed_dim=0)``): ``pack_int32(zeros, bits, dim=0)``.

  compressed-tensors holds integer values SIGNED (``int8`` in ``[-2**(bits-1), 2**(bits-1) - 1]``, see
  :func:`to_ct_signed`) and ``pack_to_int32`` adds the offset ``2**(bits-1)`` before packing, so the packed words
  carry the UNSIGNED codes / zero points unchanged -- byte-identical to packing our unsigned values directly.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "pack_int32",
    "unpack_int32",
    "packed_words",
    "pack_gptq_qweight",
    "unpack_gptq_qweight",
    "pack_gptq_qzeros",
    "unpack_gptq_qzeros",
    "pack_ct_weight",
    "unpack_ct_weight",
    "pack_ct_zero_point",
    "unpack_ct_zero_point",
    "to_ct_signed",
    "from_ct_signed",
    "GPTQ_PACK_BITS",
]

GPTQ_PACK_BITS: tuple[int, ...] = (2, 3, 4, 8)

_MASK32 = (1 << 32) - 1
# elements per processing chunk (bounds the int64 working copy to ~64 MiB)
_CHUNK_ELEMS = 1 << 23


def _check_bits(bits: int, allowed: tuple[int, ...] | None = None) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed; need an int in [1, 8]")
    if allowed is not None and bits not in allowed:
        raise ValueError(f"bits={bits} is not supported by this layout; choose one of {allowed}")
    return bits


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` values of ``bits`` bits: ``ceil(n * bits / 32)``."""
    return math.ceil(n * bits / 32)


def _pack_rows(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, n)`` integer tensor with values in ``[0, 2**bits)`` -> ``(rows, ceil(n*bits/32))`` int32."""
    rows, n = v.shape
    n_words = packed_words(n, bits)
    n_blocks = math.ceil(n / 32)
    out = torch.empty(rows, n_words, dtype=torch.int32, device=v.device)
    if rows == 0 or n == 0:
        return out
    chunk = max(1, _CHUNK_ELEMS // (n_blocks * 32))
    for r0 in range(0, rows, chunk):
        x = v[r0 : r0 + chunk].to(torch.int64)
        r = x.shape[0]
        if n_blocks * 32 != n:
            x = torch.nn.functional.pad(x, (0, n_blocks * 32 - n))
        x = x.view(r, n_blocks, 32)
        acc = torch.zeros(r, n_blocks, bits, dtype=torch.int64, device=v.device)
        for i in range(32):
            start = i * bits
            w, off = divmod(start, 32)
            acc[:, :, w] |= (x[:, :, i] << off) & _MASK32
            if off + bits > 32:  # value straddles into the next word (3-bit only among 2/3/4/8)
                acc[:, :, w + 1] |= x[:, :, i] >> (32 - off)
        acc = acc.view(r, n_blocks * bits)[:, :n_words]
        acc = torch.where(acc >= (1 << 31), acc - (1 << 32), acc)  # unsigned word -> two's complement int32
        out[r0 : r0 + r] = acc.to(torch.int32)
    return out


def _unpack_rows(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """``(rows, ceil(n*bits/32))`` int32 -> ``(rows, n)`` uint8 (inverse of :func:`_pack_rows`)."""
    rows, n_words = p.shape
    n_blocks = math.ceil(n / 32)
    out = torch.empty(rows, n, dtype=torch.uint8, device=p.device)
    if rows == 0 or n == 0:
        return out
    mask = (1 << bits) - 1
    chunk = max(1, _CHUNK_ELEMS // (n_blocks * 32))
    for r0 in range(0, rows, chunk):
        w64 = p[r0 : r0 + chunk].to(torch.int64) & _MASK32
        r = w64.shape[0]
        # pad to whole 32-value blocks plus one spare word so "next word" reads never go out of range
        w64 = torch.nn.functional.pad(w64, (0, n_blocks * bits - n_words))
        w64 = torch.nn.functional.pad(w64.view(r, n_blocks, bits), (0, 1))
        vals = torch.empty(r, n_blocks, 32, dtype=torch.int64, device=p.device)
        for i in range(32):
            start = i * bits
            w, off = divmod(start, 32)
            val = w64[:, :, w] >> off
            if off + bits > 32:
                val = val | (w64[:, :, w + 1] << (32 - off))
            vals[:, :, i] = val & mask
        out[r0 : r0 + r] = vals.view(r, n_blocks * 32)[:, :n].to(torch.uint8)
    return out


def _as_unsigned_values(values: torch.Tensor, bits: int, what: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor) or values.dtype.is_floating_point or values.is_complex():
        raise ValueError(f"{what} must be an integer tensor")
    if values.dtype == torch.bool:
        values = values.to(torch.uint8)
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= (1 << bits):
            raise ValueError(f"{what} must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got [{lo}, {hi}]")
    return values


def pack_int32(values: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack a 2-D tensor of unsigned ``bits``-bit integers along ``dim`` into int32 words (dense LE stream).

    ``values`` ``(a, n)`` with ``dim=-1`` -> ``(a, ceil(n*bits/32))``; with ``dim=0`` ``(n, b)`` ->
    ``(ceil(n*bits/32), b)``. Result is contiguous int32 on ``values.device``. ValueError for values outside
    ``[0, 2**bits)``.
    """
    _check_bits(bits)
    values = _as_unsigned_values(values, bits, "values")
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D, got shape {tuple(values.shape)}")
    if dim in (0, -2):
        return _pack_rows(values.t(), bits).t().contiguous()
    if dim in (1, -1):
        return _pack_rows(values, bits).contiguous()
    raise ValueError(f"dim must be 0 or -1 for a 2-D tensor, got {dim}")


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``length`` values per line along ``dim``, returned as uint8."""
    _check_bits(bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        got = f"{packed.dtype} {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a 2-D int32 tensor, got {got}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    if dim in (0, -2):
        p = packed.t()
    elif dim in (1, -1):
        p = packed
    else:
        raise ValueError(f"dim must be 0 or -1 for a 2-D tensor, got {dim}")
    want = packed_words(length, bits)
    if p.shape[1] != want:
        raise ValueError(f"{length} values of {bits} bits need {want} int32 words along dim {dim}, found {p.shape[1]}")
    out = _unpack_rows(p, bits, length)
    return out.t().contiguous() if dim in (0, -2) else out


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------------


def pack_gptq_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ``(d_out, d_in)`` -> GPTQ ``qweight`` ``int32 [ceil(d_in*bits/32), d_out]`` (packed along d_in)."""
    _check_bits(bits, GPTQ_PACK_BITS)
    return pack_int32(codes, bits, dim=-1).t().contiguous()


def unpack_gptq_qweight(qweight: torch.Tensor, bits: int, d_in: int | None = None) -> torch.Tensor:
    """GPTQ ``qweight`` ``[d_in*bits/32, d_out]`` -> codes ``(d_out, d_in)`` uint8.

    ``d_in`` defaults to ``rows * 32 / bits`` (which must then be an integer).
    """
    _check_bits(bits, GPTQ_PACK_BITS)
    if d_in is None:
        if qweight.dim() != 2 or (qweight.shape[0] * 32) % bits:
            raise ValueError(f"cannot infer d_in from qweight shape {tuple(qweight.shape)} at {bits} bits")
        d_in = qweight.shape[0] * 32 // bits
    return unpack_int32(qweight.t(), bits, d_in, dim=-1)


def pack_gptq_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored zero points ``(d_out, n_groups)`` -> GPTQ ``qzeros`` ``int32 [n_groups, ceil(d_out*bits/32)]``.

    Packs the values as given: apply the v1 ``zero - 1`` convention before calling (see :mod:`.gptq`).
    """
    _check_bits(bits, GPTQ_PACK_BITS)
    return pack_int32(zeros.t(), bits, dim=-1)


def unpack_gptq_qzeros(qzeros: torch.Tensor, bits: int, d_out: int) -> torch.Tensor:
    """GPTQ ``qzeros`` ``[n_groups, d_out*bits/32]`` -> stored zero points ``(d_out, n_groups)`` uint8."""
    _check_bits(bits, GPTQ_PACK_BITS)
    return unpack_int32(qzeros, bits, d_out, dim=-1).t().contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ----------------------------------------------------------------------------------------------------------------------


def to_ct_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes / zero points -> compressed-tensors' signed int8 representation ``value - 2**(bits-1)``."""
    _check_bits(bits)
    values = _as_unsigned_values(values, bits, "values")
    return (values.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def from_ct_signed(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors signed int8 values -> unsigned uint8 ``value + 2**(bits-1)`` (ValueError if out of range)."""
    _check_bits(bits)
    if not isinstance(values, torch.Tensor) or values.dtype.is_floating_point:
        raise ValueError("values must be an integer tensor")
    u = values.to(torch.int16) + (1 << (bits - 1))
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= (1 << bits)):
        raise ValueError(f"signed values out of the {bits}-bit range [{-(1 << (bits - 1))}, {(1 << (bits - 1)) - 1}]")
    return u.to(torch.uint8)


def pack_ct_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` ``(d_out, d_in)`` -> ``weight_packed`` ``int32 [d_out, ceil(d_in*bits/32)]`` (packed along d_in)."""
    return pack_int32(codes, bits, dim=-1)


def unpack_ct_weight(weight_packed: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """``weight_packed`` ``[d_out, ceil(d_in*bits/32)]`` -> unsigned codes ``(d_out, d_in)`` uint8."""
    return unpack_int32(weight_packed, bits, d_in, dim=-1)


def pack_ct_zero_point(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``zeros`` ``(d_out, n_groups)`` -> ``weight_zero_point`` ``int32 [ceil(d_out*bits/32), n_groups]`` (dim 0)."""
    return pack_int32(zeros, bits, dim=0)


def unpack_ct_zero_point(zero_point: torch.Tensor, bits: int, d_out: int) -> torch.Tensor:
    """``weight_zero_point`` ``[ceil(d_out*bits/32), n_groups]`` -> unsigned zero points ``(d_out, n_groups)``."""
    return unpack_int32(zero_point, bits, d_out, dim=0)

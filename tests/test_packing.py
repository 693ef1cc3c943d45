"""qwha_export.formats.packing: int32 bit packing, GPTQ words against a literal re-implementation of AutoGPTQ's
``QuantLinear.pack`` loop (written here independently of ``formats.packing``), compressed-tensors words against the
compressed-tensors library."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_formats import _random_qw

from qwha_export.formats.packing import (
    pack_ct_weight,
    pack_ct_zero_point,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    pack_int32,
    packed_words,
    to_ct_signed,
    unpack_ct_weight,
    unpack_ct_zero_point,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
    unpack_int32,
)


def _autogptq_pack_reference(intweight: np.ndarray, bits: int) -> np.ndarray:
    """Literal AutoGPTQ ``QuantLinear.pack`` row loop: ``intweight`` [rows(in), cols] -> packed [rows*bits/32, cols]."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 | 1 | 10 | 1 | 10
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# packing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(40, 192), (3, 33), (1, 1), (7, 32), (2, 0)])
def test_pack_int32_roundtrip(bits, shape):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    for dim in (-1, 0):
        p = pack_int32(v, bits, dim=dim)
        n = shape[1] if dim == -1 else shape[0]
        assert p.dtype == torch.int32 and p.is_contiguous()
        assert p.shape[dim] == packed_words(n, bits)
        back = unpack_int32(p, bits, n, dim=dim)
        assert back.dtype == torch.uint8 and torch.equal(back, v)


def test_pack_int32_known_words():
    # 4 bits: value j at bits 4j..4j+3 -> 0x87654321
    v = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_int32(v, 4).tolist() == [[0x87654321 - 2**32]]
    # 8 bits, sign bit set
    v = torch.tensor([[0x01, 0x02, 0x03, 0xFF]], dtype=torch.uint8)
    assert pack_int32(v, 8).tolist() == [[0xFF030201 - 2**32]]
    # 3 bits: value 10 straddles words 0/1 (stream bit 30), value 21 straddles words 1/2 (stream bit 63)
    v = torch.zeros(1, 32, dtype=torch.uint8)
    v[0, 10] = 0b101
    v[0, 21] = 0b011
    # word0 bit30 <- v10 bit0; word1 bit0 <- v10 bit2, bit31 <- v21 bit0; word2 bit0 <- v21 bit1
    assert pack_int32(v, 3).tolist() == [[1 << 30, 0x80000001 - 2**32, 1]]


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int32(torch.tensor([[16]], dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="integer"):
        pack_int32(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="words"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 8)
    with pytest.raises(ValueError, match="not supported"):
        pack_gptq_qweight(torch.zeros(2, 32, dtype=torch.uint8), 5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_packing_matches_autogptq_reference_loop(bits):
    d_out, d_in = 64, 192
    qw = _random_qw(d_out, d_in, bits, 32, seed=bits)
    ref_qweight = _autogptq_pack_reference(qw.codes.t().numpy(), bits)  # AutoGPTQ packs intweight = W_int.T
    got = pack_gptq_qweight(qw.codes, bits)
    assert got.shape == (d_in * bits // 32, d_out)
    assert np.array_equal(got.numpy(), ref_qweight)
    # qzeros: AutoGPTQ packs zeros.T ([n_groups, d_out]) column-block-wise == row loop on zeros ([d_out, n_groups])
    ref_qzeros = _autogptq_pack_reference(qw.zeros.numpy(), bits).T
    got_z = pack_gptq_qzeros(qw.zeros, bits)
    assert got_z.shape == (qw.n_groups, d_out * bits // 32)
    assert np.array_equal(got_z.numpy(), ref_qzeros)
    assert torch.equal(unpack_gptq_qweight(got, bits), qw.codes)
    assert torch.equal(unpack_gptq_qzeros(got_z, bits, d_out), qw.zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(40, 192), (33, 64), (64, 40)])
def test_ct_packing_matches_compressed_tensors_library(bits, shape):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    signed = to_ct_signed(v, bits)
    assert torch.equal(pack_ct_weight(v, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_ct_zero_point(v, bits), pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(unpack_from_int32(pack_ct_weight(v, bits), bits, torch.Size(shape)), signed)
    assert torch.equal(unpack_ct_weight(pack_to_int32(signed, bits), bits, shape[1]), v)
    assert torch.equal(unpack_ct_zero_point(pack_to_int32(signed, bits, packed_dim=0), bits, shape[0]), v)

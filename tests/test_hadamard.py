import hashlib

import pytest
import torch

from qwha_export.kernels import (
    PUBLISHED_ORDERS,
    SUPPORTED_ORDERS,
    hadamard_k,
    hadamard_matrix,
    hadamard_order,
    is_supported_size,
)

# SHA-256 of each reference matrix as "+"/"-" text, rows joined by newlines, trailing newline: the matrices used by
# the published QWHA code and QuaRot (Sloane's library), so adapters trained there stay valid here.
REFERENCE_DIGESTS = {
    12: "969dbb40d02b6325ae7cd3ba721153e270282b9cb4ec71ad50be5434d64fa462",
    20: "bd3febfd6d637142de8eb0a95b38d2d937b8d638bbcb583e58d7a5120db05901",
    28: "8b24c14f53d2d823bdb26f91298574eaa3c7a7be1f8dc958ce3023171f095eb5",
    36: "31180207ac6916ae73fb94e9d1b59c2151dd3e68226b87d609c13466e1fc405d",
    40: "d53d1b6efa05eaf2d9fa0f589274eb4cd23d747d2d3d8aae9b1677e7ce7061da",
    52: "b09945ddadc1d9ccf7a871bc350808ed6551e2de13523a15099457b432c89512",
    60: "eb568e43184ab1933e335a769ed01c130ef99eac3a08f420e256e508758a873c",
    108: "bcc8faf141eba6d59f26a0159b27c80f3d8e0f0bf87816f93d90977135fbde2a",
    140: "4d87e06ea4df3e910ca688d47cca8d799fc4bb196ac021ee6e15b22a06baefe1",
    156: "4d2f4179cd753e6438a96c6d1c51bae8b9abca7f02ab662a7ab8b66a6e4b5543",
    172: "f235a78cccb5a6ce1acc4208275dda1ef0040e05788b05c97a43feaa3555e862",
}


def _as_text(h: torch.Tensor) -> str:
    return "".join("".join("+" if v > 0 else "-" for v in row) + "\n" for row in h.tolist())


@pytest.mark.parametrize("order", sorted(REFERENCE_DIGESTS))
def test_published_orders_match_reference_digest(order):
    digest = hashlib.sha256(_as_text(hadamard_k(order)).encode()).hexdigest()
    assert digest == REFERENCE_DIGESTS[order], f"order {order} differs from the reference matrix"


def test_published_orders_all_listed():
    assert set(PUBLISHED_ORDERS) == set(REFERENCE_DIGESTS)
    assert set(PUBLISHED_ORDERS) <= set(SUPPORTED_ORDERS)


@pytest.mark.parametrize("order", SUPPORTED_ORDERS)
def test_every_supported_order_is_hadamard(order):
    h = hadamard_k(order).to(torch.int64)
    assert h.dtype == torch.int64 and set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.int64))


def test_generated_paley_orders_beyond_published():
    extra = set(SUPPORTED_ORDERS) - set(PUBLISHED_ORDERS) - {1}
    # Paley I (q = 3 mod 4) and Paley II (q = 1 mod 4) orders that are not published
    assert {44, 68, 84, 132, 164, 76, 124, 148} <= extra


@pytest.mark.parametrize(
    "n,expected",
    [
        (576, (36, 16)),
        (1536, (12, 128)),
        (3072, (12, 256)),
        (4096, (1, 4096)),
        (11008, (172, 64)),
        (14336, (28, 512)),
        (20, (20, 1)),
        (40, (40, 1)),
        (80, (40, 2)),
        (2560, (40, 64)),
        (13824, (108, 128)),
        (5120, (40, 128)),
        (1, (1, 1)),
        (44 * 8, (44, 8)),
        (12, (12, 1)),
        (24, (12, 2)),
    ],
)
def test_size_rule(n, expected):
    assert hadamard_order(n) == expected


@pytest.mark.parametrize("n", [22, 92 * 4, 7, 3 * 5 * 7 * 11, 0, -4])
def test_unsupported_size_raises_naming_n(n):
    with pytest.raises(ValueError, match=f"n={n}|{n}"):
        hadamard_order(n)
    assert not is_supported_size(n)


@pytest.mark.parametrize("n", [1, 8, 12, 96, 576, 1536, 40 * 4, 172 * 2])
def test_matrix_convention_kron_and_orthogonal(n):
    k, p = hadamard_order(n)
    m = hadamard_matrix(n, dtype=torch.float64)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    assert torch.equal(m, torch.kron(hadamard_k(k).double(), sylvester))
    assert torch.equal(m @ m.T, n * torch.eye(n, dtype=torch.float64))

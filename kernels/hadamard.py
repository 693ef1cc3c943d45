"""Deterministic Hadamard matrices, built by construction (nothing is stored).

Orders used by the published QWHA code and QuaRot (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172) are
reproduced entry for entry; further Paley orders (44, 68, 76, 84, 124, 132, 148, 164, ...) extend the set of
supported transform sizes.

Constructions:

* Paley I, order ``q + 1`` (``q`` prime, ``q = 3 mod 4``): row 0 is ``[+1, -1, ..., -1]``, column 0 below it
  is ``+1``, ``H[1+i][1+i] = +1`` and ``H[1+i][1+j] = chi_q((i - j) mod q)`` for ``i != j``.
* Paley II, order ``2(q + 1)`` (``q`` prime, ``q = 1 mod 4``): ``C`` of order ``q + 1`` with ``C[0][0] = 0``,
  ``C[0][j] = C[j][0] = +1``, ``C[1+i][1+j] = chi_q(i - j)``; ``H = [[C+I, C-I], [C-I, -C-I]]``.
* 40 = ``[[H20, H20], [H20, -H20]]``.
* Williamson array ``[[A,B,C,D],[-B,A,-D,C],[-C,D,A,-B],[-D,-C,B,A]]`` of symmetric circulants for 52, 156, 172.

Transform sizes are ``n = K * 2^m``; :func:`hadamard_order` picks ``K`` from the odd part of ``n``.
"""

from __future__ import annotations

from functools import cache, lru_cache

import torch

__all__ = [
    "PUBLISHED_ORDERS",
    "SUPPORTED_ORDERS",
    "hadamard_order",
    "hadamard_matrix",
    "hadamard_k",
    "is_supported_size",
]

PUBLISHED_ORDERS: tuple[int, ...] = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
# Largest order generated beyond the published ones (Paley I / II only).
_MAX_GENERATED_ORDER = 256

# Williamson halves a[0..(m-1)/2] of the symmetric circulant generators, "+" = +1, "-" = -1.
_WILLIAMSON: dict[int, tuple[str | None, str, str, str]] = {
    # m = 13: A = I - Q (Jacobsthal matrix of GF(13)), given by construction (None).
    52: (None, "+---+++", "++-+--+", "+----+-"),
    156: ("+++--+-+-----+--++--", "++++---+--++----+-+-", "+++--++-+---+-+--+--", "+---++-+-+-----+++-+"),
    172: (
        "+---++--++++-+-+++-++-",
        "++-++++++----+-+--++-+",
        "+++-+-++--+-+-++++-+--",
        "++---++++-+--+--++----",
    ),
}


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _chi(q: int) -> list[int]:
    """Legendre symbol chi_q(a) for a = 0..q-1 (chi(0) = 0)."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _paley1(q: int) -> torch.Tensor:
    chi = _chi(q)
    h = torch.empty(q + 1, q + 1, dtype=torch.int8)
    h[0, 0] = 1
    h[0, 1:] = -1
    h[1:, 0] = 1
    for i in range(q):
        for j in range(q):
            h[1 + i, 1 + j] = 1 if i == j else chi[(i - j) % q]
    return h


def _paley2(q: int) -> torch.Tensor:
    chi = _chi(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:] = 1
    c[1:, 0] = 1
    for i in range(q):
        for j in range(q):
            c[1 + i, 1 + j] = chi[(i - j) % q]
    eye = torch.eye(q + 1, dtype=torch.int8)
    return torch.cat([torch.cat([c + eye, c - eye], 1), torch.cat([c - eye, -c - eye], 1)], 0)


def _circulant_from_half(half: str) -> torch.Tensor:
    top = [1 if ch == "+" else -1 for ch in half]
    m = 2 * len(top) - 1
    first = top + [top[m - j] for j in range(len(top), m)]
    return _circulant(first)


def _circulant(first: list[int]) -> torch.Tensor:
    m = len(first)
    return torch.tensor([[first[(c - r) % m] for c in range(m)] for r in range(m)], dtype=torch.int8)


def _williamson(order: int) -> torch.Tensor:
    halves = _WILLIAMSON[order]
    m = order // 4
    if halves[0] is None:  # A = I - Q with Q the Jacobsthal matrix: a0 = +1, a_j = -chi_m(j)
        chi = _chi(m)
        a = _circulant([1] + [-chi[j] for j in range(1, m)])
    else:
        a = _circulant_from_half(halves[0])
    b, c, d = (_circulant_from_half(h) for h in halves[1:])
    rows = [[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]]
    return torch.cat([torch.cat(r, 1) for r in rows], 0)


def _odd_part(n: int) -> int:
    while n % 2 == 0:
        n //= 2
    return n


@cache
def _constructions() -> dict[int, object]:
    """Order -> builder, for every order we can make (published first, then generated Paley orders)."""
    builders: dict[int, object] = {}
    for order in PUBLISHED_ORDERS:
        if order in _WILLIAMSON:
            builders[order] = ("williamson", order)
        elif order == 40:
            builders[order] = ("double20", order)
        elif order in (28, 36):
            builders[order] = ("paley2", order // 2 - 1)
        else:
            builders[order] = ("paley1", order - 1)
    for order in range(4, _MAX_GENERATED_ORDER + 1, 4):
        if order in builders or _odd_part(order) == 1:
            continue
        if _is_prime(order - 1) and (order - 1) % 4 == 3:
            builders[order] = ("paley1", order - 1)
        elif order % 2 == 0 and _is_prime(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
            builders[order] = ("paley2", order // 2 - 1)
    return builders


@cache
def _order_by_odd_part() -> dict[int, tuple[int, ...]]:
    """Odd part -> candidate orders, most preferred first.

    Published orders own their odd part (so sizes map exactly as in the published code, with 40 before 20);
    other odd parts take their smallest generated order.
    """
    table: dict[int, tuple[int, ...]] = {}
    for order in PUBLISHED_ORDERS:
        odd = _odd_part(order)
        table[odd] = tuple(sorted(table.get(odd, ()) + (order,), reverse=True))
    for order in sorted(_constructions()):
        table.setdefault(_odd_part(order), (order,))
    return table


SUPPORTED_ORDERS: tuple[int, ...] = tuple(
    sorted({1} | {k for ks in _order_by_odd_part().values() for k in ks})
)


@cache
def hadamard_k(order: int) -> torch.Tensor:
    """The ``order x order`` Hadamard matrix of the construction above, as ``torch.int8`` (+1/-1).

    ``hadamard_k(1)`` is ``[[1]]``. Raises ``ValueError`` for an order we cannot build.
    """
    if order == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    kind = _constructions().get(order)
    if kind is None:
        raise ValueError(f"no Hadamard construction for order {order}; supported orders: {SUPPORTED_ORDERS}")
    name, arg = kind
    if name == "paley1":
        h = _paley1(arg)
    elif name == "paley2":
        h = _paley2(arg)
    elif name == "double20":
        h20 = hadamard_k(20)
        h = torch.cat([torch.cat([h20, h20], 1), torch.cat([h20, -h20], 1)], 0)
    else:
        h = _williamson(arg)
    h.requires_grad_(False)
    return h


def _is_pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


def hadamard_order(n: int) -> tuple[int, int]:
    """Split a transform size ``n = K * 2^m`` and return ``(K, 2^m)``.

    ``K`` is chosen by the odd part of ``n``: the published order for that odd part (40 before 20 when both fit),
    otherwise the smallest generated Paley order. Raises ``ValueError`` naming ``n`` when no ``K`` fits.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"transform size must be a positive integer, got {n!r}")
    for k in _order_by_odd_part().get(_odd_part(n), ()):
        if n % k == 0 and _is_pow2(n // k):
            return k, n // k
    if _is_pow2(n):
        return 1, n
    raise ValueError(
        f"no Hadamard transform of size n={n}: n must be K*2^m with K in {SUPPORTED_ORDERS}"
    )


def is_supported_size(n: int) -> bool:
    try:
        hadamard_order(n)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=16)
def _hadamard_matrix_int8(n: int) -> torch.Tensor:
    k, p = hadamard_order(n)
    sylvester = torch.ones(1, 1, dtype=torch.int8)
    while sylvester.shape[0] < p:  # H_{2p} = [[H_p, H_p], [H_p, -H_p]]
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    return torch.kron(hadamard_k(k), sylvester)


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``n x n`` +/-1 matrix ``M_n = H_K (x) H_{2^m}`` (Sylvester natural order, K the outer index).

    ``wht(x) == x @ hadamard_matrix(n).T`` and ``M_n @ M_n.T == n * I``.
    """
    return _hadamard_matrix_int8(n).to(dtype=dtype, device=device)

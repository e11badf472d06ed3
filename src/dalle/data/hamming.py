"""Hamming-space search over binary hashes without comparing all pairs (multi-index hashing).

Multi-index hashing (Norouzi, Punjani & Fleet, CVPR 2012): cut each B-bit hash into m disjoint
chunks. If two hashes differ in at most r bits, then by the pigeonhole principle at least one
chunk differs in at most floor(r / m) bits. So each chunk gets a sorted table, and a query looks up,
per chunk, every value within floor(r / m) bit flips of its own chunk; only those candidates get a
full Hamming distance. m is chosen from a cost model so that chunks have about log2(N) bits: a few
lookups per query and O(1) expected candidates each, i.e. near-linear total time, not N^2.
The search is exact: every pair within r is returned (tested against brute force).

Hashes are bool arrays [N, B]; internally they are packed into uint64 words [N, ceil(B/64)].
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np

_BLOCK = 8192  # queries per vectorised block (bounds memory)
_DIRECT_BITS = 22  # chunks up to this long get a direct-address table (2**22 offsets, 32 MiB)


def pack(bits: np.ndarray) -> np.ndarray:
    """bool [N, B] -> uint64 [N, ceil(B/64)] (zero padded)."""
    bits = np.asarray(bits, dtype=bool)
    n, b = bits.shape
    padded = np.zeros((n, -(-b // 64) * 64), dtype=bool)
    padded[:, :b] = bits
    return np.packbits(padded, axis=1, bitorder="little").view("<u8").reshape(n, -1)


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of packed hashes a [P, W] and b [P, W] -> int [P]."""
    return np.bitwise_count(a ^ b).sum(axis=-1, dtype=np.int64)


def _chunk_bounds(n_bits: int, m: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n_bits, m + 1).round().astype(int)
    return [(int(edges[k]), int(edges[k + 1])) for k in range(m)]


def _n_neighbours(length: int, radius: int) -> int:
    return sum(math.comb(length, k) for k in range(radius + 1))


def choose_chunks(n_bits: int, radius: int, n_items: int) -> int:
    """The number of chunks m minimising lookups + expected candidates per query."""
    best, best_cost = 1, math.inf
    for m in range(1, n_bits + 1):
        length = math.ceil(n_bits / m)
        if length > 62:
            continue
        lookups = _n_neighbours(length, radius // m)
        if lookups > 200_000:
            continue
        probe = 1.0 if length <= _DIRECT_BITS else 2.0 + math.log2(max(n_items, 2)) / 2  # binsearch
        cost = m * lookups * (probe + 2.0 * n_items / 2.0 ** length)  # a candidate: ~2 probes
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _chunk_values(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits [lo, hi) of packed hashes [N, W] as one uint64 per row."""
    out = np.zeros(len(words), dtype=np.uint64)
    pos = lo
    while pos < hi:
        word, off = divmod(pos, 64)
        take = min(hi - pos, 64 - off)
        part = (words[:, word] >> np.uint64(off)) & np.uint64((1 << take) - 1)
        out |= part << np.uint64(pos - lo)
        pos += take
    return out


def _unique_codes(codes: np.ndarray) -> np.ndarray:
    codes = np.sort(codes)
    return codes[np.concatenate(([True], codes[1:] != codes[:-1]))] if codes.size else codes


def _flip_masks(length: int, radius: int) -> np.ndarray:
    masks = [0]
    for k in range(1, radius + 1):
        masks += [sum(1 << i for i in combo) for combo in combinations(range(length), k)]
    return np.array(masks, dtype=np.uint64)


class _Table:
    """One chunk's table: rows grouped by chunk value; `ranges` finds a value's rows."""

    def __init__(self, values: np.ndarray, length: int) -> None:
        self.order = np.argsort(values, kind="stable")
        self.direct = length <= _DIRECT_BITS
        if self.direct:  # offsets by value: O(1) lookups
            counts = np.bincount(values.astype(np.int64), minlength=1 << length)
            self.starts = np.concatenate(([0], np.cumsum(counts)))
        else:
            self.sorted = values[self.order]

    def ranges(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first position in `order`, count) of each probed value."""
        if self.direct:
            p = probes.astype(np.int64)
            left = self.starts[p]
            return left, self.starts[p + 1] - left
        left = np.searchsorted(self.sorted, probes, side="left")
        return left, np.searchsorted(self.sorted, probes, side="right") - left


class MultiIndex:
    """Exact range search: all base hashes within `radius` bits of each query."""

    def __init__(self, bits: np.ndarray, radius: int) -> None:
        bits = np.asarray(bits, dtype=bool)  # [N, B]
        self.n, self.n_bits = bits.shape
        self.radius = radius
        self.words = pack(bits)  # [N, W]
        self.m = choose_chunks(self.n_bits, radius, max(self.n, 1))
        self.bounds = _chunk_bounds(self.n_bits, self.m)
        self.tables = []
        for lo, hi in self.bounds:
            table = _Table(_chunk_values(self.words, lo, hi), hi - lo)
            self.tables.append((table, _flip_masks(hi - lo, radius // self.m)))

    def query(self, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, base index, distance) of every pair within the radius."""
        bits = np.asarray(bits, dtype=bool)
        out = [self._query_block(bits[s:s + _BLOCK], s) for s in range(0, len(bits), _BLOCK)]
        if not out:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return tuple(np.concatenate(parts) for parts in zip(*out))  # type: ignore[return-value]

    def _query_block(self, bits: np.ndarray, offset: int) -> tuple[np.ndarray, ...]:
        words = pack(bits)  # [Q, W]
        qs, bs = [], []
        for (lo, hi), (table, masks) in zip(self.bounds, self.tables):
            probes = _chunk_values(words, lo, hi)[:, None] ^ masks[None, :]  # [Q, K]
            left, counts = table.ranges(probes.ravel())
            total = int(counts.sum())
            if total == 0:
                continue
            q_of_probe = np.repeat(np.arange(len(bits)), masks.size)  # [Q*K]
            starts = np.repeat(left - np.cumsum(counts) + counts, counts)  # [total]
            pos = starts + np.arange(total)
            qs.append(np.repeat(q_of_probe, counts))
            bs.append(table.order[pos])
        if not qs:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        pair = _unique_codes(np.concatenate(qs).astype(np.int64) * self.n + np.concatenate(bs))
        q, b = pair // self.n, pair % self.n
        d = distances(words[q], self.words[b])
        keep = d <= self.radius
        return q[keep] + offset, b[keep], d[keep]


def self_pairs(bits: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j of one set within `radius` bits: (i, j, distance)."""
    index = MultiIndex(bits, radius)
    q, b, d = index.query(bits)
    keep = q < b
    return q[keep], b[keep], d[keep]


def nearest_bruteforce(query_bits: np.ndarray, base_bits: np.ndarray, block: int = 8,
                       threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest base hash of every query: compares all Q x N pairs (blocks, threads).

    Small query blocks keep the [block, N] XOR in cache (8 rows: 5x faster than 256).
    """
    q_words, b_words = pack(query_bits), pack(base_bits)  # [Q, W], [N, W]
    idx = np.zeros(len(q_words), dtype=np.int64)
    dist = np.zeros(len(q_words), dtype=np.int64)

    def run(s: int) -> None:
        if b_words.shape[1] == 1:  # 64-bit hashes: popcounts fit uint8, no reduction
            d = np.bitwise_count(q_words[s:s + block, 0, None] ^ b_words[None, :, 0])  # [block, N]
        else:
            d = np.bitwise_count(q_words[s:s + block, None, :] ^ b_words[None, :, :]).sum(
                axis=-1, dtype=np.int64)  # [block, N]
        best = d.argmin(axis=1)
        idx[s:s + block], dist[s:s + block] = best, d[np.arange(len(d)), best]

    with ThreadPoolExecutor(max_workers=threads) as pool:  # numpy ufuncs release the GIL
        list(pool.map(run, range(0, len(q_words), block)))
    return idx, dist


def min_per_pair(a: np.ndarray, b: np.ndarray, d: np.ndarray, n_b: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the smallest distance of each (a, b) pair."""
    code = a.astype(np.int64) * n_b + b
    order = np.lexsort((d, code))
    code, d = code[order], d[order]
    first = np.concatenate(([True], code[1:] != code[:-1])) if code.size else np.zeros(0, bool)
    return code[first] // n_b, code[first] % n_b, d[first]


def pairs_multi(query_bits: np.ndarray, base_bits: np.ndarray, radius: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries [Q, B] against items with several hashes each [N, K, B] (e.g. crops).

    Returns (query, item, distance) for every query within `radius` of ANY hash of an item,
    with the smallest such distance.
    """
    n, k, n_bits = base_bits.shape
    if n == 0 or len(query_bits) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    q, flat, d = MultiIndex(base_bits.reshape(n * k, n_bits), radius).query(query_bits)
    return min_per_pair(q, flat // k, d, n)

"""Dedup: the multi-index search is exact; kept-only linking; overlap by hamming and cosine."""
from __future__ import annotations

import numpy as np
import pytest

from dalle.data import hamming
from dalle.data.dedup import clip_embedder, find_duplicates, find_overlap
from dalle.errors import CheckpointError, ConfigError


def _brute_pairs(bits: np.ndarray, radius: int) -> set[tuple[int, int]]:
    words = hamming.pack(bits)
    d = np.bitwise_count(words[:, None, :] ^ words[None, :, :]).sum(-1)
    i, j = np.nonzero(np.triu(d <= radius, 1))
    return set(zip(i.tolist(), j.tolist()))


def _with_near_copies(rng: np.random.Generator, n: int, n_bits: int, max_flips: int) -> np.ndarray:
    bits = rng.random((n, n_bits)) < 0.5
    copies = bits[rng.integers(0, n, n // 3)].copy()
    for row in copies:
        row[rng.choice(n_bits, int(rng.integers(0, max_flips + 1)), replace=False)] ^= True
    return np.concatenate([bits, copies])


@pytest.mark.parametrize("n_bits,radius", [(64, 6), (64, 0), (16, 3), (144, 10), (256, 20)])
def test_multi_index_finds_exactly_the_brute_force_pairs(n_bits, radius):
    bits = _with_near_copies(np.random.default_rng(n_bits + radius), 900, n_bits, radius + 2)
    i, j, d = hamming.self_pairs(bits, radius)
    assert set(zip(i.tolist(), j.tolist())) == _brute_pairs(bits, radius)
    assert (d <= radius).all()


def test_chunks_give_sublinear_candidates():
    assert hamming.choose_chunks(64, 6, 100_000) == 4  # 16-bit chunks, 1 flip each: 17 probes
    assert hamming.choose_chunks(64, 6, 1_000) > 1


def test_exact_then_near_duplicates_keep_the_first():
    rng = np.random.default_rng(0)
    base = rng.random((3, 64)) < 0.5
    near = base[0].copy()
    near[:3] ^= True
    bits = np.stack([base[0], base[1], base[0], near, base[2]])
    shas = ["a", "b", "a", "c", "d"]  # row 2 has row 0's pixels
    dup_of, kind = find_duplicates(shas, bits, threshold=4)
    assert dup_of == [None, None, 0, 0, None] and kind == [None, None, "exact", "near", None]


def test_chains_do_not_merge_distinct_images():
    a = np.zeros(64, bool)
    b = a.copy()
    b[:4] = True  # 4 from a
    c = b.copy()
    c[4:8] = True  # 4 from b, 8 from a
    dup_of, _ = find_duplicates(["a", "b", "c"], np.stack([a, b, c]), threshold=5)
    assert dup_of == [None, 0, None]  # c is near b, but b is not kept: c stays


def test_crop_hashes_match_either_way():
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 3, 64)) < 0.5  # two images, each: full hash + 2 crop hashes [K, B]
    y[0] = x[2]  # y (full) looks like a crop of x
    dup_of, kind = find_duplicates(["x", "y"], np.stack([x, y]), threshold=0)
    assert dup_of == [None, 0] and kind == [None, "near"]
    dup_of, _ = find_duplicates(["y", "x"], np.stack([y, x]), threshold=0)
    assert dup_of == [None, 0]


def test_hamming_overlap_nearest_and_flags():
    rng = np.random.default_rng(2)
    train = rng.random((500, 64)) < 0.5
    val = rng.random((40, 64)) < 0.5
    val[:10] = train[:10]
    val[:10, :5] ^= True  # 5 bits from train[:10]
    table = find_overlap([f"v{i}" for i in range(40)], val, [f"t{i}" for i in range(500)], train,
                         threshold=6, method="hamming")
    words_v, words_t = hamming.pack(val), hamming.pack(train)
    brute = np.bitwise_count(words_v[:, None] ^ words_t[None]).sum(-1)  # [V, T]
    assert (table["distance"].to_numpy() == brute.min(1)).all()
    assert table["overlap"].tolist() == (brute.min(1) <= 6).tolist()
    assert table["train_key"][:10].tolist() == [f"t{i}" for i in range(10)]
    assert table["overlap"][:10].all() and set(table["method"]) == {"hamming"}


def test_hamming_overlap_beyond_budget_is_null():
    rng = np.random.default_rng(3)
    train, val = rng.random((50, 64)) < 0.5, rng.random((5, 64)) < 0.5
    table = find_overlap(list("abcde"), val, [str(i) for i in range(50)], train, 2, "hamming",
                         max_exact_pairs=10)
    assert table["train_key"].isna().all() and table["distance"].isna().all()
    assert not table["overlap"].any()


def test_cosine_overlap_uses_embeddings():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(200, 16)).astype(np.float32)
    val = np.concatenate([train[:3] * 2.0 + 0.01, rng.normal(size=(5, 16))]).astype(np.float32)
    table = find_overlap([str(i) for i in range(8)], val, [f"t{i}" for i in range(200)], train,
                         threshold=0.95, method="cosine")
    assert table["overlap"].tolist() == [True] * 3 + [False] * 5
    assert table["train_key"][:3].tolist() == ["t0", "t1", "t2"]
    assert (table["distance"][:3] < 1e-3).all()


def test_embedding_hook_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="clip.safetensors does not exist; train the contrastive"):
        clip_embedder(tmp_path / "clip.safetensors")
    (tmp_path / "clip.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="truncated"):
        clip_embedder(tmp_path / "clip.safetensors")


def test_unknown_overlap_method():
    with pytest.raises(ValueError, match="unknown overlap method"):
        find_overlap([], np.zeros((0, 4)), [], np.zeros((0, 4)), 1, "euclid")

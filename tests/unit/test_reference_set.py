"""FID's real images read lazily from the clean val shards (`dalle.eval.reference`): the same
numbers as the decoded array, the no-overlap subset, an unreadable image skipped."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dalle.data.prepare import COLUMNS, _write_tar
from dalle.eval import fid
from dalle.eval.reference import blur_one, reference_sets
from tests.helpers import art_at


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def world(tmp_path):
    """12 val images in two shards; v03 and v07 overlap train; v10's bytes are not an image."""
    art = art_at(tmp_path)
    art.clean.mkdir(parents=True)
    images = (np.random.default_rng(0).random((12, 16, 16, 3)) * 255).astype(np.uint8)
    rows = []
    for shard, items in enumerate((range(6), range(6, 12))):
        _write_tar(art.clean_shard("val", shard), [
            {"__key__": f"v{i:02d}", "png": b"junk" if i == 10 else _png(images[i]), "txt": b"c"}
            for i in items])
        rows += [{"key": f"v{i:02d}", "caption": "c", "split": "val", "shard": shard, "index": j,
                  "width": 16, "height": 16, "source": "t"} for j, i in enumerate(items)]
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(art.clean_manifest)
    art.dedup.mkdir(parents=True)
    pd.DataFrame({"val_key": [f"v{i:02d}" for i in range(12)], "train_key": "t",
                  "distance": 0.0, "overlap": [i in (3, 7) for i in range(12)]}
                 ).to_parquet(art.overlap)
    return art, np.delete(images, 10, axis=0)


def _extractor() -> fid.Extractor:
    torch.manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 8)

    def encode(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, 8]
        return F.normalize(F.adaptive_avg_pool2d(x, 4).flatten(1) @ proj, dim=-1)

    return fid.clip_extractor(encode, F.normalize(torch.randn(5, 8), dim=-1), "test-ref", "fp")


def test_lazy_reference_gives_the_array_numbers(world, tmp_path):
    art, images = world
    refs = reference_sets(art, max_bad_fraction=0.1)
    assert len(refs["all"]) == 11 and refs["all"].shape == (11, 16, 16, 3)  # v10 skipped
    assert len(refs["no_overlap"]) == 9 and refs["no_overlap"].fingerprint != refs["all"].fingerprint
    for radius in (0.0, 2.0):
        lazy = torch.stack([refs["all"].blurred(radius)[i] for i in range(11)])
        assert torch.equal(lazy, torch.from_numpy(fid.blur(images, radius)).permute(0, 3, 1, 2))
    assert np.array_equal(blur_one(images[0], 1.0), fid.blur(images[:1], 1.0)[0])
    generated = images[::-1].copy()
    ext = _extractor()
    for radius in (0.0, 1.0):
        a = fid.fidelity(generated, refs["all"], radius, ext, "all", tmp_path / "cache")
        b = fid.fidelity(generated, images, radius, ext, "all", None)
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6) and a["is"] == pytest.approx(b["is"])
    kept = np.array([i not in (3, 7) for i in range(12) if i != 10])
    c = fid.fidelity(generated, refs["no_overlap"], 0.0, ext, "no_overlap", None)
    d = fid.fidelity(generated, images[kept], 0.0, ext, "no_overlap", None)
    assert c["fid"] == pytest.approx(d["fid"], rel=1e-6) and c["n_real"] == 9


def test_a_small_split_is_held_in_memory_with_the_same_items(world):
    """Under `loader.in_memory_max_mb` the first pass keeps the pixels: the same items, the same
    fingerprints and the same blurred tensors as the lazy path, and no shard read afterwards."""
    art, images = world
    lazy, held = reference_sets(art, 0.1, 0.0), reference_sets(art, 0.1, 1.0)
    assert lazy["all"].pixels is None and held["all"].pixels is not None
    for name in ("all", "no_overlap"):
        assert held[name].items == lazy[name].items and held[name].fingerprint == lazy[name].fingerprint
        for radius in (0.0, 2.0):
            a, b = held[name].blurred(radius), lazy[name].blurred(radius)
            assert all(torch.equal(a[i], b[i]) for i in range(len(a)))
    assert held["all"]._data is None and held["no_overlap"].blurred(1.0)._data is None
    kept = np.array([i not in (3, 7) for i in range(12) if i != 10])
    assert np.array_equal(held["no_overlap"].pixels, images[kept])


def test_an_empty_no_overlap_set_is_skipped_and_reported_not_fatal(world, caplog):
    """Every val image overlapping train (a world drawn from few scenes) leaves `no_overlap`
    empty: evaluate goes on with `all` and says why the other set is missing."""
    from dalle.eval.evaluate import usable

    art, _ = world
    ov = pd.read_parquet(art.overlap)
    ov["overlap"] = True
    ov.to_parquet(art.overlap)
    refs, skipped = usable(reference_sets(art, 0.1))
    assert list(refs) == ["all"] and len(refs["all"]) == 11
    assert skipped == {"no_overlap": "0 val images left (every other one overlaps train)"}
    assert "reference set no_overlap skipped" in caplog.text

"""FID/IS helpers (paper §3.1, fig. 9a): blur, torch-fidelity with both feature extractors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle.errors import CheckpointError, DataError
from dalle.eval import fid


def _images(n: int, seed: int, size: int = 16) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, size, size, 3)) * 255).astype(np.uint8)


def test_blur_keeps_radius_zero_and_smooths_otherwise():
    x = _images(4, 0)
    assert fid.blur(x, 0) is x
    y = fid.blur(x, 2)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert y.std() < 0.5 * x.std()  # noise is smoothed
    assert abs(float(y.mean()) - float(x.mean())) < 2.0  # brightness kept
    assert np.array_equal(fid.blur(np.full((1, 8, 8, 3), 77, np.uint8), 4), np.full((1, 8, 8, 3), 77))


def _extractor(tag: str) -> fid.Extractor:
    torch.manual_seed(0)
    proj = torch.randn(3 * 4 * 4, 8)

    def encode(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, 8]
        return F.normalize(F.adaptive_avg_pool2d(x, 4).flatten(1) @ proj, dim=-1)

    classes = F.normalize(torch.randn(5, 8), dim=-1)
    return fid.clip_extractor(encode, classes, f"test-{tag}", "fp")


def test_clip_backed_extractor_fid_is_zero_on_itself_and_records_the_extractor(tmp_path):
    ext = _extractor("a")
    real, other = _images(40, 1), _images(40, 2)
    other[..., 1:] //= 4  # a red cast: different statistics
    same = fid.fidelity(real, real, 0, ext, "all", tmp_path / "cache")
    diff = fid.fidelity(other, real, 0, ext, "all", tmp_path / "cache")
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)
    assert diff["fid"] > same["fid"] + 1e-2
    assert diff["extractor"] == "dalle-test-a" and diff["radius"] == 0 and diff["is"] >= 1.0
    names = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    fid.fidelity(other, real, 2, ext, "all", tmp_path / "cache")
    names2 = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(names2) > len(names)  # a new radius gets its own cache entry
    assert any("-r2" in n for n in names2) and any("-r0" in n for n in names)


def test_mismatched_sizes_and_tiny_sets_are_one_line():
    ext = _extractor("b")
    with pytest.raises(DataError, match="must have the same size"):
        fid.fidelity(_images(4, 0, 16), _images(4, 1, 8), 0, ext, "all", None)
    with pytest.raises(DataError, match="at least 2 images"):
        fid.fidelity(_images(1, 0), _images(4, 1), 0, ext, "all", None)


def _random_inception_weights(path) -> None:
    """torch-fidelity's Inception-v3 with random weights (the real ones cannot be downloaded)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    orig_url, orig_load = inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict
    inc.load_state_dict_from_url = lambda *a, **k: {}
    inc.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        torch.manual_seed(0)
        model = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        inc.load_state_dict_from_url, inc.FeatureExtractorInceptionV3.load_state_dict = orig_url, orig_load
    torch.save(torch.nn.Module.state_dict(model), path)


def test_inception_weights_by_path_and_wrong_architecture(tmp_path):
    weights = tmp_path / "pt_inception.pth"
    _random_inception_weights(weights)
    ext = fid.inception_extractor(weights)
    assert ext.kwargs["feature_extractor_weights_path"] == str(weights)
    out = fid.fidelity(_images(3, 0, 32), _images(3, 1, 32), 1, ext, "all", None, batch_size=3)
    assert out["extractor"] == "inception-v3-compat" and np.isfinite(out["fid"])
    wrong = tmp_path / "wrong.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), wrong)
    with pytest.raises(CheckpointError, match="is not Inception-v3 weights"):
        fid.inception_extractor(wrong)
    with pytest.raises(CheckpointError, match="does not exist"):
        fid.inception_extractor(tmp_path / "missing.pth")


def _counting_extractor(tag: str) -> tuple[fid.Extractor, list[int]]:
    seen: list[int] = []
    proj = torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(0))

    def encode(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, 8], counting images
        seen.append(len(x))
        return F.normalize(F.adaptive_avg_pool2d(x, 4).flatten(1) @ proj, dim=-1)

    return fid.clip_extractor(encode, F.normalize(torch.randn(5, 8), dim=-1), f"count-{tag}", "fp"), seen


def test_the_generated_set_is_extracted_once_across_reference_sets(tmp_path):
    """evaluate scores each generated set against 'all' and 'no_overlap': its features come from
    the cache the second time (keyed by extractor, fingerprint, the set's content and radius)."""
    ext, seen = _counting_extractor("gen")
    gen, all_val, no_overlap = _images(30, 3), _images(40, 4), _images(36, 5)
    first = fid.fidelity(gen, all_val, 1, ext, "all", tmp_path)
    assert sum(seen) == 30 + 40
    again = fid.fidelity(gen, no_overlap, 1, ext, "no_overlap", tmp_path)
    assert sum(seen) == 30 + 40 + 36  # only the new reference set was extracted
    assert again["is"] == first["is"]  # IS reads the same cached logits
    other = gen.copy()
    other[7, 0, 0, 0] ^= 1  # one pixel of one image: another set, extracted anew
    fid.fidelity(other, all_val, 1, ext, "all", tmp_path)
    assert sum(seen) == 30 + 40 + 36 + 30
    fid.fidelity(gen, all_val, 2, ext, "all", tmp_path)  # another radius: both anew
    assert sum(seen) == 30 + 40 + 36 + 30 + 70


def test_the_device_reaches_torch_fidelity(monkeypatch):
    import torch_fidelity

    calls = []
    fake = {"frechet_inception_distance": 1.0, "inception_score_mean": 1.0, "inception_score_std": 0.0}
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", lambda **kw: calls.append(kw) or fake)
    ext = _extractor("dev")
    for device in ("cpu", "cuda", torch.device("cuda", 1)):
        fid.fidelity(_images(4, 0), _images(4, 1), 0, ext, "all", None, device=device)
    assert [c["cuda"] for c in calls] == [False, True, True]


def test_the_content_hash_sees_every_image():
    images = _images(1000, 6, size=8)
    changed = images.copy()
    changed[1, 3, 3, 0] ^= 1  # outside the sampled fingerprint's stride
    assert fid.fingerprint(changed) == fid.fingerprint(images)  # why it is not used for generated sets
    assert fid.content_hash(changed) != fid.content_hash(images)

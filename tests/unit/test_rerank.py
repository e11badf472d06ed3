"""Reranking (paper §2.6): scoring, top-k, and real open_clip weights loaded from a local file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle.config_sections import Rerank
from dalle.errors import CheckpointError, DataError
from dalle.rerank import Reranker, from_open_clip, top_k

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _colour_reranker() -> Reranker:
    """Embeds an image by its mean colour and a caption by the colour it names."""
    def image(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.mean(dim=(2, 3)), dim=-1)  # [B, 3]

    def text(captions):
        return F.normalize(torch.tensor([COLOURS[c.split()[1]] for c in captions]).float(), dim=-1)

    return Reranker(image, text, name="colour", batch_size=2)


def _solid(rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (8, 8, 3))


def test_score_prefers_the_matching_image_and_top_k_orders_best_first():
    rr = _colour_reranker()
    images = np.stack([_solid(COLOURS["blue"]), _solid(COLOURS["red"]), _solid((200, 40, 40))])
    scores = rr.score(["a red square"] * 3, images)
    assert scores.shape == (3,) and scores.argmax() == 1
    assert scores[2] > scores[0]  # reddish beats blue
    assert top_k(np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]]), 2).tolist() == [[1, 2], [0, 1]]
    assert rr.score([], np.zeros((0, 8, 8, 3), np.uint8)).shape == (0,)
    with pytest.raises(DataError, match="2 captions for 3 images"):
        rr.score(["a red x", "a blue x"], images)


def _tiny_open_clip(tmp_path):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "dalle-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    return open_clip.create_model("dalle-tiny-test", pretrained=None).eval()


def test_open_clip_checkpoint_loads_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_open_clip(tmp_path)
    pt, st = tmp_path / "w.pt", tmp_path / "w.safetensors"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    images = (np.random.default_rng(0).random((2, 20, 20, 3)) * 255).astype(np.uint8)
    got = [from_open_clip(Rerank(clip_checkpoint=str(p), clip_arch="dalle-tiny-test"))
           .score(["a red circle", "a blue square"], images) for p in (pt, st)]
    assert got[0].shape == (2,) and np.allclose(got[0], got[1], atol=1e-5)
    assert np.all(np.abs(got[0]) <= 1.0 + 1e-5)  # cosine similarities


def test_open_clip_wrong_architecture_and_bad_files_are_one_line(tmp_path):
    model = _tiny_open_clip(tmp_path)
    wrong = tmp_path / "wrong.pt"
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}, wrong)
    with pytest.raises(CheckpointError, match="does not fit 'dalle-tiny-test'"):
        from_open_clip(Rerank(clip_checkpoint=str(wrong), clip_arch="dalle-tiny-test"))
    with pytest.raises(CheckpointError, match="does not exist"):
        from_open_clip(Rerank(clip_checkpoint=str(tmp_path / "nope.pt"), clip_arch="dalle-tiny-test"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not weights at all")
    with pytest.raises(CheckpointError, match="cannot be read as 'dalle-tiny-test' weights"):
        from_open_clip(Rerank(clip_checkpoint=str(junk), clip_arch="dalle-tiny-test"))
    with pytest.raises(CheckpointError, match="not an open_clip architecture"):
        from_open_clip(Rerank(clip_checkpoint=str(wrong), clip_arch="no-such-arch"))


def test_an_open_clip_directory_loads_with_its_own_config_and_preprocessing(tmp_path):
    """open_clip's local-dir layout: open_clip_config.json (model_cfg + preprocess_cfg) and a
    weights file, written here; the reranker must use the checkpoint's own mean/std, size and
    interpolation (the old loader hard-coded OpenAI's mean/std and bicubic resizing)."""
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    model = _tiny_open_clip(tmp_path)
    cfg = json.loads((tmp_path / "cfg" / "dalle-tiny-test.json").read_text())
    pre = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear", "resize_mode": "shortest"}
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "open_clip_model.safetensors"))
    reranker = from_open_clip(Rerank(clip_checkpoint=str(ckpt), clip_arch="ViT-B-32"))  # arch from the dir
    images = (np.random.default_rng(1).random((3, 40, 40, 3)) * 255).astype(np.uint8)
    got = reranker.image_features(images)  # [3, 16]
    ref_model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ckpt}")
    assert tuple(ref_model.visual.preprocess_cfg["mean"]) == (0.5, 0.5, 0.5)
    with torch.no_grad():
        want = F.normalize(ref_model.eval().encode_image(
            torch.stack([preprocess(Image.fromarray(a)) for a in images])), dim=-1)
        openai = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.tensor(
            open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        old = F.normalize(ref_model.encode_image(F.interpolate(openai, size=32, mode="bicubic")), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - old).abs().max() > 1e-2  # the hard-coded preprocessing gave other embeddings
    assert reranker.name == "open_clip:ckpt"
    scores = reranker.score(["a red circle"] * 3, images)
    assert scores.shape == (3,)
    (ckpt / "open_clip_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights file"):
        from_open_clip(Rerank(clip_checkpoint=str(ckpt), clip_arch="ViT-B-32"))


def test_order_candidates_for_the_cli_ranks_float_images_best_first():
    from dalle.rerank import order_candidates

    rr = _colour_reranker()
    imgs = torch.from_numpy(np.stack([_solid((0, 0, 255)), _solid((255, 0, 0)), _solid((200, 90, 90))]))
    floats = imgs.permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W] in [0, 1]
    assert order_candidates(rr, ["a red dot"] * 3, floats).tolist() == [1, 2, 0]

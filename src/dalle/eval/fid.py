"""FID and IS with torch-fidelity after a Gaussian blur of both image sets (paper §3.1, fig. 9a).

Two feature extractors:
* Inception-v3 (`inception-v3-compat`) from a local weights file (`evaluate.inception_weights`,
  passed as torch-fidelity's `feature_extractor_weights_path`; nothing can be downloaded here);
* otherwise the contrastive model's image encoder, registered with
  `torch_fidelity.register_feature_extractor`: "embedding" (normalised image embedding) for FID,
  "logits" (scaled similarity to a fixed set of class captions) for IS.
Every result records the extractor that produced it. Features run on `evaluate.device`; both
sets' features are cached per (extractor, its fingerprint, the set's content, radius): a changed
radius or set never reuses features, and a generated set scored against several reference sets
(all val images, val minus overlap) is extracted once.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from dalle.errors import CheckpointError, DataError

INCEPTION = "inception-v3-compat"
_CLIP_MODELS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]] = {}


@dataclass(frozen=True)
class Extractor:
    """Which features torch-fidelity uses, as keyword arguments of calculate_metrics."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""


def blur(images: np.ndarray, radius: float) -> np.ndarray:
    """Paper fig. 9(a): Gaussian filter of `radius` (sigma, pixels) over H and W of uint8 [N,H,W,3]."""
    if radius <= 0:
        return images
    out = gaussian_filter(images.astype(np.float32), sigma=(0, radius, radius, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ImageSet(torch.utils.data.Dataset):
    """uint8 [N, H, W, 3] -> items uint8 [3, H, W] (torch-fidelity's input format), blurred with
    `radius` as they are read: a set whose features come from the cache is never blurred."""

    def __init__(self, images: np.ndarray, radius: float = 0.0) -> None:
        self.images, self.radius = images, radius

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = blur(self.images[i:i + 1], self.radius)[0]  # [H, W, 3], as blur() of the whole set
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _clip_extractor_class() -> type:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ContrastiveFeatures(FeatureExtractorBase):
        """The reranker's image encoder as a torch-fidelity feature extractor."""

        def __init__(self, name: str, features_list: list[str], **kwargs: Any) -> None:
            super().__init__(name, features_list)
            self.encode, self.classes = _CLIP_MODELS[name]

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ("embedding", "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return "logits" if metric == "isc" else "embedding"

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> torch.Tensor:
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # the encoder returns [B, D] wherever its model lives; the features follow the input
            emb = self.encode(x.float().div(255.0)).to(x.device).double()  # [B, D]
            feats = {"embedding": emb, "logits": 100.0 * emb @ self.classes.to(x.device).double().t()}
            return tuple(feats[f] for f in self.features_list)

    return ContrastiveFeatures


def clip_extractor(encode_image: Callable[[torch.Tensor], torch.Tensor], class_embeddings: torch.Tensor,
                   model_name: str, fingerprint: str) -> Extractor:
    """Register (once per name) and describe an extractor backed by a contrastive image encoder.

    IS needs class logits: 100 x cosine similarity (CLIP's logit scale) to `class_embeddings`
    [C, D], the embeddings of a fixed list of class captions.
    """
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    name = "dalle-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model_name)
    _CLIP_MODELS[name] = (encode_image, class_embeddings.detach().float())
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, _clip_extractor_class())
    return Extractor(name, {"feature_extractor": name}, fingerprint)


def inception_extractor(weights: str | Path) -> Extractor:
    """torch-fidelity's Inception-v3 on a local weights file; checked without unpickling code."""
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"evaluate.inception_weights {path} does not exist")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means an unusable file
        raise CheckpointError(f"evaluate.inception_weights {path} is not a plain state dict "
                              f"({' '.join(str(exc).split())[:100]})") from None
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:  # torch-fidelity loads the path itself; a wrong architecture fails here, in one line
        FeatureExtractorInceptionV3(INCEPTION, ["2048"], feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise CheckpointError(f"evaluate.inception_weights {path} is not Inception-v3 weights: "
                              f"{first}") from None
    digest = hashlib.sha1(b"".join(k.encode() + v.numpy().tobytes()[:64]
                                   for k, v in sorted(state.items()))).hexdigest()[:12]
    return Extractor(INCEPTION, {"feature_extractor": INCEPTION,
                                 "feature_extractor_weights_path": str(path)}, digest)


def fingerprint(images: np.ndarray) -> str:
    """Short content hash of an image set (part of every feature cache name)."""
    h = hashlib.sha1(str(images.shape).encode())
    h.update(np.ascontiguousarray(images[:: max(1, len(images) // 256)]).tobytes())
    return h.hexdigest()[:12]


def content_hash(images: np.ndarray) -> str:
    """Hash of every pixel of a set: best-of-n sets for neighbouring n differ in a few images
    only, which a sampled fingerprint could miss (~1 GB/s)."""
    h = hashlib.blake2b(str(images.shape).encode(), digest_size=8)
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def check_pair(generated: np.ndarray, real: Any) -> None:
    if len(generated) < 2 or len(real) < 2:
        raise DataError(f"FID needs at least 2 images per side, got {len(generated)} generated "
                        f"and {len(real)} real")
    if generated.shape[1:] != real.shape[1:]:
        raise DataError(f"generated images are {generated.shape[1:]} but real val images are "
                        f"{real.shape[1:]}; they must have the same size [H, W, 3]")


def _real_set(real: Any, radius: float) -> tuple[torch.utils.data.Dataset, str]:
    """(blurred item dataset, content fingerprint) of uint8 [N, H, W, 3] or of a lazy set read
    from the shards (`dalle.eval.reference.RealImages`: `.blurred(r)`, `.fingerprint`)."""
    if isinstance(real, np.ndarray):
        return ImageSet(real, radius), fingerprint(real)
    return real.blurred(radius), real.fingerprint


def fidelity(generated: np.ndarray, real: Any, radius: float, extractor: Extractor,
             real_tag: str, cache_root: Optional[str | Path], batch_size: int = 64,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """FID + IS of blurred `generated` (uint8 [N, H, W, 3]) vs blurred `real` (the same, or a
    lazy set of the same shape), features extracted on `device`. Both sets' features are cached
    per (extractor, its weights' fingerprint, the set's content, radius): the generated set of a
    sweep is scored against every reference set but extracted once."""
    import torch_fidelity

    check_pair(generated, real)
    real_set, real_print = _real_set(real, radius)
    head = f"{extractor.name}-{extractor.fingerprint}"
    kwargs = dict(extractor.kwargs)
    if cache_root is not None:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        kwargs.update(cache=True, cache_root=str(cache_root),
                      input1_cache_name=f"{head}-generated-{content_hash(generated)}-r{radius:g}",
                      input2_cache_name=f"{head}-{real_tag}-{real_print}-r{radius:g}")
    else:
        kwargs.update(cache=False)
    out = torch_fidelity.calculate_metrics(
        input1=ImageSet(generated, radius), input2=real_set,
        fid=True, isc=True, isc_splits=max(1, min(10, len(generated) // 2)),
        cuda=torch.device(device).type == "cuda",
        batch_size=batch_size, verbose=False, samples_shuffle=False,
        save_cpu_ram=True, **kwargs)  # save_cpu_ram: no DataLoader workers for in-memory sets
    return {"fid": float(out["frechet_inception_distance"]),
            "is": float(out["inception_score_mean"]), "is_std": float(out["inception_score_std"]),
            "extractor": extractor.name, "radius": float(radius), "reference": real_tag,
            "n_generated": int(len(generated)), "n_real": int(len(real))}

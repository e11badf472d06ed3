"""What samples can reach at best on real drawings: the skin-tone check (dalle.eval.skin_tone) on
the val drawings that the toned evaluation captions name, as drawn and as the dVAE reconstructs
them (encode, argmax codes, decode: paper §2.2). A sample is decoded from the same codes, so the
reconstructions' score bounds the samples' one; the originals' score bounds the check itself."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import torch

from dalle.catalog import Artefacts
from dalle.data.reader import in_batches
from dalle.eval import skin_tone
from dalle.models.dvae import DiscreteVAE
from dalle.pixels import to_float, to_uint8


def toned_captions(frame: pd.DataFrame) -> dict[str, tuple[str, dict[str, Any]]]:
    """caption -> (combo kind, parsed spec) for the evaluation captions the skin-tone check reads."""
    out = {}
    for caption, combo, spec in zip(frame["caption"], frame["combo"], frame.get("spec", [None] * len(frame))):
        parsed = json.loads(spec) if isinstance(spec, str) else {}
        if parsed.get("check") == "skin_tone":
            out[str(caption)] = (str(combo), parsed)
    return out


@torch.no_grad()
def skin_tone_ceiling(art: Artefacts, dvae: DiscreteVAE, frame: pd.DataFrame,
                      max_bad_fraction: float) -> dict[str, float]:
    """{"skin_tone_drawn_<combo>": share of the val drawings read right, "skin_tone_recon_<combo>":
    the same on their dVAE reconstructions, "skin_tone_ceiling_n_<combo>": how many}; empty when
    no evaluation caption carries a skin-tone spec (the synthetic world)."""
    wanted = toned_captions(frame)
    if not wanted:
        return {}
    hits: dict[str, dict[str, list[bool]]] = {}
    for images, captions in in_batches(art, "val", 256, max_bad_fraction):  # uint8 [B, H, W, 3]
        pick = [i for i, c in enumerate(captions) if c in wanted]
        if not pick:
            continue
        recs = to_uint8(dvae.decode(dvae.encode(to_float(images[pick]))))  # [P, H, W, 3]
        for i, rec in zip(pick, recs):
            combo, spec = wanted[captions[i]]
            got = hits.setdefault(combo, {"drawn": [], "recon": []})
            got["drawn"].append(skin_tone.score(spec, images[i])["skin_tone"])
            got["recon"].append(skin_tone.score(spec, rec)["skin_tone"])
    out: dict[str, float] = {}
    for combo, got in sorted(hits.items()):
        out[f"skin_tone_drawn_{combo}"] = round(float(np.mean(got["drawn"])), 4)
        out[f"skin_tone_recon_{combo}"] = round(float(np.mean(got["recon"])), 4)
        out[f"skin_tone_ceiling_n_{combo}"] = len(got["drawn"])
    return out

"""The model-free reading of one image against its caption's spec, whichever check the spec names:
the synthetic world's oracle (`dalle.eval.oracle`) or the skin-tone check of real drawings
(`dalle.eval.skin_tone`, spec "check": "skin_tone"). `evaluate` scores samples with it and the
sample sheet frames them by it."""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from dalle.eval import skin_tone
from dalle.eval.oracle import score


def check(spec: Any, image: np.ndarray) -> Optional[dict[str, Any]]:
    """{attribute: read right, ..., "all_correct"} for uint8 [H, W, 3] `image`; None without a
    spec (None, "" or a parquet null such as pd.NA)."""
    if not isinstance(spec, str) or not spec:
        return None
    parsed = json.loads(spec)
    if parsed.get("check") == "skin_tone":
        found = skin_tone.score(parsed, image)
        return {**found, "all_correct": found["skin_tone"]}
    return score(parsed, image)

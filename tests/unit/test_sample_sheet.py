"""The sample sheet: captions beside their kept samples, with the oracle's verdict per sample."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from dalle.config import load_params
from dalle.data.synthetic import scene
from dalle.eval.sample_sheet import sheet_rows, verdict, write_sample_sheet
from tests.conftest import REPO


def _samples(tmp_path, n_captions: int = 3, keep: int = 2):
    data = load_params(REPO / "params.yaml").data
    rows, specs = [], {}
    (tmp_path / "images").mkdir()
    for kind in ("holdout", "seen"):
        for j in range(n_captions):
            cid = f"{kind}-{j:04d}"
            spec, text, _placed, img = scene(data.synthetic, data.image_size, j, 0)
            other = scene(data.synthetic, data.image_size, j + 100, 0)[3]  # a wrong picture
            specs[cid] = json.dumps(spec)
            for rank, picture in enumerate([img, other][:keep]):
                rel = f"images/{cid}_r{rank}.png"
                picture.save(tmp_path / rel)
                rows.append({"caption_id": cid, "caption": text, "combo": kind, "rank": rank,
                             "path": rel})
    return pd.DataFrame(rows), specs


def test_rows_put_seen_first_and_read_verdicts(tmp_path):
    index, specs = _samples(tmp_path)
    kinds = sheet_rows(index, specs, tmp_path, rows=2)
    assert list(kinds) == ["seen", "holdout"] and all(len(v) == 2 for v in kinds.values())
    first = kinds["seen"][0]
    assert first["wrong"][0] == [] and first["wrong"][1]  # the true picture right, the other not
    assert verdict(None, first["images"][0]) is None  # no spec (real data): no verdict


def test_sheet_is_written(tmp_path):
    index, specs = _samples(tmp_path)
    out = write_sample_sheet(tmp_path / "plots" / "samples.png", index, specs, tmp_path, 32)
    picture = Image.open(out)
    assert picture.width > 500 and picture.height > 200
    assert write_sample_sheet(tmp_path / "none.png", index.iloc[:0], specs, tmp_path, 32) is None
    assert not np.all(np.asarray(picture.convert("L")) == 255)

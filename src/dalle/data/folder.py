"""The `folder` source: local images with sidecar captions, or COCO-style caption files.

`data.folder.path` may be
* a directory of images (any depth) where `photo.jpg` has its caption in `photo.txt`;
* a directory of images (.svg drawings too, rendered by `dalle.data.vector`) and a caption table,
  `data.folder.captions`: a CSV with columns `file` (relative to the folder) and `caption`, and
  optionally `split` ("val" or "train" forces a row's split; empty: the hash split) and any other
  columns, which go into the sample's metadata (`dalle.data.openmoji` writes such a table);
* a COCO `captions_*.json` file, or a directory holding such files (top level or `annotations/`).
  One sample per image: the caption with the lowest annotation id; all captions in its metadata.
  Images are looked up next to the json, in `<root>/<split>/` (e.g. `val2017/`) and in `<root>/`;
  a `file_name` that is absolute or holds `..` is refused (the row's error `unsafe_path`), and so
  is any entry of the wrong shape (`bad_entry`); a null caption is no caption.

Rows are listed in a sorted, deterministic order; shard i holds rows [i * shard_size, ...), so a
rerun skips completed shards. Images are normalised by `dalle.data.images` in a thread pool.
A missing image or caption becomes a failed manifest row, never a crash.
"""
from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data
from dalle.data import shards
from dalle.data.source_common import check_resume, fingerprint, guard_row, shard_key, summarise
from dalle.data.images import IMAGE_EXTS, ImageRejected, process_image
from dalle.data.vector import VECTOR_EXTS, render_svg, resvg
from dalle.errors import DataError

log = logging.getLogger(__name__)
SOURCE = "folder"
_MAX_CAPTION = 1 << 20  # bytes read of a sidecar caption (the tokenizer keeps text_len tokens)


@dataclass(frozen=True)
class Row:
    image: Optional[Path]  # None when the image file was not found
    name: str  # path relative to the root (the manifest's `url`)
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    split: Optional[str] = None  # "train"/"val" from a caption table; None: the hash split


@dataclass(frozen=True)
class ImageOpts:
    """How a source's images are checked and stored (its section's image keys)."""

    min_side: int
    max_pixels: int
    image_format: str
    jpeg_quality: int

    @classmethod
    def of(cls, section: Any) -> "ImageOpts":
        return cls(section.min_side, section.max_pixels, section.image_format, section.jpeg_quality)


def _coco_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".json" else []
    found = sorted(root.glob("captions_*.json")) + sorted(root.glob("annotations/captions_*.json"))
    return found


def _coco_doc(path: Path) -> tuple[list, list]:
    """The `images` and `annotations` lists of a COCO caption file; one DataError line when the
    file is not JSON or they are not lists."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"COCO caption file {path} is not valid ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); expected 'images' and 'annotations'") from None
    if not isinstance(doc, dict):
        raise DataError(f"COCO caption file {path} holds a {type(doc).__name__}; expected an "
                        "object with 'images' and 'annotations'")
    for name in ("images", "annotations"):
        if not isinstance(doc.get(name), list):
            found = "nothing" if doc.get(name) is None else f"type {type(doc[name]).__name__}"
            raise DataError(f"COCO caption file {path}: {name!r} must be a list of objects, "
                            f"found {found}")
    return doc["images"], doc["annotations"]


def _id(value: Any) -> Optional[tuple[str, Any]]:
    """A COCO id as a dict key (ints and strings only; True is not the id 1)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return type(value).__name__, value
    return None


def unsafe_name(name: str) -> Optional[str]:
    """Why a relative file name from an input file may not be opened (None: it may): absolute,
    `..`, a drive, a NUL byte - it must stay inside the folder it is looked up in."""
    if "\x00" in name:
        return "contains a NUL byte"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in posix.split("/"):
        return "is absolute or contains '..'"
    return None


def _captions(annotations: list) -> dict[tuple[str, Any], list[str]]:
    """image id -> its captions in annotation-id order; a null, non-text or orphan caption is
    dropped (never stored as the text 'None')."""
    found: dict[tuple[str, Any], list[tuple[tuple, str]]] = {}
    for ann in annotations:
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            continue
        image_id, order = _id(ann.get("image_id")), _id(ann.get("id", 0)) or ("", "")
        if image_id is not None:
            found.setdefault(image_id, []).append((order, ann["caption"].strip()))
    return {k: [c for _, c in sorted(v, key=lambda e: e[0])] for k, v in found.items()}


def _coco_row(index: int, image: Any, captions: dict, dirs: list[Path], path: Path,
              split: str) -> Row:
    if not isinstance(image, dict):
        return Row(None, f"images[{index}]", "", {"coco_split": split},
                   f"bad_entry: images[{index}] is not an object ({type(image).__name__})")
    image_id, name = _id(image.get("id")), image.get("file_name")
    shown = name if isinstance(name, str) else f"images[{index}]"
    meta = {"coco_id": image.get("id") if image_id else None, "coco_split": split}
    if image_id is None or not isinstance(name, str) or not name:
        return Row(None, shown, "", meta, f"bad_entry: images[{index}] needs an int or string "
                                          "'id' and a 'file_name'")
    why = unsafe_name(name)
    if why is not None:
        return Row(None, name, "", meta, f"unsafe_path: file_name {name!r} {why}")
    caps = captions.get(image_id, [])
    meta["captions"] = caps
    found = next((d / name for d in dirs if (d / name).is_file()), None)
    error = None if found else f"missing_image: {name!r} not found near {path.name}"
    if found and not caps:
        error = f"no_caption: image id {image_id[1]!r} has no caption"
    return Row(found, name, caps[0] if caps else "", meta, error)


def _coco_rows(path: Path, root: Path) -> list[Row]:
    images, annotations = _coco_doc(path)
    split = path.stem.split("captions_", 1)[-1]  # e.g. "val2017"
    base = root if root.is_dir() else path.parent
    dirs = [path.parent, path.parent.parent / split, base / split, base]
    captions = _captions(annotations)
    order = sorted(range(len(images)), key=lambda i: (
        str(images[i].get("id")) if isinstance(images[i], dict) else "", i))
    return [_coco_row(i, images[i], captions, dirs, path, split) for i in order]


def _sidecar_rows(root: Path) -> list[Row]:
    rows = []
    exts = IMAGE_EXTS + VECTOR_EXTS
    images = (p for p in root.rglob("*") if p.suffix.lower() in exts and p.is_file())
    for image in sorted(images):
        name = image.relative_to(root).as_posix()
        txt = image.with_suffix(".txt")
        caption = _read_caption(txt) if txt.is_file() else ""
        why = "empty" if txt.is_file() else "missing"
        error = None if caption else f"no_caption: {why} {txt.name}"
        rows.append(Row(image, name, caption, {}, error))
    return rows


def _read_caption(txt: Path) -> str:
    """A sidecar caption (at most _MAX_CAPTION bytes; undecodable bytes become U+FFFD)."""
    try:
        with open(txt, "rb") as fh:
            return fh.read(_MAX_CAPTION).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""  # unreadable: the row fails as no_caption


TABLE_SPLITS = ("", "train", "val")


def read_table(path: Path) -> pd.DataFrame:
    """A caption table as strings (empty cells ""); one DataError line when it is malformed."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"caption table {path} is not a readable CSV ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:120]})") from None
    missing = [c for c in ("file", "caption") if c not in frame.columns]
    if missing:
        raise DataError(f"caption table {path} has no {' or '.join(map(repr, missing))} column "
                        f"(columns: {', '.join(map(str, frame.columns))[:120]})")
    if frame.empty:
        raise DataError(f"caption table {path} has no rows")
    twice = frame["file"][frame["file"].duplicated()]
    if len(twice):
        raise DataError(f"caption table {path} lists {twice.iloc[0]!r} more than once")
    splits = set(frame["split"]) - set(TABLE_SPLITS) if "split" in frame.columns else set()
    if splits:
        raise DataError(f"caption table {path}: split {sorted(splits)[0]!r} is not one of "
                        "train, val or empty")
    return frame


def table_rows(path: Path, root: Path) -> list[Row]:
    """The rows of a caption table, in the table's order; files are looked up under `root`."""
    frame = read_table(path)
    extra = [c for c in frame.columns if c not in ("file", "caption", "split")]
    rows = []
    for rec in frame.to_dict("records"):
        name, caption = rec["file"], rec["caption"].strip()
        meta = {c: rec[c] for c in extra}
        why = unsafe_name(name) if name else "is empty"
        image = None if why else root / name
        error = (f"unsafe_path: file {name!r} {why}" if why else
                 None if image.is_file() else f"missing_image: {name!r} not in {root}")
        if error is None and not caption:
            error = f"no_caption: {name!r} has an empty caption"
        rows.append(Row(image, name, caption, meta, error, rec.get("split") or None))
    return rows


def list_rows(path_str: Optional[str], captions: Optional[str] = None) -> list[Row]:
    """Every sample of the folder, in a deterministic order. DataError when there is none."""
    if not path_str:
        raise DataError("data.source is folder but data.folder.path is not set")
    root = Path(path_str)
    if not root.exists():
        raise DataError(f"data.folder.path {root} does not exist")
    if captions:
        table = Path(captions) if Path(captions).is_absolute() else root / captions
        if not table.is_file():
            raise DataError(f"caption table {table} (data.folder.captions) does not exist")
        return table_rows(table, root)
    coco = _coco_files(root)
    rows = [r for f in coco for r in _coco_rows(f, root)] if coco else (
        _sidecar_rows(root) if root.is_dir() else [])
    if not rows:
        raise DataError(f"data.folder.path {root} holds no images "
                        f"({', '.join(IMAGE_EXTS + VECTOR_EXTS)}) and no COCO captions_*.json")
    return rows


def load_sample(key: str, row: Row, size: int, opts: ImageOpts, source: str = SOURCE
                ) -> shards.Sample:
    """One row -> its sample; never raises (a failure is the row's error)."""
    return guard_row(lambda: _load(key, row, size, opts, source), key, row.caption, row.name,
                     source, opts.image_format)


def _load(key: str, row: Row, size: int, opts: ImageOpts, source: str) -> shards.Sample:
    meta = dict(row.meta, path=row.name)
    error = row.error
    if error is None and row.image is not None:
        try:
            data, original = row.image.read_bytes(), None
            if row.image.suffix.lower() in VECTOR_EXTS:
                data, original = render_svg(data, size)
            img = process_image(data, size, min_side=opts.min_side, max_pixels=opts.max_pixels,
                                fmt=opts.image_format, quality=opts.jpeg_quality)
            width, height = original or (img.original_width, img.original_height)
            meta.update(original_width=width, original_height=height)
            return shards.Sample(key=key, caption=row.caption, image_bytes=img.data, ext=img.ext,
                                 meta=meta, status="ok", error=None, url=row.name, source=source)
        except ImageRejected as exc:
            error = str(exc)
        except OSError as exc:
            error = f"unreadable: {exc.strerror or exc}"
    return shards.Sample(key=key, caption=row.caption, image_bytes=None, ext=opts.image_format,
                         meta=meta, status="failed", error=(error or "unknown")[:500],
                         url=row.name, source=source)


def collect_rows(rows: list[Row], data_cfg: Data, opts: ImageOpts, art: Artefacts, tracker: Any,
                 seed: int, source: str, workers: int) -> dict[str, Any]:
    """Rows -> the raw shards (resuming completed ones) + manifest; returns metrics. A row's
    `split` forces its split; the others split by key hash."""
    if any(r.image is not None and r.image.suffix.lower() in VECTOR_EXTS for r in rows):
        resvg()  # a missing renderer is one line before any shard, not a failed row per drawing
    out, size = art.raw, data_cfg.shard_size
    done = shards.completed_shards(out)
    by_hash = shards.split_fn(data_cfg, seed)
    forced = {shard_key(i // size, i % size, size): r.split for i, r in enumerate(rows) if r.split}
    split: Callable[[str], str] = lambda key: forced.get(key) or by_hash(key)  # noqa: E731
    todo = [i for i in range(-(-len(rows) // size)) if i not in done]
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(rows), desc=f"collect: {source}", unit="img") as bar:
        bar.update(len(rows) - sum(len(rows[i * size:(i + 1) * size]) for i in todo))
        for shard in todo:
            chunk = rows[shard * size:(shard + 1) * size]
            keys = [shard_key(shard, pos, size) for pos in range(len(chunk))]
            samples = list(pool.map(lambda k, r: load_sample(k, r, data_cfg.image_size, opts,
                                                             source), keys, chunk))
            shards.write_shard(out, shard, samples, split)
            bar.update(len(chunk))
    return summarise(art, len(rows), len(todo), tracker, source)


def collect_folder(data_cfg: Data, art: Artefacts, tracker: Any, seed: int) -> dict[str, Any]:
    """Folder/COCO/caption table -> the raw shards + manifest; returns metrics."""
    cfg = data_cfg.folder
    rows = list_rows(cfg.path, cfg.captions)
    inputs = [Path(str(cfg.path))] + ([Path(str(cfg.path)) / cfg.captions] if cfg.captions else [])
    check_resume(art.raw, fingerprint(data_cfg, cfg, inputs, seed))
    return collect_rows(rows, data_cfg, ImageOpts.of(cfg), art, tracker, seed, SOURCE,
                        cfg.workers)

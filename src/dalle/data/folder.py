"""The `folder` source: local images with sidecar captions, or COCO-style caption files.

`data.folder.path` may be
* a directory of images (any depth) where `photo.jpg` has its caption in `photo.txt`;
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
from typing import Any, Optional

from tqdm import tqdm

from dalle.catalog import Artefacts
from dalle.config_sections import Data
from dalle.data import shards
from dalle.data.source_common import check_resume, fingerprint, guard_row, shard_key, summarise
from dalle.data.images import IMAGE_EXTS, ImageRejected, process_image
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
    images = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
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


def list_rows(path_str: Optional[str]) -> list[Row]:
    """Every sample of the folder, in a deterministic order. DataError when there is none."""
    if not path_str:
        raise DataError("data.source is folder but data.folder.path is not set")
    root = Path(path_str)
    if not root.exists():
        raise DataError(f"data.folder.path {root} does not exist")
    coco = _coco_files(root)
    rows = [r for f in coco for r in _coco_rows(f, root)] if coco else (
        _sidecar_rows(root) if root.is_dir() else [])
    if not rows:
        raise DataError(f"data.folder.path {root} holds no images ({', '.join(IMAGE_EXTS)}) and "
                        "no COCO captions_*.json")
    return rows


def load_sample(key: str, row: Row, data_cfg: Data) -> shards.Sample:
    """One row -> its sample; never raises (a failure is the row's error)."""
    return guard_row(lambda: _load(key, row, data_cfg), key, row.caption, row.name, SOURCE,
                     data_cfg.folder.image_format)


def _load(key: str, row: Row, data_cfg: Data) -> shards.Sample:
    cfg = data_cfg.folder
    meta = dict(row.meta, path=row.name)
    error = row.error
    if error is None and row.image is not None:
        try:
            img = process_image(row.image.read_bytes(), data_cfg.image_size, min_side=cfg.min_side,
                                max_pixels=cfg.max_pixels, fmt=cfg.image_format,
                                quality=cfg.jpeg_quality)
            meta.update(original_width=img.original_width, original_height=img.original_height)
            return shards.Sample(key=key, caption=row.caption, image_bytes=img.data, ext=img.ext,
                                 meta=meta, status="ok", error=None, url=row.name, source=SOURCE)
        except ImageRejected as exc:
            error = str(exc)
        except OSError as exc:
            error = f"unreadable: {exc.strerror or exc}"
    return shards.Sample(key=key, caption=row.caption, image_bytes=None, ext=cfg.image_format,
                         meta=meta, status="failed", error=(error or "unknown")[:500],
                         url=row.name, source=SOURCE)


def collect_folder(data_cfg: Data, art: Artefacts, tracker: Any, seed: int) -> dict[str, Any]:
    """Folder/COCO -> the raw shards + manifest; returns metrics."""
    rows = list_rows(data_cfg.folder.path)
    out, size = art.raw, data_cfg.shard_size
    check_resume(out, fingerprint(data_cfg, data_cfg.folder, [Path(str(data_cfg.folder.path))], seed))
    done = shards.completed_shards(out)
    split_fn = shards.split_fn(data_cfg, seed)
    todo = [i for i in range(-(-len(rows) // size)) if i not in done]
    with ThreadPoolExecutor(max_workers=data_cfg.folder.workers) as pool, tqdm(
            total=len(rows), desc="collect: folder", unit="img") as bar:
        bar.update(len(rows) - sum(len(rows[i * size:(i + 1) * size]) for i in todo))
        for shard in todo:
            chunk = rows[shard * size:(shard + 1) * size]
            keys = [shard_key(shard, pos, size) for pos in range(len(chunk))]
            samples = list(pool.map(lambda k, r: load_sample(k, r, data_cfg), keys, chunk))
            shards.write_shard(out, shard, samples, split_fn)
            bar.update(len(chunk))
    return summarise(art, len(rows), len(todo), tracker, SOURCE)

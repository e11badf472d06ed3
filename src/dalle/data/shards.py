"""The shard layer every data source writes through: img2dataset's output layout.

`out_dir/{i:05d}.tar` holds webdataset members `key.png|key.jpg` (image), `key.txt` (caption) and
`key.json` (metadata); `out_dir/{i:05d}_stats.json` the shard's counts as img2dataset writes them;
`out_dir/{i:05d}.parquet` the shard's manifest rows, one per ATTEMPTED sample (failed ones too).
The parquet is written last and atomically: it is the shard's completion marker, so a killed
collect resumes by skipping the shards whose parquet exists. `finalize` concatenates the shard
manifests into the directory's manifest (`Artefacts.raw_manifest`).

Everything written is a function of the samples alone (fixed tar headers, no timestamps), so a
rerun of the same shard is byte-identical. `iter_tar` reads shards (ours or img2dataset's)
without extracting anything and refuses unsafe member names.
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import pandas as pd
from PIL import Image

from dalle.errors import DataError
from dalle.io import atomic_path, write_json

MANIFEST_COLUMNS = ("key", "caption", "source", "url", "status", "error", "sha256", "width",
                    "height", "split", "shard")
_DTYPES = {"key": "string", "caption": "string", "source": "string", "url": "string",
           "status": "string", "error": "string", "sha256": "string", "width": "int32",
           "height": "int32", "split": "string", "shard": "int32"}
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_SHARD_RE = re.compile(r"^(\d{5,})\.parquet$")

SplitFn = Callable[[str], str]


@dataclass
class Sample:
    """One attempted sample; `image_bytes` is None (and `error` set) when it failed."""

    key: str
    caption: str
    image_bytes: Optional[bytes]
    ext: str = "png"
    meta: dict = field(default_factory=dict)
    status: str = "ok"
    error: Optional[str] = None
    url: Optional[str] = None
    source: str = ""


@dataclass
class ShardStats:
    """img2dataset's `{i:05d}_stats.json` fields (without its wall-clock fields)."""

    count: int
    successes: int
    failed_to_download: int
    failed_to_resize: int
    status_dict: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "successes": self.successes,
                "failed_to_download": self.failed_to_download,
                "failed_to_resize": self.failed_to_resize, "status_dict": self.status_dict}


def shard_file(out_dir: str | Path, index: int, suffix: str) -> Path:
    """`out_dir/{index:05d}{suffix}`, e.g. suffix ".tar", ".parquet", "_stats.json"."""
    return Path(out_dir) / f"{index:05d}{suffix}"


def key_fraction(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the basis of the deterministic split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_fn(data_cfg: Any, seed: int) -> SplitFn:
    """key -> "val" when hash(seed, key) < data.val_fraction, else "train"."""
    fraction = float(data_cfg.val_fraction)
    return lambda key: "val" if key_fraction(key, seed) < fraction else "train"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed header: byte-identical reruns
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _image_size(data: bytes, key: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            return img.size
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad sample
        raise DataError(f"sample {key!r}: image bytes are not a readable image ({exc})") from None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")  # C0 and C1 controls, tab and newline included
_SURROGATE = re.compile("[\ud800-\udfff]")  # not Unicode scalar values: cannot be UTF-8 encoded


def clean_text(text: Any) -> str:
    """Text that can be stored: lone surrogates (a non-UTF-8 byte in a file name, a "\\ud800"
    escape in a JSON caption) become U+FFFD, like undecodable bytes do."""
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    return _SURROGATE.sub("\ufffd", text)


def clean_caption(sample: Sample) -> Sample:
    """Control characters (NUL, escape sequences' ESC, bell, newlines...) become one space, so a
    caption cannot drive a terminal that prints it; a caption of nothing else is a failed sample.
    Every text field is made storable (`clean_text`)."""
    caption = _CONTROL.sub(" ", clean_text(sample.caption)).strip()
    url = None if sample.url is None else clean_text(sample.url)
    error = None if sample.error is None else clean_text(sample.error)
    if (caption, url, error) == (sample.caption, sample.url, sample.error):
        return sample
    if not caption and sample.status == "ok":
        why = "only control characters" if clean_text(sample.caption).strip() else "empty caption"
        return replace(sample, caption="", url=url, status="failed", error=f"no_caption: {why}")
    return replace(sample, caption=caption, url=url, error=error)


def meta_json(meta: dict[str, Any]) -> bytes:
    """A sample's metadata as the bytes of its `.json` member: strict, storable JSON (a lone
    surrogate in any string becomes U+FFFD; json writes every non-BMP character as \\ud...)."""
    text = json.dumps(meta, sort_keys=True, default=str)
    if "\\ud" in text:
        raw = json.dumps(meta, sort_keys=True, default=str, ensure_ascii=False)
        text = json.dumps(json.loads(clean_text(raw)), sort_keys=True)
    return text.encode("utf-8")


def _row(sample: Sample, split: str, index: int) -> dict[str, Any]:
    data = sample.image_bytes
    ok = sample.status == "ok" and data is not None
    width = height = 0
    if data is not None and ok:
        width, height = _image_size(data, sample.key)
    return {"key": sample.key, "caption": sample.caption, "source": sample.source,
            "url": sample.url, "status": "ok" if ok else "failed",
            "error": None if ok else (sample.error or "failed: no image"),
            "sha256": hashlib.sha256(data).hexdigest() if data is not None and ok else None,
            "width": width, "height": height, "split": split, "shard": index}


def _with_meta(sample: Sample) -> tuple[Sample, bytes]:
    """(sample, its `.json` member); metadata that cannot be stored fails the sample instead."""
    meta = dict(sample.meta, key=sample.key, url=sample.url, caption=sample.caption)
    try:
        return sample, meta_json(meta)
    except (ValueError, TypeError, RecursionError) as exc:
        error = f"bad_metadata: cannot be stored as JSON ({type(exc).__name__})"
        return replace(sample, image_bytes=None, status="failed", error=error), b""


def manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> a DataFrame with exactly MANIFEST_COLUMNS and fixed dtypes."""
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return frame.astype(_DTYPES)


def write_shard(out_dir: str | Path, index: int, samples: Iterable[Sample],
                split_fn: SplitFn) -> ShardStats:
    """Write shard `index`: tar (ok samples), stats json, then atomically the parquet marker."""
    out = Path(out_dir)
    rows, seen = [], set()
    with atomic_path(shard_file(out, index, ".tar")) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in map(clean_caption, samples):
                if sample.key in seen or "/" in sample.key or "." in sample.key:
                    raise DataError(f"shard {index}: sample key {sample.key!r} is duplicated "
                                    "or contains '/' or '.'")
                seen.add(sample.key)
                meta = b""
                if sample.status == "ok" and sample.image_bytes is not None:
                    sample, meta = _with_meta(sample)
                row = _row(sample, split_fn(sample.key), index)
                rows.append(row)
                if row["status"] == "ok" and sample.image_bytes is not None:
                    ext = sample.ext.lower().lstrip(".")
                    _tar_member(tar, f"{sample.key}.{ext}", sample.image_bytes)
                    _tar_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
                    _tar_member(tar, f"{sample.key}.json", meta)
    frame = manifest_frame(rows)
    failed = frame.loc[frame["status"] != "ok", "error"].astype(str)
    kinds = failed.str.split(":").str[0].value_counts()
    stats = ShardStats(count=len(frame), successes=int((frame["status"] == "ok").sum()),
                       failed_to_download=int(len(failed) - kinds.get("failed_to_resize", 0)),
                       failed_to_resize=int(kinds.get("failed_to_resize", 0)),
                       status_dict={str(k): int(v) for k, v in sorted(kinds.items())})
    write_json(shard_file(out, index, "_stats.json"), stats.as_json())
    with atomic_path(shard_file(out, index, ".parquet")) as tmp:
        frame.to_parquet(tmp, index=False)
    return stats


def completed_shards(out_dir: str | Path) -> set[int]:
    """Indices of the shards whose parquet (the completion marker) exists."""
    out = Path(out_dir)
    if not out.is_dir():
        return set()
    found = (_SHARD_RE.match(p.name) for p in out.iterdir())
    return {int(m.group(1)) for m in found if m}


def finalize(out_dir: str | Path, manifest: Path) -> pd.DataFrame:
    """Concatenate the shard parquets (in index order) into the `manifest` file."""
    out = Path(out_dir)
    parts = [pd.read_parquet(shard_file(out, i, ".parquet")) for i in sorted(completed_shards(out))]
    frame = manifest_frame([]) if not parts else pd.concat(parts, ignore_index=True)
    frame = frame.astype(_DTYPES)
    with atomic_path(manifest) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame


def _check_member(tar_path: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{tar_path}: unsafe member name {name!r} (absolute or '..')")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{tar_path}: member {name!r} is a link or device, not a regular file")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first '.' of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


Record = tuple[str, Optional[str], Optional[bytes], Optional[str], dict]
MAX_SAMPLE_BYTES = 1 << 28  # default cap of one sample's members (data.webdataset.max_bytes)
MAX_MEMBERS = 64  # members of one sample (key.jpg, key.txt, key.json, ...)


@dataclass
class TarSample:
    """One sample of a tar shard; `error` ("<kind>: <detail>") when it cannot be used."""

    key: str
    ext: Optional[str]
    image: Optional[bytes]
    caption: Optional[str]
    meta: dict
    error: Optional[str] = None


def _sample(key: str, parts: dict[str, bytes], error: Optional[str]) -> TarSample:
    images = [e for e in parts if e in IMAGE_EXTS]
    ext = images[0] if images else ",".join(sorted(parts)) or None
    caption = parts["txt"].decode("utf-8", errors="replace") if "txt" in parts else None
    meta: Any = {}
    if error is None and "json" in parts:
        try:  # any failure to parse is this sample's error, not the shard's
            meta = json.loads(parts["json"])
            json.dumps(meta)  # (and it must be storable again)
            if not isinstance(meta, dict):
                error = f"bad_metadata: {key}.json is a {type(meta).__name__}, not an object"
        except (ValueError, TypeError, RecursionError) as exc:
            error = f"bad_metadata: {key}.json is not JSON ({type(exc).__name__}: {exc})"[:300]
        meta = meta if error is None else {}
    image = parts[images[0]] if images and error is None else None
    return TarSample(key, ext, image, caption, meta, error)


def read_samples(path: str | Path, max_bytes: int = MAX_SAMPLE_BYTES) -> Iterator[TarSample]:
    """Every sample of a tar (any compression), never extracting anything: unsafe member names
    and links are refused for the whole tar (DataError); a sample whose members exceed
    `max_bytes` in all (their declared size, so nothing is decompressed into memory past the
    cap) or number more than MAX_MEMBERS is kept as an error; so is unparsable metadata."""
    tar_path = Path(path)
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            key: Optional[str] = None
            parts: dict[str, bytes] = {}
            size, error = 0, None
            for member in tar:
                _check_member(tar_path, member)
                if member.isdir():
                    continue
                mkey, ext = _split_name(member.name)
                if key is not None and mkey != key:
                    yield _sample(key, parts, error)
                    parts, size, error = {}, 0, None
                key = mkey
                size += member.size
                if error is None and (size > max_bytes or len(parts) >= MAX_MEMBERS):
                    error = (f"too_large: members of {key} exceed {max_bytes} bytes"
                             if size > max_bytes else f"too_large: over {MAX_MEMBERS} members")
                    parts = {}
                if error is None:
                    handle = tar.extractfile(member)
                    parts[ext] = handle.read(member.size) if handle is not None else b""
            if key is not None:
                yield _sample(key, parts, error)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise DataError(f"{tar_path}: not a readable tar shard ({exc})") from None


def iter_tar(path: str | Path) -> Iterator[Record]:
    """Yield (key, ext, image_bytes|None, caption|None, meta) per sample; never writes anything
    (a sample `read_samples` refuses comes with no image)."""
    for sample in read_samples(path):
        yield sample.key, sample.ext, sample.image, sample.caption, sample.meta

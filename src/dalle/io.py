"""Atomic writes, safetensors checkpoints stored with their config, manifest helpers.

Nothing here ever unpickles: checkpoints are safetensors files whose metadata holds the model
config (JSON) and any non-tensor training state. A truncated file, a pickle or a checkpoint built
for another config becomes one `CheckpointError` line.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import re
import reprlib
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dalle.errors import CheckpointError, OutputError

CONFIG_KEY = "dalle.config"
STATE_KEY = "dalle.state"
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # mkstemp makes 0600 files; outputs get the usual mode
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:40] or "host"
_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother = 60, 60
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_HOST}.{os.getpid()}."


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs here (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_tmp(path: Path) -> None:
    """Remove temporaries of `path` left by a writer of this host that was killed (pid gone).

    A kill -9 between writing and renaming leaves `.<name>.<host>.<pid>.*.tmp`; without this a
    rerun would leave it inside the output (DVC would cache it with a directory output).
    """
    for old in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(_HOST)}.*.tmp"):
        pid = old.name[len(f".{path.name}.{_HOST}."):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _tmp_sibling(path: Path, is_dir: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path)
    maker = tempfile.mkdtemp if is_dir else tempfile.mkstemp
    made = maker(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    if not is_dir:
        os.close(made[0])
        made = made[1]
    return Path(made)


def tmp_sibling(path: Path) -> Path:
    """A new empty temporary file next to `path`, named so that a dead writer's is swept."""
    return _tmp_sibling(path)


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return OutputError(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is fsync'ed and renamed onto `path`."""
    final = Path(path)
    try:
        tmp = _tmp_sibling(final)
    except OSError as exc:
        raise _output_error(final, exc) from None
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _output_error(final, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` as a whole."""
    final = Path(path)
    try:
        tmp = _tmp_sibling(final, is_dir=True)
    except OSError as exc:
        raise _output_error(final, exc) from None
    try:
        yield tmp
        old = final.with_name(f".{final.name}.old")  # also one left by a run killed right here
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _output_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON (DVC metrics, curves, configs): NaN and infinities are written as null."""
    return write_text(path, json.dumps(strict_json(obj), indent=2, sort_keys=True,
                                       allow_nan=False) + "\n")


def strict_json(obj: Any) -> Any:
    """`obj` as plain JSON data with every non-finite number (NaN, inf) replaced by None."""
    text = json.dumps(obj, default=_json_default)
    return json.loads(text, parse_constant=lambda _name: None)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- checkpoints
def flatten_state(state: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Nested dict/list of tensors and plain values -> (flat tensors, JSON skeleton).

    Tensors are replaced in the skeleton by {"__tensor__": name}; everything else must be JSON.
    Used to store optimiser/EMA/scaler/RNG state in safetensors instead of a pickle.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().contiguous().cpu()
            return {"__tensor__": path}
        if isinstance(node, Mapping):
            return {"__map__": [[k, walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
            return {"__tuple__": items} if isinstance(node, tuple) else items
        return node

    skeleton = walk(dict(state), prefix or "state")
    return tensors, skeleton


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__map__" in node:
                return {k: walk(v) for k, v in node["__map__"]}
            if "__tuple__" in node:
                return tuple(walk(v) for v in node["__tuple__"])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def save_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    state: Mapping[str, Any] | None = None) -> Path:
    """Write weights (+ optional nested training state) and their config atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {CONFIG_KEY: json.dumps(dict(config), sort_keys=True, default=_json_default)}
    if state is not None:
        state_tensors, skeleton = flatten_state(state, prefix="__state__")
        clash = set(state_tensors) & set(flat)
        if clash:
            raise ValueError(f"state tensor names clash with weights: {sorted(clash)[:3]}")
        flat.update(state_tensors)
        metadata[STATE_KEY] = json.dumps(skeleton, default=_json_default)
    with atomic_path(path) as tmp:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # the Rust writer's I/O errors are not OSErrors
            full = "No space left" in str(exc) or "os error 28" in str(exc)
            raise OutputError(f"cannot write {path}: {'disk full' if full else ' '.join(str(exc).split())}") from None
        if state is not None:
            _keep_previous(Path(path))
    return Path(path)


def previous_path(path: str | Path) -> Path:
    """Where the last good training-state checkpoint is kept when a new one replaces it."""
    return Path(f"{path}.prev")


_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def _intact(path: Path) -> bool:
    """A complete safetensors file: its header length is sane, the header parses, and the file
    is as long as it says. Never raises (a header length of 2**64 is simply not intact)."""
    try:
        size_total = path.stat().st_size
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= min(_MAX_HEADER, size_total - 8):
                return False
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            return False
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in ends):
            return False
        return size_total == 8 + size + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
        return False


def _keep_previous(path: Path) -> None:
    """Before a training-state checkpoint is replaced, hard-link the intact one to `<path>.prev`
    (the path itself never goes missing); with no current one, a stale .prev is dropped."""
    prev = previous_path(path)
    if not path.exists():
        prev.unlink(missing_ok=True)
    elif _intact(path) and not (prev.exists() and os.path.samefile(path, prev)):
        link = _tmp_sibling(prev)  # (rename onto the same inode would be a no-op leaving `link`)
        link.unlink()
        os.link(path, link)
        os.replace(link, prev)


def remove_checkpoint(path: str | Path) -> None:
    """Delete a training-state checkpoint, its kept previous one and any temporary of either
    left by a killed writer (training finished)."""
    for file in (Path(path), previous_path(path)):
        file.unlink(missing_ok=True)
        sweep_stale_tmp(file)


class Unreadable(CheckpointError):
    """The file cannot be read as a dalle checkpoint (torn, tampered, unreadable): a training
    state falls back to its `.prev`; a config mismatch is a plain CheckpointError and never does."""


def _sniff(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise Unreadable(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if head[:2] in _PICKLE_MAGIC or head[:4] in _PICKLE_MAGIC:
        raise CheckpointError(f"{path} is a pickle/torch.save file, not safetensors; refusing to "
                              "unpickle it (convert it, e.g. `dalle dvae import-openai`)")
    if len(head) < 8:
        raise Unreadable(f"{path} is truncated ({len(head)} bytes)")


def load_checkpoint(path: str | Path, expected_config: Mapping[str, Any] | None = None,
                    with_state: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    """Read (weights, config, state). Raises CheckpointError on any problem, in one line.

    A training-state checkpoint (`with_state`) that cannot be read (torn, tampered, unreadable)
    falls back to `<path>.prev`, the previous good one kept by `save_checkpoint`, with a warning
    naming both; when that cannot be read either, the error says so."""
    try:
        return _load_checkpoint(Path(path), expected_config, with_state)
    except Unreadable as exc:
        prev = previous_path(path)
        if not with_state or not prev.is_file():
            raise
        try:
            loaded = _load_checkpoint(prev, expected_config, with_state)
        except CheckpointError as prev_exc:
            raise CheckpointError(f"{exc.one_line()}; the previous checkpoint cannot be used "
                                  f"either: {prev_exc.one_line()}") from None
        logging.getLogger("dalle.io").warning("%s; resuming from the previous checkpoint %s",
                                              exc.one_line(), prev)
        return loaded


def _metadata_json(path: Path, metadata: Mapping[str, str], key: str, what: str) -> Any:
    try:
        return json.loads(metadata[key])
    except (ValueError, TypeError, RecursionError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise Unreadable(f"{path}: its {what} ({key!r} in the metadata) is not valid JSON "
                         f"({reason})") from None


def _check_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = "weight" if not name.startswith("__state__") else "training-state tensor"
            raise Unreadable(f"{path}: {what} {name!r} holds NaN or infinite values")


def _load_checkpoint(path: Path, expected_config: Mapping[str, Any] | None,
                     with_state: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError,
            MemoryError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise Unreadable(f"{path} is truncated or not a safetensors checkpoint ({reason})") from None
    if CONFIG_KEY not in metadata:
        raise CheckpointError(f"{path} has no dalle config in its metadata (not written by dalle?)")
    config = _metadata_json(path, metadata, CONFIG_KEY, "model config")
    if not isinstance(config, dict):
        raise Unreadable(f"{path}: its model config ({CONFIG_KEY!r} in the metadata) is a "
                         f"{type(config).__name__}, not a mapping")
    if expected_config is not None:
        check_config(path, config, expected_config)
    _check_finite(path, flat)
    state = None
    weights = {k: v for k, v in flat.items() if not k.startswith("__state__")}
    if with_state and STATE_KEY in metadata:
        state_tensors = {k: v for k, v in flat.items() if k.startswith("__state__")}
        skeleton = _metadata_json(path, metadata, STATE_KEY, "training state")
        try:
            state = unflatten_state(state_tensors, skeleton)
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise Unreadable(f"{path}: its training state does not fit its tensors "
                             f"({type(exc).__name__}: {str(exc)[:80]})") from None
    return weights, config, state


def check_config(path: str | Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """One line naming the first key whose value differs between checkpoint and config."""
    if not isinstance(found, Mapping):
        raise Unreadable(f"{path}: its stored config is a {type(found).__name__}, not a mapping")
    for key in sorted(set(map(str, found)) | set(map(str, expected))):
        a, b = found.get(key, "<absent>"), expected.get(key, "<absent>")
        if json.dumps(a, sort_keys=True, default=_json_default) != json.dumps(
                b, sort_keys=True, default=_json_default):
            raise CheckpointError(f"{path} was built for a different config: {key} is "
                                  f"{_REPR.repr(a)} in the checkpoint but {_REPR.repr(b)} in params")

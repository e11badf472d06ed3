"""Seeded generators of hostile inputs for test_fuzz.py, one per input surface. Each takes a
`random.Random` and a case directory and returns what to run; nothing here runs anything."""
from __future__ import annotations

import copy
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from tests.integration.data_server import bomb_png
from tests.reliability.malformed_cases import png

ATOMS: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -10 ** 30, 0.0, -0.0,
    1e-320, 1e308, float("nan"), float("inf"), float("-inf"), "", " ", "0", "-1", "nan", ".inf",
    "1e999", "None", "null", "~", "yes", "\x00", "\ud800", "é", "😀", "a" * 5000, "../../etc/passwd",
    "/etc/passwd", "C:\\x", "{", "[", "!!python/object/apply:os.system ['true']", "&a [*a]", [], {},
    [1, [2, [3]]], {"a": {"b": None}}, [None] * 5, "2020-13-45", "0x10", "1_000", "١٢٣", "\x1b[31m",
]
JUNK = ["{", "}", "[", "]", ":", ": ", "- ", "\t", "\n", "'", '"', "&a", "*a", "!!", "!!binary x",
        "%YAML 1.1", "---", "...", "\x00", "\xff", "\ud800", "#", "|", ">", "? ", "@", "`", ",", "="]


def atom(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(ATOMS))


def junk_text(rng: random.Random, base: str = "") -> str:
    text = list(base)
    for _ in range(rng.randint(1, 4)):
        text.insert(rng.randint(0, len(text)), rng.choice(JUNK))
    return "".join(text)


# ------------------------------------------------------------------ params and overrides
def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _paths(value, prefix + (key,))
    return out


def mutate_params(rng: random.Random, raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(raw))
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict):
            continue
        roll = rng.random()
        if roll < 0.6:
            parent[path[-1]] = atom(rng)
        elif roll < 0.75:
            parent.pop(path[-1], None)
        elif roll < 0.9:
            parent[junk_text(rng, str(path[-1]))] = atom(rng)
        else:
            parent[path[-1]] = [parent.get(path[-1])]
    return raw


def params_text(rng: random.Random, raw: dict) -> str:
    try:
        text = yaml.safe_dump(mutate_params(rng, raw), allow_unicode=rng.random() < 0.5)
    except yaml.YAMLError:
        text = json.dumps(mutate_params(rng, raw))
    if rng.random() < 0.3:  # damage the text itself
        lines = text.splitlines()
        i = rng.randrange(len(lines))
        lines[i] = junk_text(rng, lines[i])
        text = "\n".join(lines)
    return text


def override(rng: random.Random, raw: dict) -> str:
    keys = [".".join(map(str, p)) for p in _paths(raw)]
    key = rng.choice(keys) if rng.random() < 0.8 else junk_text(rng, rng.choice(keys))
    value = atom(rng)
    text = (json.dumps(value) if not isinstance(value, str) or rng.random() < 0.3 else value)
    if rng.random() < 0.3:
        text = junk_text(rng, text)
    return f"{key}={text}" if rng.random() < 0.95 else key


def storable(text: str) -> str:
    """What a file can hold: a lone surrogate cannot even be written as UTF-8 (harness side)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# ------------------------------------------------------------------ caption tables (URL lists)
def url_table(rng: random.Random, case: Path, good: str) -> Path:
    schemes = ["http://", "https://", "ftp://", "file://", "", "HTTP://", "http:/", "javascript:"]
    hosts = [good.split("://", 1)[1], "127.0.0.1:1", "[::1", "127.0.0.1:99999", "", "localhost:0",
             "%00", "127.0.0.1:" + "9" * 30, "[::1]:1", "user:pw@127.0.0.1:1"]
    paths = ["/img/1", "/img/2.jpg", "/status/404", "/text", "/../../etc/passwd", "/\x00", "/é",
             "/\ud800", "/" + "a" * 3000, "", "?q=\n", "/bomb.png", "/tiny.png", "#frag"]
    rows = []
    for _ in range(rng.randint(1, 6)):
        good_row = rng.random() < 0.4
        url = (good + "/img/1") if good_row else rng.choice(schemes) + rng.choice(hosts) + rng.choice(paths)
        caption = rng.choice(["a red circle", "", "\x00\x1b[31m", "é\ud800", "a " * 3000, "\t\n",
                              str(atom(rng))])
        rows.append((storable(url), storable(caption)))
    frame = pd.DataFrame(rows, columns=rng.choice([["url", "caption"], ["link", "caption"], ["url", "text"],
                                                   ["url", "caption"]]))
    kind = rng.choice(["tsv", "csv", "parquet"])
    path = case / f"urls.{kind}"
    if kind == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if kind == "tsv" else ",", index=False)
    data = path.read_bytes()
    if rng.random() < 0.4:  # damage the bytes: truncate, or splice in junk
        cut = rng.randrange(len(data) + 1)
        data = data[:cut] + (bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
                             if rng.random() < 0.5 else b"")
        path.write_bytes(data)
    return path


# ------------------------------------------------------------------ COCO JSON
def coco_doc(rng: random.Random, case: Path) -> Path:
    root = case / "in"
    root.mkdir(parents=True)
    for i in range(2):
        (root / f"im{i}.png").write_bytes(png(i))
    names = ["im0.png"] * 4 + ["im1.png"] * 4 + ["/etc/hostname", "../x.png", "im0.png\x00", "é.png",
                                                 "", "\ud800", "a/" * 200 + "x.png", "nope.png"]
    ids = [1, 2] * 6 + ["1", "x", 1.5, True, None, [], {}, -1, 2 ** 70]
    captions = ["a caption"] * 8 + [None, 5, ["x"], "\ud800", "\x00\x07", "", "é"]
    images = [{"id": rng.choice(ids), "file_name": rng.choice(names)} if rng.random() < 0.9
              else atom(rng) for _ in range(rng.randint(0, 5))]
    anns = [{"id": rng.choice(ids), "image_id": rng.choice(ids), "caption": rng.choice(captions)}
            if rng.random() < 0.9 else atom(rng) for _ in range(rng.randint(0, 6))]
    if rng.random() < 0.7:  # mostly next to a good pair, so the rest is tried row by row
        images.insert(0, {"id": 1, "file_name": "im0.png"})
        anns.insert(0, {"id": 0, "image_id": 1, "caption": "a good caption"})
    doc: Any = {"images": images, "annotations": anns}
    if rng.random() < 0.2:
        doc[rng.choice(["images", "annotations"])] = atom(rng)
    if rng.random() < 0.1:
        doc = atom(rng)
    text = json.dumps(doc)
    if rng.random() < 0.2:
        text = junk_text(rng, text)
    (root / "captions_val.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    return root


# ------------------------------------------------------------------ webdataset members
def _member(rng: random.Random) -> tuple[str | bytes, bytes, str]:
    stem = rng.choice(["s0", "s1", "s2", "../up", "/abs", "d/e/f", "", "b\xe9d".encode("latin-1"),
                       "x" * 200, "k.k"])
    ext = rng.choice(["png", "jpg", "txt", "json", "cls", "", "PNG", "webp", "1.png"])
    name: str | bytes = (stem + b"." + ext.encode()) if isinstance(stem, bytes) else f"{stem}.{ext}"
    data = rng.choice([png(rng.randrange(9)), png(1)[:rng.randrange(60)], bomb_png(), b"",
                       b'{"url": "http://x/\\ud800", "n": 1}', b"[" * 5000, b"\xff\xfe", b"null",
                       b"a caption", os.urandom(rng.randrange(64))])
    kind = rng.choice(["file"] * 8 + ["symlink", "dir"])
    return name, data, kind


def webdataset_tar(rng: random.Random, case: Path) -> Path:
    case.mkdir(parents=True, exist_ok=True)
    mode = rng.choice(["w", "w", "w:gz", "w:bz2", "w:xz"])
    path = case / ("in.tar" + {"w": "", "w:gz": ".gz", "w:bz2": ".bz2", "w:xz": ".xz"}[mode])
    members = [("g0.png", png(1), "file"), ("g0.txt", b"a good one", "file")]
    members += [_member(rng) for _ in range(rng.randint(1, 6))]
    rng.shuffle(members)
    with tarfile.open(path, mode, format=rng.choice([tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT]),
                      encoding="utf-8", errors="surrogateescape") as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(data)
            try:
                tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
            except ValueError:  # a name this tar format cannot hold (harness side): left out
                continue
    if rng.random() < 0.25:
        data = path.read_bytes()
        path.write_bytes(data[:rng.randrange(len(data) + 1)])
    return path


# ------------------------------------------------------------------ checkpoint metadata
def _config_mutation(rng: random.Random, config: dict) -> dict:
    config = dict(config)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(list(config) + ["extra_key"])
        roll = rng.random()
        if roll < 0.6:
            config[key] = atom(rng)
        elif roll < 0.8:
            config.pop(key, None)
        else:
            config[key] = rng.choice([1, 2, 3, 4, 8, 16, 1 << 20, 0])
    return config


def checkpoint_mutation(rng: random.Random) -> Callable[[dict, dict], None]:
    """A mutation of (tensors, metadata) of a safetensors checkpoint."""
    def apply(tensors: dict, meta: dict) -> None:
        roll = rng.random()
        if roll < 0.45:
            config = json.loads(meta["dalle.config"])
            meta["dalle.config"] = json.dumps(_config_mutation(rng, config))
        elif roll < 0.6:
            meta["dalle.config"] = junk_text(rng, meta["dalle.config"])
        elif roll < 0.7:
            meta.pop("dalle.config")
        elif roll < 0.85:
            import torch

            name = rng.choice(sorted(tensors))
            tensors[name] = rng.choice([torch.zeros(3), torch.full_like(tensors[name], float("nan")),
                                        tensors[name].to(torch.float16), tensors[name].flatten()])
        else:
            tensors.pop(rng.choice(sorted(tensors)))
    return apply


def damage_file(rng: random.Random, path: Path) -> None:
    """Byte-level damage of a written checkpoint: header length, header bytes, truncation."""
    data = bytearray(path.read_bytes())
    roll = rng.random()
    if roll < 0.3:
        data[:8] = rng.choice([0, 1, 2 ** 41, 2 ** 64 - 1, len(data), len(data) - 9]).to_bytes(8, "little")
    elif roll < 0.6:
        for _ in range(rng.randint(1, 5)):
            data[rng.randrange(8, min(len(data), 400))] = rng.randrange(256)
    else:
        del data[rng.randrange(len(data)):]
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ CLI arguments
NUMBERS = ["nan", "inf", "-inf", "0", "-0", "-1", "1", "2", "1e400", "1e-400", "0x10", "", " 3",
           "١٢", "3.5", "99999999999999999999999", "1_0", "True", "\ud800", "+4", "0.5"]
FLAGS = ["--candidates", "--keep", "--temperature", "--top-k", "--top-p", "--prime-rows",
         "--batch-size", "--seed", "--prime", "--model", "-S", "--preset", "--bogus"]


def generate_argv(rng: random.Random, case: Path, params: Path) -> list[str]:
    argv = ["generate", rng.choice(["a red circle", "", "\x00", "\udcff", "é" * 300, "-x"]),
            "-o", str(case / rng.choice(["x.png", "", "sub/x.png", "x.png/"]))]
    for _ in range(rng.randint(0, 3)):
        flag = rng.choice(FLAGS)
        value = {"--prime": str(case / "nope.png"), "--model": str(case / "nope"),
                 "-S": rng.choice(["prior.n_layers={", "generate.keep=1", "x"]),
                 "--preset": rng.choice(["nope", "../../etc/passwd"])}.get(
                     flag, rng.choice(NUMBERS if rng.random() < 0.5 else ["1", "2", "0.5", "3"]))
        argv += [flag, value] if rng.random() < 0.95 else [flag]
    return argv + ["--params", str(params)] + (["--candidates", "2"] if rng.random() < 0.5 else [])


def other_argv(rng: random.Random, params: Path) -> list[str]:
    command = rng.choice([["config", "validate"], ["config", "show"], ["config"], [], ["nope"],
                          ["dvc-yaml", "--check", "--bogus"], ["generate"], ["--help-me"]])
    extra = [rng.choice(["--params", "--preset", "-S", "--x"]) for _ in range(rng.randint(0, 2))]
    return command + [a for e in extra for a in (e, rng.choice([str(params), "nope", "a=b", ""]))]


def stage_argv(rng: random.Random, params: Path) -> list[str]:
    """`python -m stages.<name>` arguments: flags, missing values, overrides of every kind."""
    argv: list[str] = []
    for _ in range(rng.randint(0, 4)):
        flag = rng.choice(["--params", "--preset", "-S", "--set", "--nope", "-X", "--params="])
        value = {"--params": rng.choice([str(params), str(params.parent), "/nonexistent", "", "\x00"]),
                 "--preset": rng.choice(["paper-12b", "nope", "", str(params)])}.get(
                     flag, override(rng, RAW_KEYS) if flag in ("-S", "--set") else junk_text(rng))
        argv += [flag, value] if rng.random() < 0.9 else [flag]
    return argv


RAW_KEYS: dict = {"data": {"source": 1, "folder": {"path": 1}}, "prior": {"n_layers": 1, "lr": 1},
                  "seed": 1, "tracking": {"enabled": 1}}

"""The inputs of the malformed-input table (test_malformed_inputs.py): each builder writes one bad
input into a case directory and returns (stage module, params overrides). Outcomes:
("error", needle): exit 1 and one `error:` line containing needle;
("skipped", kind): exit 0, and the bad sample's manifest row is `failed` with error kind `kind`;
("accepted", what): exit 0 and the sample kept, normalised as `what` says (legitimate images)."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from dalle.io import save_checkpoint
from tests.integration.data_server import bomb_png

Build = Callable[[Path], tuple[str, dict[str, Any]]]


def png(seed: int = 0, size: int = 32, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(buf, "PNG")
    return buf.getvalue()


def gif_animated() -> bytes:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


# ------------------------------------------------------------------ params
def params_case(overrides: dict[str, Any]) -> Build:
    return lambda case: ("stages.collect", overrides)


def bad_yaml(case: Path) -> tuple[str, dict[str, Any]]:
    return "stages.collect", {"__params_text__": "prior: [unclosed\n"}


# ------------------------------------------------------------------ folder of images + captions
def folder_case(files: dict[str, bytes]) -> Build:
    """A folder with two good pictures plus `files` (name -> bytes; captions as name.txt)."""
    def build(case: Path) -> tuple[str, dict[str, Any]]:
        root = case / "in"
        root.mkdir(parents=True)
        for i in range(2):
            (root / f"good{i}.png").write_bytes(png(i))
            (root / f"good{i}.txt").write_text(f"a good picture {i}")
        for name, data in files.items():
            (root / name).write_bytes(data)
        return "stages.collect", {"data.source": "folder", "data.folder.path": str(root),
                                  "data.folder.min_side": 16, "data.folder.image_format": "png"}
    return build


def bad_image(data: bytes, ext: str = "png") -> Build:
    return folder_case({f"bad.{ext}": data, "bad.txt": b"a bad picture"})


def bad_caption(caption: bytes) -> Build:
    return folder_case({"bad.png": png(7), "bad.txt": caption})


# ------------------------------------------------------------------ webdataset tars
def tar_case(member: str, kind: str = "file") -> Build:
    def build(case: Path) -> tuple[str, dict[str, Any]]:
        case.mkdir(parents=True, exist_ok=True)
        path = case / "input.tar"
        with tarfile.open(path, "w") as tar:
            for name, data in (("000.png", png(1)), ("000.txt", b"a picture")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo(member)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"evil"))
        return "stages.collect", {"data.source": "webdataset", "data.webdataset.paths": [str(path)],
                                  "data.webdataset.min_side": 16, "data.webdataset.image_format": "png"}
    return build


# ------------------------------------------------------------------ URL lists (file-level)
def url_file(text: bytes, name: str = "urls.tsv") -> Build:
    def build(case: Path) -> tuple[str, dict[str, Any]]:
        case.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(text)
        return "stages.collect", {"data.source": "url_list", "data.url_list.path": str(case / name)}
    return build


# ------------------------------------------------------------------ checkpoints
def dvae_file(data: Callable[[Path], None]) -> Build:
    """encode with models/dvae.safetensors replaced (clean data and tokenizer from the world)."""
    def build(case: Path) -> tuple[str, dict[str, Any]]:
        (case / "models").mkdir(parents=True, exist_ok=True)
        data(case / "models" / "dvae.safetensors")
        return "stages.encode", {"__world__": "encode"}
    return build


def truncated_copy(src: str) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        data = (Path(src)).read_bytes()
        dst.write_bytes(data[: len(data) // 3])
    return write


def pickle_file(dst: Path) -> None:
    torch.save({"encoder.blocks.input.w": torch.zeros(2)}, dst)  # what a .pt checkpoint is


def prior_resume_other_config(case: Path) -> tuple[str, dict[str, Any]]:
    (case / "models").mkdir(parents=True, exist_ok=True)
    save_checkpoint(case / "models" / "prior.ckpt.safetensors", {"w": torch.zeros(2)},
                    {"d_model": 999}, state={"step": 1})
    return "stages.train_prior", {"__world__": "train_prior"}

"""Round two, classes 6, 7, 12 (config side) and 13 (docs/reliability.md): `-S` overrides are
read like a params file, every numeric argument of `dalle generate` is checked (finite, in range)
before any work and the message names that argument, non-finite floats are refused in params, and
a prime image's size is checked from its header before a pixel is decoded."""
from __future__ import annotations

import io
import resource
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dalle import cli
from dalle.config import load_params
from dalle.runner import run_guarded
from stages.collect import STAGE as COLLECT
from tests.reliability.conftest import REPO, write_params
from tests.reliability.inprocess import seen

PARAMS = str(REPO / "params.yaml")


def _stage_with(tmp_path: Path, *overrides: str) -> str:
    params = write_params(tmp_path)
    argv = ["--params", str(params), *(a for o in overrides for a in ("-S", o))]
    return seen(lambda: COLLECT.main(argv)).clean_error()


# ------------------------------------------------------------------ class 6: overrides
@pytest.mark.parametrize("override,needle", [
    ("prior.n_layers={", "is not valid YAML"),  # listed
    ("k=!!python/object/apply:os.system ['touch /tmp/dalle-pwned']", "could not determine a constructor"),
    ("prior.n_layers=2020-13-45", "is not valid YAML: ValueError"),  # ours: an impossible date
    ("data.synthetic.holdout=" + "[" * 5000, "nested too deeply"),  # ours
    ("a..b=1", "is not a dotted params key"),  # ours
    ("prior.n_layers=many", "prior.n_layers: bad value 'many'"),  # the override is named
], ids=["unclosed", "python-tag", "bad-date", "deep", "bad-key", "bad-value"])
def test_a_bad_override_is_one_line(tmp_path: Path, override: str, needle: str) -> None:
    line = _stage_with(tmp_path, override)
    assert needle in line, line
    assert not Path("/tmp/dalle-pwned").exists()
    print(line)


# ------------------------------------------------------------------ class 12: finite floats
@pytest.mark.parametrize("override,key", [
    ("prior.lr=.inf", "prior.lr"),  # listed (as a params value)
    ("dvae.lr=.nan", "dvae.lr"),  # ours
    ("evaluate.blur_radii=[0, .inf]", "evaluate.blur_radii"),  # ours: inside a list
], ids=["prior-lr-inf", "dvae-lr-nan", "tuple-inf"])
def test_non_finite_params_are_refused(tmp_path: Path, override: str, key: str) -> None:
    line = _stage_with(tmp_path, override)
    assert key in line and "finite" in line, line


def test_non_finite_in_the_params_file_is_refused(tmp_path: Path) -> None:  # listed
    path = write_params(tmp_path, {"prior.lr": float("inf")})
    assert "lr: .inf" in path.read_text()
    line = seen(lambda: run_guarded(lambda: load_params(path))).clean_error()
    assert "prior.lr: bad value inf: input should be a finite number" in line, line


# ------------------------------------------------------------------ class 7: generate arguments
GENERATE_ARGS = [
    (["--temperature", "nan"], "--temperature"),  # listed
    (["--batch-size", "0"], "--batch-size"),  # listed
    (["--batch-size", "-1"], "--batch-size"),  # listed
    (["--seed", "100000000000000000000000"], "--seed"),  # listed
    (["--top-p", "1.5"], "--top-p"),  # ours
    (["--top-p", "inf"], "--top-p"),  # ours
    (["--top-k", "-1"], "--top-k"),  # ours
    (["--candidates", "0"], "--candidates"),  # ours
    (["--candidates", "2", "--keep", "3"], "--keep"),  # ours: the argument actually wrong
    (["--prime-rows", "0"], "--prime-rows"),  # ours
    (["--temperature", "1e400"], "--temperature"),  # ours: overflows to inf
]


@pytest.mark.parametrize("args,name", GENERATE_ARGS, ids=[" ".join(a) for a, _ in GENERATE_ARGS])
def test_generate_arguments_are_checked_before_any_work(tmp_path: Path, args: list[str], name: str) -> None:
    start = time.monotonic()
    out = seen(lambda: cli.main(["generate", "a red circle", "-o", str(tmp_path / "x.png"),
                                 "--params", PARAMS, *args]))
    line = out.clean_error()
    assert name in line and out.code in (1, 2), (out.code, line)
    assert time.monotonic() - start < 2.0  # nothing loaded
    assert not (tmp_path / "x.png").exists()
    print(line)


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:  # ours
    out = seen(lambda: cli.main(["generate", "a \udcff circle", "-o", str(tmp_path / "x.png"),
                                 "--params", PARAMS]))
    assert "not valid UTF-8" in out.clean_error()


# ------------------------------------------------------------------ class 13: --prime
def _big_png(width: int, height: int) -> bytes:
    """A real, decodable all-black PNG of width x height whose file is tiny (zlib of zeros)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    raw = zlib.compress(b"\0" * ((width + 1) * height), 9)  # greyscale, filter byte per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(12000, 12000), (17, 16)], ids=["12000x12000", "17x16"])
def test_a_prime_of_the_wrong_size_is_refused_from_its_header(world: Path, tmp_path: Path,
                                                             size: tuple[int, int]) -> None:
    prime = tmp_path / "prime.png"
    prime.write_bytes(_big_png(*size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = seen(lambda: cli.main(["generate", "a red circle", "-o", str(tmp_path / "x.png"),
                                 "--params", str(world / "params.yaml"), "--prime", str(prime)]))
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    line = out.clean_error()
    assert f"is {size[0]}x{size[1]}, expected 16x16" in line, line
    assert grew < 200_000, f"max RSS grew by {grew} KiB"  # decoding 12000x12000 would be 144 MB+
    print(f"{prime.stat().st_size} bytes: {line}")


def test_a_prime_of_the_right_size_still_works(world: Path, tmp_path: Path) -> None:
    prime = tmp_path / "prime.png"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "PNG")
    prime.write_bytes(buf.getvalue())
    out = seen(lambda: cli.main(["generate", "a red circle", "-o", str(tmp_path / "x.png"),
                                 "--params", str(world / "params.yaml"), "--prime", str(prime),
                                 "--prime-rows", "1", "--candidates", "2"]))
    assert out.code == 0 and (tmp_path / "x.png").is_file(), out.stderr[-2000:]

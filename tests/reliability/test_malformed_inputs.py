"""The malformed-input table: every case runs the real stage in a fresh child process (killer.run,
60 s limit) from an empty working directory; it must end as one `error:` line naming what is
wrong with exit 1, or exit 0 with the bad sample skipped and its reason recorded in the manifest
(or kept, for legitimate images that only need converting). Never a traceback, a hang or a file
written outside the case directory."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from dalle.io import save_checkpoint
from tests.integration.data_server import bomb_png, serve
from tests.reliability import killer
from tests.reliability import malformed_cases as M
from tests.reliability.conftest import copy_inputs, inputs_of, write_params

E, S, A = "error", "skipped", "accepted"
CASES: list[tuple[str, Any, tuple[str, str]]] = [
    # params: types, ranges, unknown keys, syntax
    ("params-type", M.params_case({"prior.n_layers": "many"}), (E, "prior.n_layers")),
    ("params-range", M.params_case({"dvae.group_count": 0}), (E, "dvae.group_count")),
    ("params-negative-size", M.params_case({"data.image_size": -5}), (E, "data.image_size")),
    ("params-unknown-key", M.params_case({"prior.n_layerz": 3}), (E, "prior.n_layerz")),
    ("params-bad-choice", M.params_case({"data.source": "ftp"}), (E, "data.source")),
    ("params-not-yaml", M.bad_yaml, (E, "not valid YAML")),
    # URL list files
    ("urls-missing-file", M.params_case({"data.source": "url_list", "data.url_list.path": "/nonexistent/u.tsv"}),
     (E, "does not exist")),
    ("urls-empty-file", M.url_file(b""), (E, "is empty")),
    ("urls-no-url-column", M.url_file(b"link\tcaption\nhttp://x/a.png\ta\n"), (E, "no column 'url'")),
    ("urls-binary-garbage", M.url_file(b"\x00\xff\xfe" * 50, "urls.parquet"), (E, "cannot be parsed")),
    # images (folder source): refused or converted
    ("image-zero-byte", M.bad_image(b""), (S, "not_an_image")),
    ("image-not-an-image", M.bad_image(b"<html>hello</html>"), (S, "not_an_image")),
    ("image-decompression-bomb-30k", M.bad_image(bomb_png()), (S, "decompression_bomb")),
    ("image-truncated", M.bad_image(M.png(3)[:200]), (S, "truncated")),
    ("image-cmyk-jpeg", M.bad_image(M.png(4, mode="CMYK", fmt="JPEG"), "jpg"), (A, "RGB")),
    ("image-16-bit", M.bad_image(M.png16()), (A, "RGB")),
    ("image-animated-gif", M.bad_image(M.gif_animated(), "gif"), (A, "first frame")),
    ("image-too-small", M.bad_image(M.png(5, size=8)), (S, "too_small")),
    # captions
    ("caption-empty", M.bad_caption(b""), (S, "no_caption")),
    ("caption-whitespace", M.bad_caption(b" \n\t "), (S, "no_caption")),
    ("caption-10kB", M.bad_caption(b"a red circle " * 800), (A, "kept; the tokenizer truncates to text_len")),
    ("caption-control-chars", M.bad_caption(b"a red\x00 circle\x1b[31m\x07"), (A, "control characters -> spaces")),
    ("caption-only-control-chars", M.bad_caption(b"\x00\x1b\x07"), (S, "no_caption")),
    ("caption-non-utf8", M.bad_caption(b"a caf\xe9 \xff\xfe sign"), (A, "undecodable bytes replaced")),
    # tar shards
    ("tar-dotdot", M.tar_case("../evil.png"), (E, "../evil.png")),
    ("tar-absolute", M.tar_case("/tmp/evil.png"), (E, "/tmp/evil.png")),
    ("tar-symlink", M.tar_case("link.png", "symlink"), (E, "link.png")),
    ("tar-not-a-tar", M.url_file(b"not a tar", "x"), (E, "")),  # replaced below
    # checkpoints
    ("ckpt-pickle", M.dvae_file(M.pickle_file), (E, "pickle")),
    ("ckpt-zero-byte", M.dvae_file(lambda p: p.write_bytes(b"")), (E, "truncated")),
    ("ckpt-garbage", M.dvae_file(lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")),
     (E, "not a safetensors")),
    ("ckpt-weights-other-config", M.dvae_file(lambda p: save_checkpoint(p, {"w": torch.zeros(2)}, {
        "vocab_size": 32, "n_hid": 8, "n_blk_per_group": 1, "group_count": 3, "input_channels": 3,
        "n_init": 8, "dec_n_hid": 8, "output_channels": 3, "image_size": 16})), (E, "dvae")),
    ("ckpt-resume-other-config", M.prior_resume_other_config, (E, "different config")),
]


def _not_a_tar(case: Path) -> tuple[str, dict[str, Any]]:
    case.mkdir(parents=True, exist_ok=True)
    (case / "input.tar").write_bytes(b"this is not a tar file" * 10)
    return "stages.collect", {"data.source": "webdataset", "data.webdataset.paths": [str(case / "input.tar")]}


CASES[[c[0] for c in CASES].index("tar-not-a-tar")] = ("tar-not-a-tar", _not_a_tar, (E, "input.tar"))


def _params(case: Path, world: Path, extra: dict[str, Any]) -> Path:
    if "__params_text__" in extra:
        path = case / "params.yaml"
        path.write_text(extra["__params_text__"])
        return path
    stage = extra.pop("__world__", None)  # the stage whose other inputs come from the world
    return copy_inputs(world, case, inputs_of(stage, world), extra) if stage else write_params(case, extra)


def _check_outcome(case: Path, out: killer.Outcome, expected: tuple[str, str]) -> str:
    kind, what = expected
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if kind == E:
        lines = re.findall(r"error: [^\r\n]*", out.stderr)
        assert out.exitcode == 1 and len(lines) == 1, (out.exitcode, out.stderr[-3000:])
        assert what in lines[0], lines[0]
        return lines[0]
    assert out.exitcode == 0, out.stderr[-3000:]
    manifest = pd.read_parquet(case / "raw" / "manifest.parquet")
    bad = manifest[manifest["url"].astype(str).str.startswith("bad.")]
    assert len(bad) == 1, manifest
    row = bad.iloc[0]
    if kind == S:
        assert row["status"] == "failed" and str(row["error"]).startswith(what), row.to_dict()
        return f"skipped: {row['error']}"
    assert row["status"] == "ok" and (manifest["status"] == "ok").sum() == 3, row.to_dict()
    assert not re.search(r"[\x00-\x1f\x7f-\x9f]", str(row["caption"])), row.to_dict()
    return f"accepted ({what}): {str(row['caption'])[:40]!r}"


@pytest.mark.parametrize("name,build,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(name: str, build: Any, expected: tuple[str, str], world: Path, tmp_path: Path) -> None:
    case = tmp_path / "case"
    case.mkdir()
    module, extra = build(case)
    params = _params(case, world, dict(extra))
    cwd = case / "cwd"
    before = sorted(p.name for p in tmp_path.iterdir())
    out = killer.run(module, ["--params", str(params)], tmp_path / "work", timeout=60, cwd=cwd)
    result = _check_outcome(case, out, expected)
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())  # nothing written to the working dir
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "work"})
    assert not [p for p in tmp_path.rglob("evil*")], "a tar member escaped"
    print(f"{name}: {result}")


# ------------------------------------------------------------------ URL rows against a real server
URL_ROWS = {  # path on the loopback server -> recorded error kind
    "/status/404": "http_404", "/text": "not_an_image", "/truncated.jpg": "truncated",
    "/huge": "too_large", "/bomb.png": "decompression_bomb", "/redirect-file": "bad_scheme",
    "/loop-a": "redirect_loop", "/slow": "timeout",
}
RAW_URLS = {"ftp://example.com/a.png": "bad_scheme", "file:///etc/passwd": "bad_scheme",
            "not a url": "bad_scheme", "http://": "bad_url"}


@pytest.fixture(scope="module")
def url_manifest(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    server_gen = serve(slow_s=4.0, huge_bytes=3_000_000)
    server = next(server_gen)
    try:
        case = tmp_path_factory.mktemp("url_rows")
        urls = [f"{server.base}/img/{i}" for i in range(2)] + [server.base + p for p in URL_ROWS] + list(RAW_URLS)
        frame = pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]})
        frame.to_csv(case / "urls.tsv", sep="\t", index=False)
        params = write_params(case, {"data.source": "url_list", "data.url_list.path": str(case / "urls.tsv"),
                                     "data.url_list.allow_private": True, "data.url_list.timeout_s": 1.5,
                                     "data.url_list.retries": 0, "data.url_list.max_bytes": 1_000_000,
                                     "data.url_list.min_side": 16, "data.url_list.image_format": "png"})
        out = killer.run("stages.collect", ["--params", str(params)], case / "work", timeout=120, cwd=case / "cwd")
        assert out.exitcode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
        manifest = pd.read_parquet(case / "raw" / "manifest.parquet")
        manifest["path"] = [u.replace(server.base, "") for u in manifest["url"].astype(str)]
        return manifest
    finally:
        next(server_gen, None)


@pytest.mark.parametrize("url,kind", [*URL_ROWS.items(), *RAW_URLS.items()])
def test_bad_url_row_is_skipped_with_reason(url_manifest: pd.DataFrame, url: str, kind: str) -> None:
    row = url_manifest[url_manifest["path"] == url].iloc[0]
    assert row["status"] == "failed" and str(row["error"]).startswith(kind), row.to_dict()
    assert (url_manifest["status"] == "ok").sum() == 2


def test_private_address_refused_unless_allowed(tmp_path: Path) -> None:
    server_gen = serve()
    server = next(server_gen)
    try:
        (tmp_path / "urls.tsv").write_text(f"url\tcaption\n{server.base}/img/1\ta picture\n")
        params = write_params(tmp_path, {"data.source": "url_list", "data.url_list.path": str(tmp_path / "urls.tsv")})
        out = killer.run("stages.collect", ["--params", str(params)], tmp_path / "work", timeout=60, cwd=tmp_path / "cwd")
    finally:
        next(server_gen, None)
    lines = re.findall(r"error: [^\r\n]*", out.stderr)
    assert out.exitcode == 1 and len(lines) == 1 and "private_address" in lines[0], out.stderr[-2000:]
    assert server.count("/img/1") == 0  # refused before connecting

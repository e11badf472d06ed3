"""url_list source against a real HTTP server on 127.0.0.1: every bad case, resume, bad lists."""
from __future__ import annotations

import io
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dalle.config_sections import Data
from dalle.data import shards
from dalle.data.url_list import collect_urls
from dalle.errors import DataError
from dalle.runner import run_guarded
from dalle.tracking import NullTracker
from tests.helpers import data_section, raw_art
from tests.integration.data_server import serve

SYNTH = {"n_images": 10, "min_objects": 1, "max_objects": 1, "jitter": 0.0, "background_tint": 0.0}


@pytest.fixture(scope="module")
def server():
    yield from serve(slow_s=6.0, huge_bytes=2_000_000)


def make_data(list_path: Path, shard_size: int = 8, **url_list) -> Data:
    cfg = {"path": str(list_path), "workers": 8, "timeout_s": 3.0, "retries": 1,
           "backoff_s": 0.01, "per_host": 8, "max_bytes": 1_000_000, "min_side": 16,
           "allow_private": True, "image_format": "png"}
    cfg.update(url_list)
    return data_section("url_list", image_size=32, shard_size=shard_size, val_fraction=0.2,
                        synthetic=SYNTH, url_list=cfg)


def write_list(path: Path, urls: list[str], sep: str = "\t") -> Path:
    pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}).to_csv(
        path, sep=sep, index=False)
    return path


def settled_count(server, path: str, expected: int, wait_s: float = 5.0) -> int:
    """Requests seen for `path`, waiting a little for server threads starved by a busy machine."""
    deadline = time.monotonic() + wait_s
    while server.count(path) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.count(path)


BAD_CASES = {  # path (or absolute URL) -> expected error kind
    "/status/404": "http_404",
    "/status/500": "http_500",
    "/slow": "timeout",
    "/text": "not_an_image",
    "/truncated.jpg": "truncated",
    "/tiny.png": "too_small",
    "/huge": "too_large",
    "/bomb.png": "decompression_bomb",
    "/redirect-file": "bad_scheme",
    "/loop-a": "redirect_loop",
    "ftp://127.0.0.1/x.jpg": "bad_scheme",
    "file:///etc/passwd": "bad_scheme",
    "no-scheme.example/x.jpg": "bad_scheme",
    "http://127.0.0.1:1/refused.jpg": "connection",
}


def test_every_url_gets_a_row_with_its_reason(server, tmp_path):
    good = [f"/img/{i}.jpg" for i in range(6)] + ["/flaky/7.jpg", "/redirect-ok/8.jpg"]
    urls = [u if "://" in u or not u.startswith("/") else server.base + u
            for u in good + list(BAD_CASES)]
    data = make_data(write_list(tmp_path / "list.tsv", urls))
    paths = raw_art(tmp_path / "raw")
    metrics = collect_urls(data, paths, NullTracker(), 0)
    manifest = pd.read_parquet(tmp_path / "raw" / "manifest.parquet")
    assert len(manifest) == len(urls) and manifest["key"].is_unique
    by_url = dict(zip(manifest["url"], zip(manifest["status"], manifest["error"])))
    for u in good:
        assert by_url[server.base + u][0] == "ok", by_url[server.base + u]
    for case, kind in BAD_CASES.items():
        url = case if "://" in case or not case.startswith("/") else server.base + case
        status, error = by_url[url]
        assert status == "failed" and str(error).startswith(kind + ":"), (case, error)
    assert metrics["ok"] == len(good) and metrics["failed"] == len(BAD_CASES)
    assert metrics["failed_timeout"] == 1
    assert settled_count(server, "/status/500", 2) == 2  # one retry on 5xx
    assert server.count("/status/404") == 1  # none on 4xx
    assert server.count("/etc/passwd") == 0
    for key, ext, image, caption, _meta in shards.iter_tar(tmp_path / "raw" / "00000.tar"):
        assert Image.open(io.BytesIO(image)).size == (32, 32) and caption.startswith("caption")


def test_private_addresses_need_opt_in(server, tmp_path):
    data = make_data(write_list(tmp_path / "list.tsv", [server.base + "/img/900.jpg"]),
                     allow_private=False)
    with pytest.raises(DataError, match="private_address"):
        collect_urls(data, raw_art(tmp_path / "raw"), NullTracker(), 0)
    assert server.count("/img/900.jpg") == 0


class Killed(Exception):
    pass


def test_killed_run_resumes_without_fetching_twice(server, tmp_path):
    urls = [f"{server.base}/img/{100 + i}.jpg" for i in range(20)]
    data = make_data(write_list(tmp_path / "list.csv", urls, sep=","), shard_size=4, retries=0,
                     timeout_s=20.0)  # a request count of 2 must mean a second download
    paths = raw_art(tmp_path / "raw")

    def kill_after_two(shard: int) -> None:
        if shard == 1:
            raise Killed()

    with pytest.raises(Killed):
        collect_urls(data, paths, NullTracker(), 0, on_shard_done=kill_after_two)
    assert shards.completed_shards(tmp_path / "raw") == {0, 1}
    assert not (tmp_path / "raw" / "manifest.parquet").exists()
    metrics = collect_urls(data, paths, NullTracker(), 0)
    manifest = pd.read_parquet(tmp_path / "raw" / "manifest.parquet")
    assert len(manifest) == 20 and (manifest["status"] == "ok").all()
    assert sorted(manifest["url"]) == sorted(urls) and manifest["key"].is_unique
    for url in urls[:8]:  # the completed shards: fetched exactly once
        assert server.count(url[len(server.base):]) == 1, url
    assert metrics["shards_written"] == 3


@pytest.mark.parametrize("content,name,match", [
    ("", "list.tsv", "is empty"),
    ("url\tcaption\n", "list.tsv", "no rows"),
    ("link\tcaption\nhttp://x/a.jpg\ta\n", "list.tsv", "no column 'url'"),
    ("url,caption\nhttp://x/a.jpg,a\n", "list.tsv", "comma-separated"),
    ("url\tcaption\nhttp://x/a.jpg\ta\n", "list.csv", "tab-separated"),
])
def test_malformed_lists_end_in_one_line(tmp_path, capsys, content, name, match):
    path = tmp_path / name
    path.write_text(content)
    data = make_data(path)
    with pytest.raises(SystemExit) as info:
        run_guarded(lambda: collect_urls(data, raw_art(tmp_path / "raw"), NullTracker(), 0))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1 and err[0].startswith("error: url list")
    assert match in err[0], err[0]
    assert not (tmp_path / "raw" / "manifest.parquet").exists()


def test_all_failed_is_an_empty_data_set(server, tmp_path):
    data = make_data(write_list(tmp_path / "list.tsv", [server.base + "/status/404"]))
    with pytest.raises(DataError, match="no image|none of 1"):
        collect_urls(data, raw_art(tmp_path / "raw"), NullTracker(), 0)
    assert not (tmp_path / "raw" / "manifest.parquet").exists()


def test_headerless_cc3m_list(server, tmp_path):
    path = tmp_path / "cc3m.tsv"
    path.write_text(f"a cat\t{server.base}/img/300.jpg\na dog\t{server.base}/img/301.jpg\n")
    data = make_data(path, header_names=["caption", "url"])
    metrics = collect_urls(data, raw_art(tmp_path / "raw"), NullTracker(), 0)
    assert metrics["ok"] == 2

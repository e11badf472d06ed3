"""kill -9 at 5 seeded points of every resumable stage, then rerun: the outputs equal an
uninterrupted run's (tensors, arrays, tables and bytes; only wall-clock fields of the metrics
json differ) and no temporary file is left behind. Kill points are events (an output commit or a
progress tick, see killer.py) drawn with a fixed seed from the events the uninterrupted run had."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd
import pytest

from tests.integration.data_server import serve
from tests.reliability import killer
from tests.reliability.compare import diff_trees, leftovers
from tests.reliability.conftest import copy_inputs, write_params

KILLS = 5


def kill_and_resume(module: str, make_root: "callable", outputs: Iterable[str], tmp: Path,
                    seed: int) -> list[int]:
    """Uninterrupted run, then KILLS killed+resumed runs; returns the kill points used."""
    outputs = list(outputs)
    base = make_root(tmp / "base")
    first = killer.run(module, ["--params", str(base / "params.yaml")], tmp / "base_work")
    assert first.exitcode == 0, first.stderr[-2000:]
    points = killer.kill_points(first.events, seed, KILLS)
    for k in points:
        root = make_root(tmp / f"kill{k}")
        argv = ["--params", str(root / "params.yaml")]
        killed = killer.run(module, argv, tmp / f"kill{k}_work", kill_at=k)
        assert killed.exitcode == -9, f"event {k}: exit {killed.exitcode} {killed.stderr[-1500:]}"
        again = killer.run(module, argv, tmp / f"kill{k}_rerun")
        assert again.exitcode == 0, f"rerun after kill at event {k}: {again.stderr[-2000:]}"
        assert diff_trees(base, root, outputs) == [], f"kill at event {k} of {first.events}"
        assert [f for o in outputs for f in leftovers(root / o)] == [], f"kill at event {k}"
    print(f"{module}: killed at events {points} of {first.events}, all resumed identically")
    return points


def _from_world(world: Path, parts: list[str], extra: dict | None = None) -> "callable":
    return lambda root: copy_inputs(world, root, parts, extra).parent


def test_collect_synthetic(tmp_path: Path) -> None:
    extra = {"data.synthetic.n_images": 32, "data.shard_size": 8}
    kill_and_resume("stages.collect", lambda root: write_params(root, extra).parent, ["raw", "metrics"],
                    tmp_path, seed=1)


@pytest.fixture(scope="module")
def server():
    yield from serve(slow_s=6.0, huge_bytes=200_000)


def test_collect_url_list(tmp_path: Path, server) -> None:  # noqa: ANN001
    urls = [f"{server.base}/img/{i}" for i in range(40)] + [
        f"{server.base}/status/404", f"{server.base}/tiny.png", f"{server.base}/redirect-file",
        f"{server.base}/truncated.jpg", f"{server.base}/redirect-ok/3"]
    table = tmp_path / "urls.tsv"
    pd.DataFrame({"url": urls, "caption": [f"picture number {i}" for i in range(len(urls))]}).to_csv(
        table, sep="\t", index=False)
    extra = {"data.source": "url_list", "data.url_list.path": str(table), "data.url_list.allow_private": True,
             "data.url_list.workers": 4, "data.url_list.timeout_s": 5.0, "data.url_list.retries": 0,
             "data.url_list.min_side": 16, "data.url_list.image_format": "png", "data.shard_size": 8}
    kill_and_resume("stages.collect", lambda root: write_params(root, extra).parent, ["raw", "metrics"],
                    tmp_path, seed=2)


def test_train_dvae(world: Path, tmp_path: Path) -> None:
    kill_and_resume("stages.train_dvae", _from_world(world, ["clean", "raw"]), ["models", "metrics"],
                    tmp_path, seed=3)


def test_encode(world: Path, tmp_path: Path) -> None:
    parts = ["clean", "raw", "models/dvae.safetensors", "models/dvae.json", "models/tokenizer.json"]
    kill_and_resume("stages.encode", _from_world(world, parts), ["tokens"], tmp_path, seed=4)


def test_train_prior(world: Path, tmp_path: Path) -> None:
    # BPE dropout off: `tokenizers` draws it from an unseeded thread RNG, so two UNINTERRUPTED runs
    # with dropout already differ (docs/reliability.md); everything else is compared bit for bit.
    parts = ["tokens", "models/tokenizer.json"]
    kill_and_resume("stages.train_prior", _from_world(world, parts, {"tokenizer.bpe_dropout": 0.0}),
                    ["models", "metrics", "plots"], tmp_path, seed=5)


def test_generate(world: Path, tmp_path: Path) -> None:
    parts = ["raw", "models/tokenizer.json", "models/dvae.safetensors", "models/prior.safetensors",
             "models/clip.safetensors", "models/clip.json"]
    kill_and_resume("stages.generate", _from_world(world, parts), ["samples"], tmp_path, seed=6)

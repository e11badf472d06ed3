"""kill -9 at 5 seeded points of every resumable stage, then rerun: the outputs equal an
uninterrupted run's (tensors, arrays, tables and bytes; only wall-clock fields of the metrics
json differ) and no temporary file is left behind. Kill points are events (an output commit or a
progress tick, see killer.py) drawn with a fixed seed from the events the uninterrupted run had.
The same with SIGTERM at 2 other seeded points of every stage: exit 143 with one `error:` line,
no process of the stage left alive, and the resumed outputs exactly as after a kill -9."""
from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Iterable

import pandas as pd
import pytest

from tests.integration.data_server import serve
from tests.reliability import killer
from tests.reliability.compare import diff_trees, leftovers
from tests.reliability.conftest import from_world, write_params

KILLS = 5
TERMS = 2  # SIGTERM points per stage (drawn with another seed)
SIGNALS = pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
EXIT = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}


def _check_stopped(out: killer.Outcome, sig: int, k: int, base: list[str]) -> None:
    assert out.exitcode == EXIT[sig], (f"event {k}: exit {out.exitcode} {out.stderr[-1500:]}; "
                                       f"events {out.log}, uninterrupted {base}")
    if sig != signal.SIGKILL:
        lines = re.findall(r"error: [^\r\n]*", out.stderr)
        assert len(lines) == 1 and signal.Signals(sig).name in lines[0], out.stderr[-1500:]
        assert "Traceback" not in out.stderr, out.stderr[-3000:]
        assert out.survivors == [], f"event {k}: processes left alive {out.survivors}"


def kill_and_resume(module: str, make_root: "callable", outputs: Iterable[str], tmp: Path,
                    seed: int, sig: int = signal.SIGKILL) -> list[int]:
    """Uninterrupted run, then KILLS killed (TERMS signalled) + resumed runs; returns the points."""
    outputs = list(outputs)
    base = make_root(tmp / "base")
    first = killer.run(module, ["--params", str(base / "params.yaml")], tmp / "base_work")
    assert first.exitcode == 0, first.stderr[-2000:]
    n, seed = (KILLS, seed) if sig == signal.SIGKILL else (TERMS, seed + 100)
    points = killer.kill_points(first.events, seed, n)
    for k in points:
        root = make_root(tmp / f"kill{k}")
        argv = ["--params", str(root / "params.yaml")]
        stopped = killer.run(module, argv, tmp / f"kill{k}_work", kill_at=k, sig=sig)
        _check_stopped(stopped, sig, k, first.log)
        again = killer.run(module, argv, tmp / f"kill{k}_rerun")
        assert again.exitcode == 0, f"rerun after kill at event {k}: {again.stderr[-2000:]}"
        assert diff_trees(base, root, outputs) == [], f"kill at event {k} of {first.events}"
        assert [f for o in outputs for f in leftovers(root / o)] == [], f"kill at event {k}"
    how = "killed" if sig == signal.SIGKILL else signal.Signals(sig).name
    print(f"{module}: {how} at events {points} of {first.events}, all resumed identically")
    return points


@SIGNALS
def test_collect_synthetic(tmp_path: Path, sig: int) -> None:
    extra = {"data.synthetic.n_images": 32, "data.shard_size": 8}
    kill_and_resume("stages.collect", lambda root: write_params(root, extra).parent, ["raw", "metrics"],
                    tmp_path, seed=1, sig=sig)


@pytest.fixture(scope="module")
def server():
    yield from serve(slow_s=6.0, huge_bytes=200_000)


@SIGNALS
def test_collect_url_list(tmp_path: Path, server, sig: int) -> None:  # noqa: ANN001
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
                    tmp_path, seed=2, sig=sig)


@SIGNALS
def test_train_dvae(world: Path, tmp_path: Path, sig: int) -> None:
    kill_and_resume("stages.train_dvae", from_world(world, "train_dvae"), ["models", "metrics"],
                    tmp_path, seed=3, sig=sig)


@SIGNALS
def test_train_dvae_streaming(world: Path, tmp_path: Path, sig: int) -> None:
    """The streaming path (a DataLoader worker decoding the clean shards in the seeded order),
    killed mid-epoch and resumed at its step: the same weights as an uninterrupted run, bit for
    bit, so no sample was read twice or skipped."""
    streaming = {"loader.in_memory_max_mb": 0, "loader.workers": 1, "loader.chunk": 16}
    kill_and_resume("stages.train_dvae", from_world(world, "train_dvae", streaming),
                    ["models", "metrics"], tmp_path, seed=7, sig=sig)


@SIGNALS
def test_encode(world: Path, tmp_path: Path, sig: int) -> None:
    kill_and_resume("stages.encode", from_world(world, "encode"), ["tokens"], tmp_path, seed=4, sig=sig)


@SIGNALS
def test_train_prior(world: Path, tmp_path: Path, sig: int) -> None:
    # BPE dropout off: `tokenizers` draws it from an unseeded thread RNG, so two UNINTERRUPTED runs
    # with dropout already differ (docs/reliability.md); everything else is compared bit for bit.
    kill_and_resume("stages.train_prior", from_world(world, "train_prior", {"tokenizer.bpe_dropout": 0.0}),
                    ["models", "metrics", "plots"], tmp_path, seed=5, sig=sig)


@SIGNALS
def test_generate(world: Path, tmp_path: Path, sig: int) -> None:
    kill_and_resume("stages.generate", from_world(world, "generate"), ["samples"], tmp_path, seed=6, sig=sig)

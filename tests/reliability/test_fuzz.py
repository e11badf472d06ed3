"""A seeded, bounded fuzz test of every input surface (docs/reliability.md, "Fuzz"): params files
and `-S` overrides, caption tables (URL lists), COCO JSON, webdataset members, checkpoint metadata
and command-line arguments. Each case runs the real entry point in this process (a stage's
`main`, `dalle.cli.main`, a model loader under `run_guarded`) and its outcome must be success or
exactly one `error:` line (exit 1, or 2 for a bad command line); a traceback fails the test.

Bounds: at most CASES cases per surface and at most BUDGET seconds per surface (the six sum to
under two minutes); the counts run are printed. Seed: DALLE_FUZZ_SEED (default SEED); a case is
named `<surface>:<index>` and rerun alone with DALLE_FUZZ_CASE=<surface>:<index>."""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dalle import cli
from dalle.config import load_params, load_raw
from dalle.io import load_checkpoint, save_checkpoint
from dalle.models.clip import ClipConfig, ContrastiveModel, load_clip
from dalle.models.config import as_dict
from dalle.models.dvae import DiscreteVAE, DVAEConfig, load_dvae
from dalle.models.transformer import DalleTransformer, PriorConfig, load_prior
from dalle.runner import run_guarded
from stages.collect import STAGE as COLLECT
from tests.integration.data_server import serve
from tests.reliability import fuzz_cases as F
from tests.reliability.conftest import REPO, write_params
from tests.reliability.inprocess import Seen, seen

SEED = 20241203
CASES = {"params": 1500, "tables": 150, "coco": 200, "webdataset": 200, "checkpoints": 1000,
         "cli": 300}
BUDGET = {"params": 15.0, "tables": 15.0, "coco": 15.0, "webdataset": 15.0, "checkpoints": 10.0,
          "cli": 20.0}  # seconds; 90 in all (the world the cli cases sample from is shared)
RAW = load_raw(REPO / "params.yaml")


def _cases(surface: str) -> Iterator[tuple[int, random.Random]]:
    seed = int(os.environ.get("DALLE_FUZZ_SEED", SEED))
    only = os.environ.get("DALLE_FUZZ_CASE", "")
    if only:
        name, index = only.split(":")
        if name == surface:
            yield int(index), random.Random(f"{seed}:{surface}:{index}")
        return
    start = time.monotonic()
    for i in range(CASES[surface]):
        if time.monotonic() - start > BUDGET[surface]:
            return
        yield i, random.Random(f"{seed}:{surface}:{i}")


def _check(surface: str, index: int, what: str, out: Seen) -> str:
    """Success, or exactly one error line (exit 1, or 2 for a command line); else a failure."""
    name = f"{surface}:{index} ({what[:160]!r})"
    assert "Traceback" not in out.stderr, f"{name}: {out.stderr[-3000:]}"
    if out.code == 0:
        return "ok"
    assert out.code in (1, 2), f"{name}: exit {out.code}: {out.stderr[-2000:]}"
    assert len(out.errors) == 1, f"{name}: {len(out.errors)} error lines: {out.stderr[-2000:]}"
    return "error"


def _run(surface: str, index: int, what: str, fn: Callable[[], Any]) -> str:
    try:
        return _check(surface, index, what, seen(fn))
    except AssertionError:
        raise
    except BaseException as exc:  # noqa: BLE001 - a traceback: name the case that caused it
        raise AssertionError(f"{surface}:{index} ({what[:160]!r}) raised {type(exc).__name__}: "
                             f"{exc}; rerun it with DALLE_FUZZ_CASE={surface}:{index}") from exc


def _report(surface: str, outcomes: list[str], start: float) -> None:
    took = time.monotonic() - start
    print(f"fuzz {surface}: {len(outcomes)} cases in {took:.1f} s: {outcomes.count('ok')} ok, "
          f"{outcomes.count('error')} one-line errors")
    assert outcomes, f"no {surface} case ran"


def test_fuzz_params_and_overrides(tmp_path: Path) -> None:
    start, outcomes = time.monotonic(), []
    for i, rng in _cases("params"):
        path = tmp_path / "params.yaml"
        text = F.params_text(rng, RAW) if rng.random() < 0.6 else ""
        path.write_text(text or (REPO / "params.yaml").read_text(), encoding="utf-8", errors="surrogatepass")
        overrides = [F.override(rng, RAW) for _ in range(rng.randint(0, 3))]
        outcomes.append(_run("params", i, f"{text[:80]} -S {overrides}",
                             lambda: run_guarded(lambda: load_params(path, None, overrides))))
    _report("params", outcomes, start)


@pytest.fixture(scope="module")
def good_server() -> Iterator[Any]:
    yield from serve()


def _collect(case: Path, extra: dict[str, Any]) -> Callable[[], Any]:
    params = write_params(case, {"data.image_size": 16, **extra})
    return lambda: COLLECT.main(["--params", str(params)])


def test_fuzz_caption_tables(tmp_path: Path, good_server: Any) -> None:
    start, outcomes = time.monotonic(), []
    for i, rng in _cases("tables"):
        case = tmp_path / f"t{i}"
        case.mkdir()
        table = F.url_table(rng, case, good_server.base)
        run = _collect(case, {"data.source": "url_list", "data.url_list.path": str(table),
                              "data.url_list.allow_private": True, "data.url_list.timeout_s": 2.0,
                              "data.url_list.retries": 0, "data.url_list.min_side": 8,
                              "data.url_list.image_format": "png", "data.url_list.workers": 4})
        outcomes.append(_run("tables", i, table.read_bytes()[:160].decode("latin-1"), run))
        shutil.rmtree(case)
    _report("tables", outcomes, start)


def test_fuzz_coco_json(tmp_path: Path) -> None:
    start, outcomes = time.monotonic(), []
    for i, rng in _cases("coco"):
        case = tmp_path / f"c{i}"
        root = F.coco_doc(rng, case)
        run = _collect(case, {"data.source": "folder", "data.folder.path": str(root),
                              "data.folder.min_side": 8, "data.folder.image_format": "png"})
        what = (root / "captions_val.json").read_bytes()[:160].decode("utf-8", "replace")
        outcomes.append(_run("coco", i, what, run))
        shutil.rmtree(case)
    _report("coco", outcomes, start)


def test_fuzz_webdataset_members(tmp_path: Path) -> None:
    start, outcomes = time.monotonic(), []
    for i, rng in _cases("webdataset"):
        case = tmp_path / f"w{i}"
        tar = F.webdataset_tar(rng, case)
        run = _collect(case, {"data.source": "webdataset", "data.webdataset.paths": [str(tar)],
                              "data.webdataset.min_side": 8, "data.webdataset.image_format": "png"})
        outcomes.append(_run("webdataset", i, tar.name, run))
        assert not list(tmp_path.rglob("up*")) and not Path("/abs.png").exists(), "a member escaped"
        shutil.rmtree(case)
    _report("webdataset", outcomes, start)


def _tiny_checkpoints(root: Path) -> list[tuple[Path, Callable[[Path], Any]]]:
    prior = PriorConfig(text_vocab=40, text_len=8, image_vocab=16, grid=4, n_layers=2, d_model=32,
                        n_heads=2, mlp_ratio=4, attention="sparse", conv_kernel=3, dropout=0.0,
                        checkpointing=False, attention_impl="masked")
    dvae = DVAEConfig(vocab_size=16, n_hid=8, n_blk_per_group=1, group_count=2, n_init=8, dec_n_hid=8,
                      image_size=16)
    clip = ClipConfig(embed_dim=8, image_width=8, text_width=8, text_layers=1, text_heads=2,
                      temperature_init=0.07, image_size=16, vocab_size=40, text_len=8)
    made = []
    for name, model, loader in (("prior", DalleTransformer(prior), load_prior),
                                ("dvae", DiscreteVAE(dvae), load_dvae),
                                ("clip", ContrastiveModel(clip), load_clip)):
        made.append((save_checkpoint(root / f"{name}.safetensors", model.state_dict(),
                                     as_dict(model.config)), loader))
    state = save_checkpoint(root / "state.safetensors", {"w": torch.ones(4)}, {"n": 4},
                            state={"step": 3, "opt": {"m": [torch.zeros(2)]}})
    made.append((state, lambda p: load_checkpoint(p, {"n": 4}, with_state=True)))
    return made


def test_fuzz_checkpoint_metadata(tmp_path: Path) -> None:
    start, outcomes = time.monotonic(), []
    originals = _tiny_checkpoints(tmp_path)
    for i, rng in _cases("checkpoints"):
        source, loader = rng.choice(originals)
        bad = tmp_path / f"bad{i}.safetensors"
        tensors = load_file(str(source))
        with safe_open(str(source), framework="pt") as fh:
            meta = dict(fh.metadata())
        F.checkpoint_mutation(rng)(tensors, meta)
        meta = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace")  # a file holds
                for k, v in meta.items()}  # UTF-8 only: a surrogate cannot even be written
        save_file(tensors, str(bad), metadata=meta)
        if rng.random() < 0.3:
            F.damage_file(rng, bad)
        outcomes.append(_run("checkpoints", i, f"{source.name}: {meta.get('dalle.config', '')[:120]}",
                             lambda: run_guarded(lambda: loader(bad))))
        bad.unlink()
    _report("checkpoints", outcomes, start)


def test_fuzz_command_line(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start, outcomes = time.monotonic(), []
    params = world / "params.yaml"
    for i, rng in _cases("cli"):
        case = tmp_path / f"a{i}"
        case.mkdir()
        # an argv without --params reads ./params.yaml: the case's own folder (where there is
        # none), never the repository's, whose default paths would be written to
        monkeypatch.chdir(case)
        roll = rng.random()
        if roll < 0.2:  # a stage's own command line, on a folder source that does not exist
            local = write_params(case, {"data.source": "folder", "data.folder.path": str(case / "no")})
            argv = F.stage_argv(rng, local)
            outcomes.append(_run("cli", i, "collect " + " ".join(argv), lambda: COLLECT.main(argv)))
        else:
            argv = F.generate_argv(rng, case, params) if roll < 0.75 else F.other_argv(rng, params)
            outcomes.append(_run("cli", i, " ".join(argv), lambda: cli.main(argv)))
        monkeypatch.chdir(tmp_path)
        shutil.rmtree(case)
    _report("cli", outcomes, start)

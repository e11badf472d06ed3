"""A tiny world for the reliability tests: its own params.yaml (16-px synthetic images, a dVAE
with n_hid 8, a 2-layer d_model 32 prior, a few steps each, tracking off) and every artefact of
the DAG up to the prior and the reranker, made once per session by the real stages in-process."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import yaml

from dalle.config import load_raw, set_dotted

REPO = Path(__file__).resolve().parents[2]
TINY: dict[str, Any] = {
    "tracking.enabled": False,
    "data.synthetic.n_images": 64, "data.image_size": 16, "data.shard_size": 16, "data.eval_captions": 3,
    "tokenizer.vocab_size": 96, "tokenizer.text_len": 16,
    "dvae.vocab_size": 32, "dvae.n_hid": 8, "dvae.dec_n_hid": 8, "dvae.n_init": 8, "dvae.group_count": 3,
    "dvae.n_blk_per_group": 1, "dvae.steps": 6, "dvae.batch_size": 8, "dvae.log_every": 2,
    "dvae.checkpoint_every": 2, "dvae.channels_last": False, "encode.batch_size": 16,
    "prior.n_layers": 2, "prior.d_model": 32, "prior.n_heads": 2, "prior.conv_kernel": 3,
    "prior.steps": 6, "prior.batch_size": 8, "prior.warmup_steps": 2, "prior.log_every": 2,
    "prior.sample_every": 1000, "prior.checkpoint_every": 2,
    "clip.embed_dim": 16, "clip.image_width": 8, "clip.text_width": 16, "clip.text_layers": 1,
    "clip.text_heads": 2, "clip.steps": 4, "clip.batch_size": 16, "clip.log_every": 2,
    "clip.retrieval_candidates": 4,
    "generate.n_captions": 2, "generate.candidates": 4, "generate.keep": 2, "generate.batch_size": 8,
}


def write_params(root: Path, extra: dict[str, Any] | None = None) -> Path:
    """root/params.yaml: the repo's params with TINY sizes and every path under root."""
    raw = load_raw(REPO / "params.yaml")
    paths = {f"paths.{k}": str(root / k) for k in raw["paths"]}  # every output under root
    for key, value in {**TINY, **paths, **(extra or {})}.items():
        set_dotted(raw, key, value)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_inputs(world: Path, root: Path, parts: Iterable[str], extra: dict[str, Any] | None = None) -> Path:
    """Copy `parts` (e.g. "clean", "models/dvae.safetensors") of the world into a fresh root;
    a part the root already holds (a case's own bad input) is left as it is."""
    for part in parts:
        src, dst = world / part, root / part
        if dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    return write_params(root, extra)


def from_world(world: Path, stage: str, extra: dict[str, Any] | None = None) -> Callable[[Path], Path]:
    """root -> root holding a copy of every input of `stage` from the world, and its params."""
    return lambda root: copy_inputs(world, root, inputs_of(stage, world), extra).parent


WORLD_STAGES_SKIPPED = ("generate", "evaluate")  # the world holds every input of these


def inputs_of(stage: str, root: Path) -> list[str]:
    """The inputs of `stage` (its StageSpec) as paths relative to a run root such as the world's:
    what `copy_inputs` copies, so the tests follow the catalog when artefacts move."""
    from dalle.catalog import Artefacts
    from dalle.config import load_params
    from dalle.pipeline import BY_NAME

    art = Artefacts(load_params(root / "params.yaml").paths)
    return [str(p.relative_to(root)) for p in BY_NAME[stage].inputs(art)]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every artefact of the tiny world up to the prior and the reranker: each stage of the DAG
    but generate and evaluate, in DAG order, run in-process by its own entry point."""
    from dalle.pipeline import STAGES

    root = tmp_path_factory.mktemp("reliability_world")
    argv = ["--params", str(write_params(root))]
    for spec in STAGES:
        if spec.name not in WORLD_STAGES_SKIPPED:
            spec.main(argv)
    return root

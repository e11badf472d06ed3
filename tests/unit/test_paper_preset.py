"""presets/paper-12b.yaml as the paper runs it: 30,000 evaluation captions (fig. 9) end to end
through the resolved config, and every modelling value it inherits stated as the paper's or
"our choice"."""
from __future__ import annotations

import re

import pandas as pd
import pytest
import yaml

from dalle.cli import main
from dalle.config import load_params
from dalle.data.collect import write_val_captions
from dalle.generate import select_captions
from tests.helpers import REPO

PRESET = REPO / "presets" / "paper-12b.yaml"
# sections whose every key shapes the model, its training or its evaluation
MODELLING = ("seed", "tokenizer", "dedup", "dvae", "encode", "prior", "distributed", "clip", "rerank",
             "generate", "evaluate")
OURS = ("seed", "dvae.zero_init_logits", "prior.grad_scale_growth_interval", "prior.attention_impl",
        "distributed.powersgd.eps", "distributed.powersgd.min_compression_dim",
        "rerank.clip_arch", "clip.steps", "generate.top_k")


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_the_resolved_preset_evaluates_on_30000_captions(tmp_path, capsys) -> None:
    params = load_params(REPO / "params.yaml", preset="paper-12b")
    assert params.data.eval_captions == params.generate.n_captions == 30000
    n = 31000  # a collection's val split, larger than the evaluation sample
    manifest = pd.DataFrame({"key": [f"{i:08d}" for i in range(n)], "caption": [f"c {i}" for i in range(n)],
                             "status": "ok", "split": "val"})
    frame = write_val_captions(tmp_path / "eval.parquet", manifest, params.data.eval_captions, params.seed)
    assert len(select_captions(frame, params.generate.n_captions)) == 30000  # what generate samples for
    assert main(["config", "show", "--preset", "paper-12b"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["data"]["eval_captions"] == shown["generate"]["n_captions"] == 30000


def test_every_modelling_value_is_stated_as_the_papers_or_our_choice() -> None:
    base = _leaves(yaml.safe_load((REPO / "params.yaml").read_text()))
    stated = _leaves(yaml.safe_load(PRESET.read_text()))
    inherited = [k for k in base if k.split(".")[0] in MODELLING and k not in stated]
    assert not inherited, f"inherited without a status: {inherited}"
    comments: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    for line in PRESET.read_text().splitlines():
        m = re.match(r"^( *)([A-Za-z_0-9]+):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        path = [(i, k) for i, k in path if i < indent] + [(indent, key)]
        value, _, comment = rest.partition("#")
        if value.strip():  # a leaf
            comments[".".join(k for _, k in path)] = comment
    for key in OURS:
        assert "our choice" in comments[key], key
    cites = re.compile(r"§|App\. |fig\. |Table|our choice|paper|released dall_e|\d+x\d+")
    unstated = [k for k, c in comments.items() if not cites.search(c) and not k.startswith("clip.")]
    assert not unstated, f"values with neither a source nor 'our choice': {unstated}"


@pytest.mark.parametrize("key", ["data.eval_captions", "generate.n_captions"])
def test_the_caption_count_cites_the_paper(key: str) -> None:
    line = next(l for l in PRESET.read_text().splitlines() if l.strip().startswith(key.split(".")[1] + ":"))
    assert "30000" in line and ("fig. 9" in line or "§3.1" in line)

"""`dalle generate` end to end on tiny saved models, and its one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.cli import main as cli_main
from dalle.data.tokenizer import BPETokenizer, build
from dalle.io import save_checkpoint
from dalle.models.dvae import DiscreteVAE, dvae_config_dict
from dalle.models.transformer import DalleTransformer, prior_config_dict
from tests.helpers import dvae_config, prior_config

REPO = Path(__file__).resolve().parents[2]
DVAE = dvae_config(vocab_size=16, n_hid=8, group_count=2, n_init=8, dec_n_hid=8, image_size=16)  # grid 8


def save_prior(path: Path, **kw) -> None:  # noqa: ANN003
    prior = DalleTransformer(prior_config(**{"text_len": 6, "image_vocab": 16, "grid": 8, "n_layers": 2,
                                             "d_model": 16, "n_heads": 2, **kw}))
    save_checkpoint(path, prior.state_dict(), prior_config_dict(prior))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    m = root / "models"
    m.mkdir()
    tok = BPETokenizer(build(40, 1, ["a red circle", "a blue square", "two green triangles"] * 5), 0.1)
    tok.save(m / "tokenizer.json")
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAE)
    save_checkpoint(m / "dvae.safetensors", dvae.state_dict(), dvae_config_dict(dvae))
    save_prior(m / "prior.safetensors", text_vocab=64)  # the configured size: >= the trained vocab
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "ok.png")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(root / "bad.png")
    return root


def gen(root: Path, *args: str) -> int:
    sets = ["-S", "tracking.enabled=false", "-S", f"paths.models={root / 'models'}"]
    return cli_main(["generate", *args, "--params", str(REPO / "params.yaml"), *sets])


@pytest.mark.filterwarnings("error:The given NumPy array is not writable")
def test_generate_writes_grid_and_primes(models: Path) -> None:
    out = models / "out.png"
    assert gen(models, "a red circle", "--candidates", "3", "--keep", "2", "--seed", "1", "-o", str(out)) == 0
    assert Image.open(out).size == (2 * 16, 16)
    primed = models / "primed.png"
    assert gen(models, "a red circle a blue square two green triangles", "--candidates", "2", "--prime",
               str(models / "ok.png"), "--prime-rows", "3", "--top-k", "4", "-o", str(primed)) == 0
    assert Image.open(primed).size == (2 * 16, 16)


@pytest.mark.parametrize("args,needle", [
    (["", "-o", "x.png"], "prompt is empty"),
    (["a red ☃", "-o", "x.png"], "does not know"),
    (["a red circle", "--prime", "BAD", "-o", "x.png"], "is 16x20, expected 16x16"),
    (["a red circle", "--prime", "OK", "--prime-rows", "8", "-o", "x.png"], "--prime-rows 8"),
    (["a red circle", "--keep", "9", "-o", "x.png"], "--keep 9"),
    (["a red circle", "--temperature", "0", "-o", "x.png"], "argument --temperature: 0 is outside"),
])
def test_bad_input_is_one_line(models: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    args = [str(models / "bad.png") if a == "BAD" else str(models / "ok.png") if a == "OK" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        gen(models, *args)
    assert exc.value.code == (2 if "argument" in needle else 1)  # 2: a usage error (argparse)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("kw,needle", [
    ({"text_vocab": 10}, "reads 10 text tokens but the tokenizer has"),
    ({"text_vocab": 64, "grid": 4}, "trained on a 4x4 grid of 16 codes but the dVAE makes 8x8 of 16"),
    ({"text_vocab": 64, "image_vocab": 32}, "8x8 grid of 32 codes but the dVAE makes 8x8 of 16"),
])
def test_prior_that_does_not_fit_the_dvae_or_tokenizer_is_one_line(
        models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kw: dict, needle: str) -> None:
    other = tmp_path / "prior.safetensors"
    save_prior(other, **kw)
    with pytest.raises(SystemExit):
        gen(models, "a red circle", "--model", str(other), "-o", str(tmp_path / "x.png"))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err

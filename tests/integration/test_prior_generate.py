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
from dalle.models.dvae import DiscreteVAE
from dalle.models.transformer import DalleTransformer

REPO = Path(__file__).resolve().parents[2]
DVAE = {"vocab_size": 16, "n_hid": 8, "n_blk_per_group": 1, "group_count": 2, "n_init": 8, "dec_n_hid": 8,
        "image_size": 16}  # grid 8


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    m = root / "models"
    m.mkdir()
    tok = BPETokenizer(build(40, 1, ["a red circle", "a blue square", "two green triangles"] * 5), 0.1)
    tok.save(m / "tokenizer.json")
    torch.manual_seed(0)
    dvae = DiscreteVAE(DVAE)
    save_checkpoint(m / "dvae.safetensors", dvae.state_dict(), DVAE)
    cfg = {"text_vocab": tok.vocab_size, "text_len": 6, "image_vocab": 16, "grid": 8, "n_layers": 2,
           "d_model": 16, "n_heads": 2, "mlp_ratio": 4, "attention": "sparse", "conv_kernel": 3}
    prior = DalleTransformer(cfg["text_vocab"], 6, 16, 8, 2, 16, 2, conv_kernel=3)
    save_checkpoint(m / "prior.safetensors", prior.state_dict(), cfg)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "ok.png")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(root / "bad.png")
    return root


def gen(root: Path, *args: str) -> int:
    sets = ["-S", "tracking.enabled=false", "-S", f"paths.models={root / 'models'}", "-S", "tokenizer.text_len=6",
            "-S", "prior.n_layers=2", "-S", "prior.d_model=16", "-S", "prior.n_heads=2", "-S", "prior.conv_kernel=3"]
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
    (["a red circle", "--temperature", "0", "-o", "x.png"], "--temperature > 0"),
])
def test_bad_input_is_one_line(models: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str) -> None:
    args = [str(models / "bad.png") if a == "BAD" else str(models / "ok.png") if a == "OK" else a for a in args]
    with pytest.raises(SystemExit) as exc:
        gen(models, *args)
    assert exc.value.code == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and needle in err[0], err


def test_checkpoint_for_another_config_is_one_line(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["generate", "a red circle", "-o", str(models / "x.png"), "--params", str(REPO / "params.yaml"),
                  "-S", f"paths.models={models / 'models'}", "-S", "tokenizer.text_len=6"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "different config" in err[0] and "conv_kernel is 3" in err[0], err

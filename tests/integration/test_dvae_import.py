"""`dalle dvae import-openai` on dall_e modules saved like the released encoder.pkl/decoder.pkl."""
from __future__ import annotations

import pytest
import torch

from dalle.cli import main
from dalle.models.dvae import load_dvae, map_pixels

dall_e = pytest.importorskip("dall_e")


def _pickles(tmp_path):  # noqa: ANN001
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(enc, tmp_path / "encoder.pkl")  # the release pickles whole modules
    torch.save(dec, tmp_path / "decoder.pkl")
    return enc, dec


def test_import_openai_gives_identical_outputs(tmp_path, capsys):
    enc, dec = _pickles(tmp_path)
    out = tmp_path / "models" / "dvae.safetensors"
    assert main(["dvae", "import-openai", str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl"),
                 "-o", str(out), "--image-size", "32"]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    model = load_dvae(out)
    assert model.config.n_hid == 64 and model.config.n_blk_per_group == 1
    assert model.config.group_count == 4 and model.config.n_init == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = model.logits(x)
        torch.testing.assert_close(logits, enc(map_pixels(x)), rtol=0, atol=0)
        z = torch.softmax(logits, 1)
        torch.testing.assert_close(model.decoder(z), dec(z), rtol=0, atol=0)


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    (b"not a pickle at all", "is not a torch.save file"),
])
def test_import_openai_bad_input_is_one_line(tmp_path, capsys, content, message):
    _pickles(tmp_path)
    bad = tmp_path / "bad.pkl"
    if content is not None:
        bad.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["dvae", "import-openai", str(bad), str(tmp_path / "decoder.pkl"),
              "-o", str(tmp_path / "out.safetensors")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_import_openai_refuses_a_module_that_is_not_dall_e(tmp_path, capsys):
    _pickles(tmp_path)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pkl")
    with pytest.raises(SystemExit):
        main(["dvae", "import-openai", str(tmp_path / "linear.pkl"), str(tmp_path / "decoder.pkl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a dall_e Encoder/Decoder" in err[0]

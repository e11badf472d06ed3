"""`dalle dvae import-openai ENCODER.pkl DECODER.pkl [-o OUT]` (default: the pipeline's dVAE).

Converts OpenAI's released `encoder.pkl`/`decoder.pkl` (whole `dall_e` modules saved with
torch.save) into our safetensors checkpoint. This UNPICKLES the two files, which runs code they
contain: it is opt-in (this command only), says so, and needs OpenAI's `dall-e` package
(`pip install 'dalle[openai]'`). Everything else in dalle refuses pickles.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import torch

from dalle.catalog import Artefacts, config_json
from dalle.commands.config_cmd import add_params_args
from dalle.config import load_params
from dalle.errors import CheckpointError
from dalle.models.dvae import DiscreteVAE, DVAEConfig
from dalle.train.dvae_eval import save_dvae

log = logging.getLogger("dalle.dvae")


def _unpickle(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        import dall_e  # noqa: F401 - the pickles reference dall_e.encoder/decoder classes
    except ImportError:
        raise CheckpointError("unpickling the released weights needs OpenAI's `dall-e` package: "
                              "pip install 'dalle[openai]'") from None
    log.warning("unpickling %s: this runs code from the file; only do it for files you trust", path)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle is the file's fault
        raise CheckpointError(f"{path} is not a torch.save file ({type(exc).__name__})") from None
    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(state, dict) or "blocks.input.w" not in state:
        raise CheckpointError(f"{path} is not a dall_e Encoder/Decoder (no blocks.input.w)")
    return {k: v.float() for k, v in state.items()}


def infer_config(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor],
                 image_size: int) -> DVAEConfig:
    """Architecture from the released tensors' shapes (keys as in dall_e)."""
    groups = {int(m.group(1)) for k in enc if (m := re.match(r"blocks\.group_(\d+)\.", k))}
    blocks = {int(m.group(1)) for k in enc if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", k))}
    try:
        return DVAEConfig(vocab_size=int(enc["blocks.output.conv.w"].shape[0]),
                          n_hid=int(enc["blocks.input.w"].shape[0]), n_blk_per_group=len(blocks),
                          group_count=len(groups), n_init=int(dec["blocks.input.w"].shape[0]),
                          dec_n_hid=int(dec["blocks.output.conv.w"].shape[1]), image_size=image_size)
    except ValueError as exc:
        raise CheckpointError(f"the released weights do not fit --image-size {image_size}: {exc}") from None


def import_openai(encoder_pkl: Path, decoder_pkl: Path, out: Path, image_size: int = 256) -> Path:
    enc, dec = _unpickle(encoder_pkl), _unpickle(decoder_pkl)
    model = DiscreteVAE(infer_config(enc, dec, image_size))
    for part, state, src in ((model.encoder, enc, encoder_pkl), (model.decoder, dec, decoder_pkl)):
        try:
            part.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise CheckpointError(f"{src} does not match its inferred architecture: {first}") from None
    return save_dvae(model.eval(), out)


def _run(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else Artefacts(
        load_params(args.params, args.preset, args.overrides).paths).dvae
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output must end in .safetensors, got {out}")
    import_openai(Path(args.encoder), Path(args.decoder), out, args.image_size)
    print(f"wrote {out} and {config_json(out)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    dvae = sub.add_parser("dvae", help="discrete VAE tools")
    actions = dvae.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    imp = actions.add_parser("import-openai", help="convert OpenAI's released encoder.pkl/"
                             "decoder.pkl (UNPICKLES them; needs the dall-e package)")
    imp.add_argument("encoder", help="encoder.pkl from OpenAI's dall_e release")
    imp.add_argument("decoder", help="decoder.pkl from OpenAI's dall_e release")
    imp.add_argument("-o", "--output", default=None,
                     help="a .safetensors file (default: the dVAE of the params' paths.models)")
    add_params_args(imp)
    imp.add_argument("--image-size", type=int, default=256, help="training image size (paper: 256)")
    imp.set_defaults(func=_run)

"""ldm-convert: a latent diffusion model between our checkpoints, diffusers pipeline folders and
the reference (CompVis / Stable Diffusion) `.ckpt` layout.

    ldm-convert sd-v1-4.ckpt --config v1-inference.yaml --to diffusers --out sd14/ --tokenizer <clip folder>
    ldm-convert 768-v-ema.ckpt --config v2-inference-v.yaml --to ours --out sd2.ckpt --tokenizer <folder>
    ldm-convert <diffusers folder> --to ours --out model.ckpt
    ldm-convert runs/<run> --to diffusers --out pipe/
    ldm-convert model.ckpt --to reference --out ref/model.ckpt

The source kind is detected: a folder with model_index.json (or unet/config.json) is a diffusers
pipeline; a file given with --config is a reference checkpoint with its YAML; any other file, or
a run folder (its checkpoints/last.ckpt), is our checkpoint (it stores its build_config).
--to reference writes the state dict in the reference layout and, next to it, config.yaml: the
reference YAML of a model that came from one (the YAML passed, or the one our checkpoint stores).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

TARGETS = ("ours", "diffusers", "reference")
# our build_config of a model built from a reference YAML (its model.params travel with it)
FROM_REFERENCE = "ldm.convert.reference.module_from_reference_config"


def source_kind(src: Path, config: str | None) -> str:
    """'diffusers', 'reference' or 'ours' for the path `src` (see the module doc)."""
    if src.is_dir() and ((src / "model_index.json").is_file() or (src / "unet" / "config.json").is_file()):
        if config:
            raise ValueError(f"{src} is a diffusers pipeline folder: drop --config (it describes a reference .ckpt)")
        return "diffusers"
    if config:
        if not src.is_file():
            raise FileNotFoundError(f"no reference checkpoint at {src} (--config is given, so a .ckpt file is expected)")
        return "reference"
    from ldm.modules.loading import find_checkpoint

    ckpt = torch.load(find_checkpoint(src), map_location="cpu", weights_only=True, mmap=True)
    if "build_config" not in ckpt:
        raise ValueError(f"{src} stores no build_config, so it is not one of our checkpoints; a reference / SD .ckpt "
                         "needs the YAML it was released with: pass --config <its yaml>")
    return "ours"


def _reference_params(config: str | Path) -> dict[str, Any]:
    yaml = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    node = yaml.get("model", yaml)
    params = node.get("params", node)
    if "unet_config" not in params:
        raise ValueError(f"{config} has no model.params.unet_config: ldm-convert takes latent diffusion models "
                         "(a first stage's YAML describes an autoencoder)")
    return params


def load_source(src: Path, kind: str, config: str | None, tokenizer: str | None,
                trust_config: bool = False) -> tuple[Any, dict[str, Any]]:
    """(LatentDiffusion, its build_config) for a source of `kind`."""
    if tokenizer is not None and kind != "reference":
        raise ValueError(f"--tokenizer stands in for the hub model a reference YAML's text encoder names; a {kind} "
                         "source carries its own: drop it")
    if kind == "diffusers":
        from ldm.convert.diffusers_pipeline import load_diffusers_pipeline

        module = load_diffusers_pipeline(src)
        return module, module.build_config
    if kind == "reference":
        from ldm.convert.reference import load_reference_checkpoint

        params = _reference_params(config)
        module = load_reference_checkpoint(src, params, text_encoder=tokenizer)
        return module, {"_target_": FROM_REFERENCE, "config": params, "text_encoder": tokenizer}
    from ldm.modules.latent_diffusion import LatentDiffusion
    from ldm.modules.loading import find_checkpoint, load_module

    module = load_module(src, trust_config=trust_config)
    if not isinstance(module, LatentDiffusion):
        raise ValueError(f"{src} is a {type(module).__name__} checkpoint; ldm-convert takes latent diffusion models")
    build = torch.load(find_checkpoint(src), map_location="cpu", weights_only=True, mmap=True)["build_config"]
    return module, build


def convert(src: str | Path, to: str, out: str | Path, config: str | None = None, tokenizer: str | None = None,
            trust_config: bool = False) -> Path:
    """Convert the model at `src` to the format `to` at `out`; returns what was written."""
    src, out = Path(src), Path(out)
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    kind = source_kind(src, config)
    if kind == to:
        raise ValueError(f"{src} is already a {kind} {'folder' if kind == 'diffusers' else 'checkpoint'}: "
                         "nothing to convert")
    if to == "reference" and kind == "diffusers":
        raise ValueError("a diffusers folder has no reference YAML to go with a reference .ckpt: convert it --to ours "
                         "(sample.py and evaluate.py take that), or load the released .ckpt with its YAML")
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists: pass a new path (nothing is overwritten)")
    module, build = load_source(src, kind, config, tokenizer, trust_config)
    if to == "diffusers":
        from ldm.convert.diffusers_pipeline import export_diffusers

        return export_diffusers(module, out)
    if to == "ours":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": module.state_dict(), "build_config": build}, out)
        return out
    from ldm.convert.reference import export_reference_checkpoint

    if build.get("_target_") != FROM_REFERENCE:
        raise ValueError(f"{src} was not built from a reference YAML, so there is no YAML to write with the "
                         "reference .ckpt; only models converted from released checkpoints go back --to reference")
    export_reference_checkpoint(module, out)
    OmegaConf.save({"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": build["config"]}},
                   out.parent / "config.yaml")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ldm-convert SRC --to {ours,diffusers,reference} --out PATH [--config YAML] [--tokenizer DIR]."""
    parser = argparse.ArgumentParser(prog="ldm-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a reference .ckpt (with --config), our .ckpt or run folder, or a diffusers folder")
    parser.add_argument("--to", required=True, choices=TARGETS, help="the format to write")
    parser.add_argument("--out", required=True, help="the .ckpt file (ours, reference) or folder (diffusers) to write")
    parser.add_argument("--config", help="the YAML a reference checkpoint was released with (v1-inference.yaml, ...)")
    parser.add_argument("--tokenizer", help="a local folder for the hub model a reference YAML's text encoder names "
                                            "(its tokenizer; for SD 1.x also the CLIP text model)")
    parser.add_argument("--trust-config", action="store_true",
                        help="build whatever our checkpoint's stored config names (only for checkpoints you trust)")
    args = parser.parse_args(argv)
    from ldm.utils.checkpoint import CheckpointMismatchError

    try:
        written = convert(args.src, args.to, args.out, args.config, args.tokenizer, args.trust_config)
    except (ValueError, OSError, CheckpointMismatchError) as err:  # what to fix, without a traceback
        parser.exit(2, f"ldm-convert: error: {err}\n")
    print(f"wrote {written}")


if __name__ == "__main__":
    main()

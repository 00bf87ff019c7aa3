"""How much a text LDM's denoising loss depends on the shape and the colour words, per noise level.

For validation images of the built-in shapes data, the diffusion loss of a trained text LDM is
computed with the true captions and with each caption's object shapes (or colours) replaced by
the next ones in the vocabulary, with the same latents, noise and timesteps. The increase is what
the word is worth to the model at that noise level: zero where the model ignores it. It shows
at which timesteps a word is used (docs/reproduction.md, quickstart diagnosis items 4 and 9):

    python -m ldm.cli.word_gap runs/quickstart/<stamp>/ldm data/shapes-32-large/val
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ldm.data.synthetic import SHAPES
from ldm.metrics.prompts import COLOR_NAMES, OBJECT_PHRASE

if TYPE_CHECKING:
    from ldm.modules.latent_diffusion import LatentDiffusion

Swap = Callable[[str], str]


def _next(vocabulary: Sequence[str], word: str) -> str:
    return vocabulary[(vocabulary.index(word) + 1) % len(vocabulary)]


def swap_shapes(caption: str) -> str:
    """The caption with every object's shape replaced by the next one of SHAPES (circle -> square)."""
    return OBJECT_PHRASE.sub(lambda m: f"{m.group(1)} {_next(SHAPES, m.group(2))}", caption)


def swap_colors(caption: str) -> str:
    """The caption with every object's colour replaced by the next object colour (red -> green);
    the background's name is left as it is."""
    return OBJECT_PHRASE.sub(lambda m: f"{_next(COLOR_NAMES, m.group(1))} {m.group(2)}", caption)


SWAPS: dict[str, Swap] = {"shape": swap_shapes, "colour": swap_colors}


@torch.no_grad()
def word_gaps(module: LatentDiffusion, batch: dict, timesteps: Sequence[int], swaps: dict[str, Swap] | None = None,
              draws: int = 2, seed: int = 0) -> dict[int, dict[str, float]]:
    """{t: {"true": loss, <swap name>: loss increase, ...}}: the LDM's mean diffusion loss on the
    batch's images with their captions at each t, and how much each swap of the captions raises
    it; every variant sees the same latents, noise and t (averaged over `draws` noise draws)."""
    swaps = SWAPS if swaps is None else swaps
    generator = torch.Generator().manual_seed(seed)
    z = module.scale_factor * module.first_stage_latents(batch, generator)
    captions = list(batch["caption"])
    conds = {"true": module.condition({"caption": captions}, tuple(z.shape[-2:]))}
    for name, swap in swaps.items():
        conds[name] = module.condition({"caption": [swap(c) for c in captions]}, tuple(z.shape[-2:]))
    table = {}
    for t0 in timesteps:
        t = torch.full((z.shape[0],), int(t0), device=z.device)
        losses = dict.fromkeys(conds, 0.0)
        for _ in range(draws):
            noise = torch.randn(z.shape, generator=generator).to(z)
            for name, cond in conds.items():
                losses[name] += module.diffusion_loss(z, cond, t, noise)[0].item() / draws
        table[int(t0)] = {"true": losses["true"], **{n: losses[n] - losses["true"] for n in swaps}}
    return table


def format_table(table: dict[int, dict[str, float]]) -> str:
    """The word_gaps result as a markdown table, one column per timestep."""
    ts = list(table)
    rows = ["| t | " + " | ".join(str(t) for t in ts) + " |", "|---|" + "---|" * len(ts)]
    for name in next(iter(table.values())):
        label, fmt = ("true caption", ".3f") if name == "true" else (f"+ {name} word swapped", "+.3f")
        rows.append(f"| {label} | " + " | ".join(f"{table[t][name]:{fmt}}" for t in ts) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: print the table for a text LDM run and validation shards."""
    from ldm.data.pipeline import SampleDecoder, ShardStream
    from ldm.data.transforms import ImageTransform
    from ldm.modules.loading import load_module

    parser = argparse.ArgumentParser(prog="python -m ldm.cli.word_gap", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a text LDM run folder or .ckpt trained on the shapes data")
    parser.add_argument("val", help="validation shards of the shapes data (folder with index.json)")
    parser.add_argument("--n", type=int, default=128, help="validation images used")
    parser.add_argument("--t", type=int, nargs="+", default=list(range(50, 1000, 100)), help="timesteps")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per timestep")
    parser.add_argument("--seed", type=int, default=0, help="seed of the posterior samples and the noise")
    parser.add_argument("--trust-config", action="store_true",
                        help="build whatever the checkpoint's stored config names (only for checkpoints you trust)")
    args = parser.parse_args(argv)
    module = load_module(args.ckpt, trust_config=args.trust_config)
    if module.hparams.get("cond_stage_key") != "caption":
        raise SystemExit(f"{args.ckpt} is not a text-conditional LDM (its condition key is "
                         f"{module.hparams.get('cond_stage_key')!r}, not 'caption')")
    size = module.hparams.image_size
    stream = ShardStream(args.val, args.n, SampleDecoder(ImageTransform(size, "center", False)), train=False,
                         max_samples=args.n)
    batch = next(iter(stream))
    print(format_table(word_gaps(module, batch, args.t, draws=args.draws, seed=args.seed)))


if __name__ == "__main__":
    main()

"""Generate images from a trained latent diffusion model.

    python sample.py ckpt=runs/toy_ldm_text/<time> prompt="a large red star on a beige background" n=8
    python sample.py ckpt=<run> class_label=[0,5,9] n=9 sampler=dpmpp_2m steps=20 guidance=3
    python sample.py --help
Writes each image as PNG, grid.png and samples.json (every setting and each image's seed).
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    from ldm.cli.sample import sample  # imported late: `--help` stays fast

    out = sample(cfg)
    print(f"images: {out / 'samples'}\ngrid:   {out / 'grid.png'}\nsettings: {out / 'samples.json'}")


if __name__ == "__main__":
    main()

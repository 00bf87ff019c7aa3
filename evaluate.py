"""Score a trained model or a folder of images: FID / KID / IS / precision-recall, and rFID / PSNR /
SSIM / LPIPS for autoencoders.

    python evaluate.py ckpt=<ldm run> real=<val shards> n=1000 sampler=ddim steps=50 guidance=3
    python evaluate.py ckpt=<autoencoder run> real=<val shards> n=null metrics=[fid]
    python evaluate.py images=<folder of PNGs or .npz> real_stats=<stats.npz> metrics=[fid]
    python evaluate.py --help
Writes metrics.json (metrics, every setting, the run's step and f, samples/s). See docs/evaluation.md.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ldm.cli.evaluate import evaluate  # imported late: `--help` stays fast

    print(f"metrics: {evaluate(cfg)}")


if __name__ == "__main__":
    main()

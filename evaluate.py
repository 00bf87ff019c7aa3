"""Score a trained model or a folder of images: FID / KID / IS / precision-recall, and rFID / PSNR /
SSIM / LPIPS for autoencoders.

    python evaluate.py ckpt=<ldm run> real=<val shards> n=1000 sampler=ddim steps=50 guidance=3
    python evaluate.py ckpt=<autoencoder run> real=<val shards> n=null metrics=[fid]
    python evaluate.py images=<folder of PNGs or .npz> real_stats=<stats.npz> metrics=[fid]
    torchrun --standalone --nproc-per-node 8 evaluate.py ckpt=<ldm run> ... hydra.run.dir=<folder>
    srun python evaluate.py ckpt=<ldm run> ... hydra.run.dir=<folder>
    python evaluate.py --help
Writes metrics.json (metrics, every setting, the run's step and f, samples/s). See docs/evaluation.md.
"""
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from ldm.cli.evaluate import evaluate  # imported late: `--help` stays fast

    path = evaluate(cfg)
    if path is not None:  # rank 0 writes the results
        print(f"metrics: {path}")


if __name__ == "__main__":
    main()

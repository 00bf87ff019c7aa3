"""Train a first-stage autoencoder or a latent diffusion model.

    python train.py experiment=toy/ae_kl                 # a toy KL autoencoder on the shapes data
    python train.py -m experiment=toy/ae_kl first_stage.f=4,8   # one run per f
    python train.py --help                               # every config group and key
"""
from ldm.utils.early_signals import hold_early_sigusr1

hold_early_sigusr1()  # first: a SLURM warning during start-up then still saves and requeues

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from ldm.cli.train import train  # imported late: `--help` stays fast

    metrics = train(cfg)
    monitor = cfg.get("optimized_metric")
    return metrics.get(monitor) if monitor else None


if __name__ == "__main__":
    main()

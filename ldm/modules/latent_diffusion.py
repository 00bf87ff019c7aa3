"""The latent diffusion stage as a LightningModule: a denoiser trained on frozen first-stage latents.

Thin glue over ldm.diffusion (schedule, the training loss, condition dropout, EMA, samplers) and
ldm.nets (UNet, wrapper, condition encoders). Submodule and buffer names are those of the
reference LatentDiffusion (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`,
`model_ema.*`, schedule buffers, `scale_factor` when scale_by_std, `logvar` when learned), so
original LDM checkpoints load strictly and ours export back unchanged.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
from lightning_fabric.utilities.throughput import measure_flops
from torch import nn

from ldm.data.latents import cached_posterior
from ldm.nets.tokenizer import CaptionTokenizer
from ldm.diffusion.ema import EMA
from ldm.diffusion.guidance import drop_conditions, dropout_mask
from ldm.diffusion.loss import DiffusionLoss
from ldm.diffusion.samplers import get_sampler, noise_for_seeds
from ldm.diffusion.samplers.noise import NoiseGenerator, draw_noise, draw_uniforms
from ldm.diffusion.schedule import DiffusionSchedule, make_betas, q_sample
from ldm.first_stage.base import FirstStage
from ldm.modules.base import BuildableModule, make_optimizer
from ldm.modules.fsdp import ema_to_checkpoint, fsdp_root, root_params_gathered, shard_ema
from ldm.modules.nonfinite import NonFiniteGuard
from ldm.nets.wrapper import CONTEXT_KEYS, DiffusionWrapper
from ldm.utils.compile import compile_denoiser, compile_encoder
from ldm.utils.images import log_grid
from ldm.utils.lr import LR_SCHEDULES, trainer_effective_lr, warmup_scheduler

# Constructor arguments that moved: old name -> new place. Stored checkpoints still carry the old
# names (ldm.modules.loading drops them: they are training-only); a config that sets one is refused.
MOVED_ARGUMENTS = {"weight_decay": "optimizer.weight_decay"}


def _batch_len(batch: dict) -> int:
    """Samples in a training batch (of images or of latent-cache moments)."""
    return len(batch["moments"] if "moments" in batch else batch["image"])


class LatentDiffusion(BuildableModule):
    """Denoising diffusion on scaled latents of a frozen first stage.

    unet: the denoiser (ldm.nets.unet.UNetModel).
    first_stage: a trained FirstStage (frozen here); ldm.modules.loading.load_first_stage reads
        one from a first-stage run.
    cond_stage: condition encoder fed batch[cond_stage_key] (text encoder, class embedder; for a
        concat model without concat_stage the encoder of its concat channels, e.g. the semantic
        models' SpatialRescaler), or None. The first stage itself is the reference's
        `__is_first_stage__` (its weights are then saved under both names, as in that layout).
    conditioning_key: None, 'crossattn', 'concat', 'hybrid' or 'adm' (see ldm.nets.wrapper).
    concat_stage: builds the concat condition from the batch (ldm.nets.concat), for concat/hybrid.
    uncond_value: the null input of the condition ("" for text, the null class id): used for
        condition dropout (p_uncond) and as the unconditional branch of guidance.
    image_size: training resolution in pixels (the default size of samples).
    scale_factor / scale_by_std: latents are scale_factor * z; with scale_by_std it becomes
        1/std of the first training batch's latents (all DDP ranks pooled) and is saved.
    compile / compile_mode: torch.compile the denoiser (training and sampling) with that mode
        (None: torch's default; e.g. "max-autotune"): True the whole UNet, "blocks" only its
        attention blocks (ldm.utils.compile); in place, so checkpoints are unchanged.
    compile_first_stage: also compile the first stage's encoder (latents computed from images).
    nonfinite_loss: "stop" or "skip" on a NaN/inf training loss (ldm.modules.nonfinite).
    parameterization, loss_type, min_snr_gamma, timestep_focus: the training loss
        (ldm.diffusion.loss.DiffusionLoss, the module's `loss`).
    learn_logvar / logvar_init: the per-timestep log-variance of the loss (`logvar`, a parameter
        in the checkpoint when learned, as in the reference).
    optimizer: the optimiser without its parameters and learning rate, e.g. a Hydra `_partial_`
        config {_target_: torch.optim.AdamW, _partial_: true, weight_decay: 0.01} (None: that one);
        it is called as optimizer(params, lr=...) with torch's fastest implementation for the device.
    base_lr / scale_lr: its learning rate, x batch x GPUs x accumulation when scale_lr
        (ldm.utils.lr.trainer_effective_lr, docs/scaling.md).
    lr_schedule: "constant" or "cosine" after `warmup_steps` (ldm.utils.lr.warmup_scheduler; cosine
        ends at trainer.max_steps).
    """

    def __init__(self, unet: nn.Module, first_stage: FirstStage, cond_stage: nn.Module | None = None,
                 conditioning_key: str | None = None, cond_stage_key: str | None = None,
                 cond_stage_trainable: bool = True, concat_stage: nn.Module | None = None,
                 uncond_value: str | int | None = None, p_uncond: float = 0.0,
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 0.00085,
                 linear_end: float = 0.012, cosine_s: float = 8e-3, parameterization: str = "eps",
                 loss_type: str = "l2", min_snr_gamma: float | None = None,
                 timestep_focus: dict | None = None, learn_logvar: bool = False,
                 logvar_init: float = 0.0,
                 scale_factor: float = 1.0, scale_by_std: bool = False, ema_decay: float | None = 0.9999,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, base_lr: float = 1e-4,
                 scale_lr: bool = True, warmup_steps: int = 0,
                 lr_schedule: str = "constant", image_size: int = 256, val_sampler: dict | None = None,
                 log_images: int = 8, compile: bool | str = False, compile_mode: str | None = None,
                 compile_first_stage: bool = False, nonfinite_loss: str = "stop", **moved):
        for name in moved:  # refused: a moved argument is named with its new place
            new = MOVED_ARGUMENTS.get(name)
            raise TypeError(f"model.{name} is now model.{new} (configs/model/ldm.yaml): move it there" if new
                            else f"LatentDiffusion got an unexpected argument {name!r}")
        super().__init__()
        # the optimiser factory is code, not a value: it stays out of the checkpoint's hparams
        self.save_hyperparameters(ignore=["unet", "first_stage", "cond_stage", "concat_stage", "optimizer"])
        # default: the reference's AdamW (its weight decay is AdamW's default)
        self._optimizer_factory = optimizer or functools.partial(torch.optim.AdamW, weight_decay=0.01)
        if "lr" in getattr(self._optimizer_factory, "keywords", {}):
            raise ValueError("the optimizer config sets lr: set model.base_lr instead (scaled by model.scale_lr)")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if not 0.0 <= p_uncond < 1.0:
            raise ValueError(f"p_uncond must be in [0, 1), got {p_uncond}")
        if p_uncond > 0 and uncond_value is None:
            raise ValueError("p_uncond > 0 needs uncond_value: the null condition (\"\" for text, the null class id)")
        if conditioning_key in CONTEXT_KEYS and cond_stage is None:
            raise ValueError(f"conditioning_key={conditioning_key!r} needs a cond_stage (text or class encoder)")
        if conditioning_key == "hybrid" and concat_stage is None:
            raise ValueError("conditioning_key='hybrid' needs a concat_stage (ldm.nets.concat)")
        if conditioning_key == "concat" and (concat_stage is None) == (cond_stage is None or cond_stage is first_stage):
            raise ValueError("conditioning_key='concat' takes its channels from a concat_stage (ldm.nets.concat) or "
                             "from a cond_stage encoder of batch[cond_stage_key] (e.g. SpatialRescaler): give one of them")
        self.model = DiffusionWrapper(unet, conditioning_key)
        self.first_stage_model = first_stage.eval().requires_grad_(False)
        compile_denoiser(unet, compile, compile_mode)
        if compile_first_stage:
            compile_encoder(first_stage, compile_mode)
        self.cond_stage_model = cond_stage
        if cond_stage is not None and not cond_stage_trainable:
            cond_stage.eval().requires_grad_(False)
        self.concat_stage = concat_stage
        self.schedule = DiffusionSchedule(make_betas(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.loss = DiffusionLoss(self.schedule, parameterization, loss_type, min_snr_gamma, timestep_focus)
        self._register_schedule(self.schedule)
        logvar = torch.full((timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.logvar = logvar
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)
        self.model_ema = EMA(self.model, ema_decay) if ema_decay else None
        self._ema_sharded: bool | None = None  # shadows cut to this rank's pieces (FSDP); None: no FSDP fit yet
        self._restarted = False
        self._val_batch: dict | None = None
        self.nonfinite = NonFiniteGuard(nonfinite_loss)

    # --- schedule -------------------------------------------------------------------------
    def _register_schedule(self, schedule: DiffusionSchedule) -> None:
        for name, value in schedule.buffers().items():
            if name in self._buffers:
                self._buffers[name] = value.to(self._buffers[name].device)
            else:
                self.register_buffer(name, value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint's schedule buffers override the config, as in the reference (the configured
        # float64 schedule stays when they are its own: a resumed run computes the same tables).
        if prefix + "betas" in state_dict:
            self.schedule = DiffusionSchedule.from_state_dict(state_dict, prefix, configured=self.schedule)
            self.loss.schedule = self.schedule
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def parameterization(self) -> str:
        """What the denoiser predicts: eps, x0 or v."""
        return self.loss.parameterization

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage_model.eval()  # frozen: no dropout, no norm statistics updates
        if self.cond_stage_model is not None and not self.hparams.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # --- latents and conditions ------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """scale_factor x z for [-1, 1] images (a posterior sample, as the reference trains on)."""
        posterior = self.first_stage_model.encode(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.scale_factor * z

    @torch.no_grad()
    def first_stage_latents(self, batch: dict, generator: NoiseGenerator = None) -> torch.Tensor:
        """Unscaled posterior sample z of a training batch: from the first-stage moments of a latent
        cache (ldm.data.latents; checked against this first stage) when the batch has them, else by
        encoding its images. generator: None, one, or one per sample."""
        if "moments" in batch:
            # Stored as float16 or float32: compute in the module's dtype, like encoder outputs.
            posterior = cached_posterior(batch["moments"].to(self.dtype), self.first_stage_model,
                                         batch.get("__url__"))
        else:
            posterior = self.first_stage_model.encode(batch["image"])
        return posterior.sample(generator)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (unclamped) from scaled latents."""
        return self.first_stage_model.decode(z / self.scale_factor)

    def encode_condition(self, values) -> torch.Tensor:
        """The cond_stage output for raw condition inputs (captions, class ids)."""
        if self.cond_stage_model is None:
            return values
        return self.cond_stage_model(values)

    def condition(self, batch: dict, latent_hw: tuple[int, int], drop: torch.Tensor | None = None) -> dict | None:
        """The condition dict for a batch; entries where `drop` is True get the null condition."""
        key = self.model.conditioning_key
        if key is None:
            return None
        cond: dict = {}
        if key in CONTEXT_KEYS or key == "adm":
            values = self._condition_input(batch)
            if drop is not None and bool(drop.any()):
                values = drop_conditions(values, drop, self.hparams.uncond_value)
            encoded = self.encode_condition(values)
            cond["y" if key == "adm" else "crossattn"] = encoded
            if key == "crossattn_pooled":
                cond["y"] = encoded.mean(dim=1)  # (B, L, D) -> (B, D) for the UNet's vector embedding
        if key in ("concat", "hybrid"):
            if self.concat_stage is not None:
                concat = self.concat_stage(batch, lambda im: self.encode_images(im, sample=False), latent_hw)
            else:  # the reference's way: the cond stage encodes batch[cond_stage_key] into the channels
                concat = self.encode_condition(self._condition_input(batch))
            if tuple(concat.shape[-2:]) != tuple(latent_hw):
                raise ValueError(f"the concat condition is {tuple(concat.shape[-2:])}, the latent grid {tuple(latent_hw)}: "
                                 "give the condition (low-res image, label map, mask) at the size that matches the "
                                 "image size")
            cond["concat"] = concat
        return cond

    def _condition_input(self, batch: dict):
        if self.hparams.cond_stage_key not in batch:
            raise KeyError(f"the model is conditioned on batch[{self.hparams.cond_stage_key!r}], which is missing")
        return batch[self.hparams.cond_stage_key]

    @property
    def guidable(self) -> bool:
        """Whether classifier-free guidance can change the samples: the model has a condition to
        drop (text or class, by cross-attention or adm) and its null input (uncond_value)."""
        return self.model.conditioning_key not in (None, "concat") and self.hparams.uncond_value is not None

    def check_guidance(self, guidance_scale: float) -> None:
        """Refuse a guidance scale that cannot mean what it says for this model."""
        key = self.model.conditioning_key
        if guidance_scale != 1.0 and key in (None, "concat"):
            kind = "unconditional" if key is None else "conditioned only on concat channels (low-res image, " \
                                                       "masked image, label map)"
            raise ValueError(f"guidance {guidance_scale} changes nothing for a model {kind}: guidance needs a "
                             "condition to drop and there is none, so it would only double the cost; use guidance 1")

    def null_condition(self, batch: dict, latent_hw: tuple[int, int]) -> dict | None:
        """The unconditional branch for guidance: the null input in place of the condition;
        concat conditions (the image to super-resolve or inpaint) stay."""
        if self.model.conditioning_key in (None, "concat"):
            return self.condition(batch, latent_hw)
        if self.hparams.uncond_value is None:
            raise ValueError("guidance needs uncond_value (the null condition) in the model config")
        n = len(batch[self.hparams.cond_stage_key])
        return self.condition(batch, latent_hw, drop=torch.ones(n, dtype=torch.bool))

    # --- training ------------------------------------------------------------------------
    def _ema(self) -> EMA | None:
        """The EMA, under FSDP first cut to this rank's pieces. At its first use, not at the start of
        fit: Lightning's FSDP resume loads the checkpoint's full EMA into the full buffers after that."""
        if self.model_ema is not None and self._ema_sharded is None:
            root = fsdp_root(self._trainer)
            if root is not None:
                self._ema_sharded = shard_ema(self.model_ema, self.model, root)
        return self.model_ema

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if (self.hparams.scale_by_std and self.global_step == 0 and batch_idx == 0 and not self._restarted):
            with root_params_gathered(self._trainer):  # outside the training step's forward
                self._set_scale_by_std(self.first_stage_latents(batch, self.sample_generators(_batch_len(batch), 1)))

    @torch.no_grad()
    def _set_scale_by_std(self, z: torch.Tensor) -> None:
        """scale_factor = 1 / std of the unscaled latents `z`, pooled over all DDP ranks (the reference
        computes it on rank 0 only and leaves the other ranks at 1.0)."""
        z = z.double().flatten()
        stats = torch.stack([z.new_tensor(z.numel()), z.sum(), (z * z).sum()])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        n, s, ss = stats
        std = torch.sqrt((ss - s * s / n) / (n - 1))
        self.scale_factor.fill_(float(1.0 / std))
        self.print(f"scale_by_std: scale_factor = {self.scale_factor.item():.6f}")

    def diffusion_loss(self, z: torch.Tensor, cond: dict | None, t: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss (self.loss) of the denoiser on clean scaled latents z, and its logs
        (prefix-free names); t and noise default to draws from the global RNG."""
        t = self.loss.timesteps(z.shape[0], z.device) if t is None else t
        noise = torch.randn_like(z) if noise is None else noise
        return self.loss(self.model, z, cond, t, noise, self.logvar)

    def _step(self, batch: dict, split: str, drop: bool) -> torch.Tensor:
        n = _batch_len(batch)
        # Training draws come per sample from generators keyed by the sample's place in the global
        # stream: the same for 1 rank with batch B as for 2 ranks with B/2 each (docs/scaling.md).
        generators = self.sample_generators(n) if split == "train" else None
        z = self.scale_factor * self.first_stage_latents(batch, generators)  # from images or a latent cache
        u = draw_uniforms(n, 4, generators)  # condition dropout, then the three of sample_timesteps
        mask = dropout_mask(u[:, 0], self.hparams.p_uncond) if drop else None
        cond = self.condition(batch, tuple(z.shape[-2:]), drop=mask)
        t = self.loss.timesteps(n, z.device, uniforms=u[:, 1:])
        noise = draw_noise(z.shape, generators, z.device, z.dtype)
        loss, logs = self.diffusion_loss(z, cond, t, noise)
        self.log_dict({f"{split}/{k}": v for k, v in logs.items()}, prog_bar=(split == "train"),
                      sync_dist=(split == "val"), batch_size=z.shape[0])
        return loss

    def measure_training_flops(self, batch: dict) -> int:
        """FLOPs of the denoiser's forward and backward on `batch` (torch's FLOP counter), what one
        update trains; the frozen first stage and the condition encoder are not counted. Fills
        gradients: ldm.callbacks.throughput runs it on stand-in parameters."""
        with torch.no_grad():
            z = self.scale_factor * self.first_stage_latents(batch)
            cond = self.condition(batch, tuple(z.shape[-2:]))
        t = torch.randint(0, self.schedule.num_timesteps, (z.shape[0],), device=z.device)
        return measure_flops(self.model, lambda: self.model(z, t, cond), loss_fn=lambda out: out.float().square().mean())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        loss = self._step(batch, "train", drop=True)
        return loss if self.nonfinite.usable(self, loss) else None  # None: Lightning skips the update

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here rather than in on_train_batch_end: ModelCheckpoint saves in its on_train_batch_end,
        # which runs before the module's, so a checkpoint there would miss this step's EMA update
        # and a resumed run would drift from an uninterrupted one.
        if self.model_ema is not None:
            self._ema().update(self.model)

    def on_validation_epoch_start(self) -> None:
        if self.model_ema is not None:
            self._ema().store(self.model)
            self.model_ema.copy_to(self.model)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", drop=False)
        if batch_idx == 0:
            n = self.hparams.log_images
            self._val_batch = {k: v[:n] for k, v in batch.items()
                               if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.ndim > 0)}

    def on_validation_epoch_end(self) -> None:
        if self._val_batch is not None and self.hparams.log_images and not self.trainer.sanity_checking:
            spec = dict(self.hparams.val_sampler or {})
            images = self.sample(self._val_batch, progress=False, use_ema=False, **spec)
            # Latent cache batches hold no images: then the grid shows the samples only.
            rows = [self._val_batch["image"], images] if "image" in self._val_batch else [images]
            log_grid(self.trainer, "val/samples", torch.cat(rows), nrow=len(images))
        self._val_batch = None
        if self.model_ema is not None:
            self.model_ema.restore(self.model)

    def configure_optimizers(self):
        lr = trainer_effective_lr(self, self.hparams.base_lr, self.hparams.scale_lr)
        params = list(self.model.parameters())
        if self.cond_stage_model is not None and self.hparams.cond_stage_trainable:
            params += list(self.cond_stage_model.parameters())
        if self.hparams.learn_logvar:
            params.append(self.logvar)
        optimizer = make_optimizer(self._optimizer_factory, params, lr)
        warmup, lr_schedule = self.hparams.warmup_steps, self.hparams.lr_schedule
        if not warmup and lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        scheduler = warmup_scheduler(optimizer, warmup, total, lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.model_ema is not None:  # saved while validation or sampling runs on the EMA weights
            self.model_ema.put_live_weights(checkpoint["state_dict"], "model.")
        if self._ema_sharded:  # the whole EMA, as without FSDP
            ema_to_checkpoint(self.model_ema, self.model, fsdp_root(self._trainer), checkpoint["state_dict"],
                              "model_ema.")
        config = checkpoint.get("build_config")
        if config is None:
            return
        # Store the first stage's architecture instead of "load it from run X": the weights are
        # in this checkpoint, so it rebuilds without the first-stage run folder.
        arch = getattr(self.first_stage_model, "build_config", None)
        if arch is not None:
            config = {**config, "first_stage": arch}
        # And the caption tokenizer itself instead of the file (or shards) it was read from, so
        # a copied or moved run folder, or the checkpoint alone, rebuilds the same text encoder.
        tokenizer = getattr(self.cond_stage_model, "tokenizer", None)
        if isinstance(tokenizer, CaptionTokenizer) and isinstance(config.get("cond_stage"), dict):
            stored = {"_target_": "ldm.nets.tokenizer.CaptionTokenizer.from_base64", "data": tokenizer.to_base64()}
            config = {**config, "cond_stage": {**config["cond_stage"], "tokenizer": stored}}
        checkpoint["build_config"] = config

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restarted = True

    # --- sampling ------------------------------------------------------------------------
    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of `image_size` px images."""
        f = self.first_stage_model.downsampling_factor
        if image_size % f:
            raise ValueError(f"image size {image_size} is not divisible by the first stage's f = {f}")
        return (self.first_stage_model.latent_channels, image_size // f, image_size // f)

    @torch.no_grad()
    def sample(self, batch: dict | None = None, n: int | None = None, image_size: int | None = None,
               name: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0,
               seeds: Sequence[int] | None = None, use_ema: bool = True, progress: bool = True,
               mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
               x_T: torch.Tensor | None = None, negative=None, return_latents: bool = False,
               init: torch.Tensor | None = None, strength: float = 1.0, **sampler_kwargs) -> torch.Tensor:
        """Generate images.

        batch: condition inputs (e.g. {'caption': [...]}, {'class_label': tensor},
            {'lowres': images}); None for unconditional models (then give n).
        image_size: output side in pixels (default: the batch's `image` size or the first
            stage's training resolution); larger than training works (the UNet is convolutional).
        seeds: one per image; image i depends only on its seed, not on the batch size.
        mask, known: inpainting by masked sampling: pixels where mask == 1 are kept from `known`.
        x_T: start from this latent noise instead of the seeds' (later noise still comes from the seeds).
        init, strength: img2img / SDEdit: encode the images `init` (N, 3, H, W) in [-1, 1] (posterior
            mean), noise them with the seeds' noise to the start of the last round(strength x S)
            steps of the sampler's S-step grid and denoise from there. strength 0 returns the
            encoded-decoded images; strength 1 starts from the seeds' pure noise, i.e. equals
            sampling without `init`.
        negative: condition inputs for the unconditional branch of guidance (negative prompts,
            one per image) instead of the null condition.
        sampler_kwargs: passed to the sampler (eta, compat, discretize, ...).
        """
        batch = dict(batch or {})
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1] (0: the input image, 1: pure noise), got {strength}")
        if init is not None and x_T is not None:
            raise ValueError("give either init (img2img) or x_T (the starting noise), not both")
        if init is not None:
            n = len(init) if n is None else n
            if len(init) != n:
                raise ValueError(f"{len(init)} init images for {n} samples")
            image_size = image_size or init.shape[-1]
            if tuple(init.shape[-2:]) != (image_size, image_size):
                raise ValueError(f"init images are {tuple(init.shape[-2:])} px, expected {image_size} x {image_size}: "
                                 "resize or crop them to the sampled size (image_size)")
        if n is None:
            n = len(next(iter(batch.values()))) if batch else None
        if n is None:
            raise ValueError("an unconditional model needs n, the number of images")
        if image_size is None:
            image_size = batch["image"].shape[-1] if "image" in batch else self.hparams.image_size
        shape = self.latent_shape(image_size)
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        batch = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        self.check_guidance(guidance_scale)
        seed_noise, generators = noise_for_seeds(seeds, shape, device=self.device)
        x_T = seed_noise if x_T is None else x_T.to(self.device)
        if mask is not None:
            mask = torch.nn.functional.interpolate(mask.to(self.device).float(), size=shape[1:], mode="nearest")
        if name != "ddpm":  # DDPM always walks all T steps
            sampler_kwargs["num_steps"] = num_steps
        sampler = get_sampler(name, schedule=self.schedule, parameterization=self.parameterization, **sampler_kwargs)
        steps = sampler.num_steps if init is None else round(strength * sampler.num_steps)
        swap = use_ema and self.model_ema is not None
        # Under FSDP the EMA swap works on this rank's pieces, so the root unit is gathered after it.
        with self._ema().ema_scope(self.model) if swap else nullcontext(), root_params_gathered(self._trainer):
            if init is not None:
                z_init = self.encode_images(init.to(self.device), sample=False)
                if steps == 0:
                    return z_init if return_latents else self.decode_latents(z_init)
                if strength < 1.0:
                    t0 = torch.full((n,), sampler.start_timestep(steps), device=self.device, dtype=torch.long)
                    x_T = q_sample(self.schedule, z_init, t0, x_T)
            cond = self.condition(batch, shape[1:])
            uncond = None
            if guidance_scale != 1.0:
                uncond = self.null_condition(batch, shape[1:]) if negative is None else \
                    self.condition({**batch, self.hparams.cond_stage_key: negative}, shape[1:])
            z0 = self.encode_images(known.to(self.device), sample=False) if known is not None else None
            z = sampler.sample(self.model, x_T, cond, uncond=uncond, guidance_scale=guidance_scale,
                               mask=mask, x0=z0, generator=generators, progress=progress, steps=steps)
            return z if return_latents else self.decode_latents(z)

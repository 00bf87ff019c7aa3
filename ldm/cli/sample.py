"""The logic behind sample.py: images from a trained latent diffusion checkpoint."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from ldm.data.transforms import ImageTransform, to_uint8
from ldm.modules.latent_diffusion import LatentDiffusion
from ldm.modules.loading import load_module
from ldm.nets.concat import InpaintConcat, LowResConcat, paste_known
from ldm.nets.embedders import TEXT_ENCODERS, SpatialRescaler
from ldm.nets.wrapper import CONTEXT_KEYS
from ldm.utils.checkpoint import find_checkpoint
from ldm.utils.device import autocast, autocast_dtype, resolve_device
from ldm.utils.images import captioned_grid, save_grid

log = logging.getLogger(__name__)


def _load_image(path: str, size: int | None) -> torch.Tensor:
    with Image.open(path) as img:
        img.load()
        return ImageTransform(size or min(img.size))(img).unsqueeze(0)


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def _load_label_map(path: str) -> torch.Tensor:
    """A label map image of class ids (single channel: PNG mode L, P or I) -> (1, H, W) int64."""
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"segmentation={path} is a {img.mode} image; a label map is one channel of class ids "
                             "(PNG mode L, P or I), not colours")
        labels = torch.from_numpy(np.array(img).astype(np.int64))
    if labels.shape[0] != labels.shape[1]:
        raise ValueError(f"the label map is {labels.shape[1]}x{labels.shape[0]} px; sample.py draws square images: "
                         "crop it to a square")
    return labels.unsqueeze(0)


def _prompts(cfg: DictConfig) -> list[str]:
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, tuple)) or OmegaConf.is_list(cfg.prompt) \
        else ([cfg.prompt] if cfg.prompt is not None else [])
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text().splitlines() if line.strip()]
    return prompts


def condition_inputs(model: LatentDiffusion, cfg: DictConfig) -> tuple[dict, list[dict]]:
    """The batch of condition inputs for n images and a per-image record of what was asked."""
    n, key = cfg.n, model.model.conditioning_key
    prompts = _prompts(cfg)
    labels = cfg.class_label
    labels = [] if labels is None else (list(labels) if OmegaConf.is_list(labels) else [labels])
    cond_key = model.hparams.cond_stage_key
    # prompts go to the text encoder under whatever batch key the model reads them (caption, txt, ...)
    text_model = key in CONTEXT_KEYS and isinstance(model.cond_stage_model, TEXT_ENCODERS)
    label_model = cond_key in ("class_label", "class") and key in ("crossattn", "adm", "crossattn_pooled")
    if prompts and not text_model:
        raise ValueError(f"this model is not text-conditional (conditioning on {cond_key or 'nothing'}): drop prompt=")
    if labels and not label_model:
        raise ValueError(f"this model is not class-conditional (conditioning on {cond_key or 'nothing'}): drop class_label=")
    if text_model and not prompts:
        raise ValueError("a text-conditional model needs prompt='...' (or prompts_file=...)")
    if label_model and not labels:
        raise ValueError("a class-conditional model needs class_label=<id> (or a list)")
    batch: dict = {}
    records = [{} for _ in range(n)]
    if cfg.negative_prompt is not None and not text_model:
        raise ValueError("negative_prompt= needs a text-conditional model")
    if prompts:
        batch[cond_key] = [prompts[i % len(prompts)] for i in range(n)]
        used = dict(zip(prompts, model.cond_stage_model.truncations(prompts)))
        for prompt in dict.fromkeys(prompts):
            if used[prompt] is not None:
                log.warning("the prompt %r is longer than the text encoder takes: it is cut to %r "
                            "(samples.json records this as prompt_used)", prompt, used[prompt])
        for r, p in zip(records, batch[cond_key]):
            r["prompt"] = p
            if used[p] is not None:
                r["prompt_used"] = used[p]
    if cfg.negative_prompt is not None:
        [cut] = model.cond_stage_model.truncations([cfg.negative_prompt])
        if cut is not None:
            log.warning("the negative prompt is longer than the text encoder takes: it is cut to %r", cut)
    if labels:
        batch[cond_key] = torch.tensor([int(labels[i % len(labels)]) for i in range(n)])
        for r, c in zip(records, batch[cond_key].tolist()):
            r["class_label"] = c
    sr_model = isinstance(model.concat_stage, LowResConcat)
    if bool(cfg.lowres) != sr_model:
        raise ValueError("lowres= needs a super-resolution model" if cfg.lowres else
                         "a super-resolution model needs lowres=<the low-resolution image>")
    if cfg.lowres:
        low = _load_image(cfg.lowres, None)
        f = cfg.get("sr_factor", 4)
        expected = cfg.image_size // f if cfg.image_size else None
        if expected and low.shape[-1] != expected:
            raise ValueError(f"the low-res image is {low.shape[-1]} px; for image_size={cfg.image_size} and an x{f} "
                             f"model it must be {expected} px")
        batch[model.concat_stage.key] = low.expand(n, -1, -1, -1)
    semantic_model = key == "concat" and isinstance(model.cond_stage_model, SpatialRescaler)
    if bool(cfg.segmentation) != semantic_model:
        raise ValueError("segmentation= needs a semantic synthesis model" if cfg.segmentation else
                         "a semantic synthesis model needs segmentation=<label map PNG>")
    if cfg.segmentation:
        seg = _load_label_map(cfg.segmentation)
        classes = model.cond_stage_model.in_channels
        if int(seg.min()) < 0 or int(seg.max()) >= classes:
            raise ValueError(f"segmentation={cfg.segmentation}: label ids must lie in [0, {classes}) for this model "
                             f"({classes} classes), the map holds {int(seg.min())}..{int(seg.max())}: draw it with "
                             "the ids of the model's training data")
        if cfg.image_size and seg.shape[-1] != cfg.image_size:
            raise ValueError(f"the label map is {seg.shape[-1]} px, image_size={cfg.image_size}: they must agree "
                             "(leave image_size unset to take the map's)")
        batch[cond_key] = seg.expand(n, -1, -1)
    return batch, records


def _default_image_size(model: LatentDiffusion, cfg: DictConfig, batch: dict) -> int:
    """image_size=, else what the inputs imply (x4 of a low-res image, a label map's side), else the training size."""
    if cfg.image_size:
        return cfg.image_size
    if isinstance(model.concat_stage, LowResConcat):
        return batch[model.concat_stage.key].shape[-1] * cfg.get("sr_factor", 4)
    if isinstance(model.cond_stage_model, SpatialRescaler):
        return batch[model.hparams.cond_stage_key].shape[-1]
    return model.hparams.image_size


def _inpainting_inputs(cfg: DictConfig, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(known image (1, 3, S, S) in [-1, 1], keep mask (1, 1, S, S) of 0 / 1) from init_image= and mask=."""
    if not (cfg.init_image and cfg.mask):
        raise ValueError("inpainting needs both init_image= and mask= (white = keep, or mask_white=fill); "
                         "img2img takes init_image= with strength=<0..1>")
    if cfg.mask_white not in ("keep", "fill"):
        raise ValueError(f"mask_white must be keep or fill, got {cfg.mask_white!r}")
    if _image_size(cfg.mask) != _image_size(cfg.init_image):
        raise ValueError(f"mask= is {'x'.join(map(str, _image_size(cfg.mask)))} px and init_image= "
                         f"{'x'.join(map(str, _image_size(cfg.init_image)))} px: draw the mask at the image's size")
    known, mask = _load_image(cfg.init_image, image_size), _load_image(cfg.mask, image_size)
    white = (mask.mean(1, keepdim=True) > 0).float()  # [-1, 1] pixels: white above mid-grey
    return known, (white if cfg.mask_white == "keep" else 1 - white)


def load_model(cfg: DictConfig) -> LatentDiffusion:
    """Our run folder / checkpoint, or an original LDM checkpoint with its YAML (reference_config)."""
    if cfg.reference_config:
        from ldm.convert.reference import load_reference

        model = load_reference(cfg.ckpt, cfg.reference_config, **dict(cfg.reference_overrides or {}))
    else:
        model = load_module(cfg.ckpt, trust_config=cfg.trust_config)
    if not isinstance(model, LatentDiffusion):
        raise ValueError(f"{cfg.ckpt} is a {type(model).__name__} checkpoint; sample.py needs a latent diffusion run")
    return model


def sample(cfg: DictConfig) -> Path:
    """Generate cfg.n images; writes PNGs, grid.png and samples.json into cfg.out_dir."""
    out = Path(cfg.out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model = load_model(cfg).to(device)
    batch, records = condition_inputs(model, cfg)
    guidance = cfg.guidance if cfg.guidance is not None else (3.0 if model.guidable else 1.0)
    model.check_guidance(guidance)
    image_size = _default_image_size(model, cfg, batch)
    mask = known = init = None
    inpainting_model = isinstance(model.concat_stage, InpaintConcat)
    if cfg.strength is not None:  # img2img (SDEdit)
        if not cfg.init_image or cfg.mask or inpainting_model:
            raise ValueError("strength= is img2img: give init_image= without mask= (and not to an inpainting model)")
        init = _load_image(cfg.init_image, image_size)
    elif cfg.init_image or cfg.mask or inpainting_model:
        known, mask = _inpainting_inputs(cfg, image_size)
    if inpainting_model:
        # an inpainting model takes the masked image as its condition (no masked sampling); the
        # known pixels are pasted back afterwards, as the reference's scripts/inpaint.py does
        batch.update({model.concat_stage.image_key: (known * mask).expand(cfg.n, -1, -1, -1),
                      model.concat_stage.mask_key: mask.expand(cfg.n, -1, -1, -1)})
    dtype = autocast_dtype(cfg.precision, device)
    seeds = [cfg.seed + i for i in range(cfg.n)]
    images = []
    chunks = range(0, cfg.n, cfg.batch_size)
    for start in tqdm(chunks, desc="batches", disable=len(chunks) == 1):
        part = {k: v[start:start + cfg.batch_size] for k, v in batch.items()}
        size = min(cfg.batch_size, cfg.n - start)
        with autocast(device, dtype):
            x = model.sample(part or None, n=size, image_size=image_size, name=cfg.sampler, num_steps=cfg.steps,
                             guidance_scale=guidance, seeds=seeds[start:start + size], use_ema=cfg.use_ema,
                             mask=None if mask is None or inpainting_model else mask.expand(size, -1, -1, -1),
                             known=None if known is None or inpainting_model else known.expand(size, -1, -1, -1),
                             negative=None if cfg.negative_prompt is None else [cfg.negative_prompt] * size,
                             init=None if init is None else init.expand(size, -1, -1, -1),
                             strength=1.0 if cfg.strength is None else cfg.strength,
                             **({"eta": cfg.eta} if cfg.sampler == "ddim" else {}))
        images.append(x.float().cpu())
    images = torch.cat(images)
    if inpainting_model:
        images = paste_known(known, images.clamp(-1, 1), mask)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    for i, (array, record) in enumerate(zip(pixels, records)):
        name = f"samples/{i:05d}.png"
        Image.fromarray(array).save(out / name)
        record.update(file=name, seed=seeds[i])
    save_grid(images, out / "grid.png", nrow=min(8, cfg.n))
    labels = [r.get("prompt") or (f"class {r['class_label']}" if "class_label" in r else "") for r in records]
    if any(labels):
        captioned_grid(images, labels, nrow=min(4, cfg.n)).save(out / "grid_captioned.png")
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "out_dir"}
    settings.update(guidance=guidance, image_size=image_size)  # the values used, defaults resolved
    settings["ckpt"] = str((Path(cfg.ckpt) if cfg.reference_config else find_checkpoint(cfg.ckpt)).resolve())
    (out / "samples.json").write_text(json.dumps({"settings": settings, "images": records}, indent=1))
    log.info("wrote %d images, grid.png and samples.json to %s", cfg.n, out)
    return out

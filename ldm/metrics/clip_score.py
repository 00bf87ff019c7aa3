"""CLIP score (Hessel et al. 2021) of generated images against their captions.

Per image: 100 * max(cos(E_image, E_caption), 0) with a CLIP model's projected embeddings;
the metric is the mean over all images (sum states, synchronised over DDP ranks).

A thin metric of our own on transformers' CLIPModel rather than torchmetrics' CLIPScore: that
one loads only a few hub names (a local folder needs a loader function) and, with transformers 5,
fails on the output objects get_image_features now returns. It also clamps the mean rather than
each image. The model comes from any folder or hub name CLIPModel / CLIPProcessor read; offline
(HF_HUB_OFFLINE=1) it must be a local folder with the model and its processor (save_pretrained).
Images are quantised to uint8 first, like every metric here, and prepared by the model's own
processor (resize, crop, CLIP normalisation); captions beyond the text model's length are cut.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ldm.metrics.captioned import CaptionedMetric
from ldm.metrics.features import images_to_uint8


def clip_scores(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """(N,) per-pair CLIP scores 100 * max(cos, 0) of (N, D) image and caption embeddings."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    return 100 * cos.clamp(min=0)


def load_clip(name_or_path: str):
    """(CLIPModel in eval mode, CLIPProcessor) from a folder or hub name."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name_or_path).eval(), CLIPProcessor.from_pretrained(name_or_path)
    except OSError as err:
        raise FileNotFoundError(f"could not load a CLIP model and processor from {name_or_path!r} ({err}); pass "
                                "clip_model=<folder with a CLIPModel and its processor, save_pretrained output>, "
                                "or a hub name on a machine with a network") from err


class ClipScore(CaptionedMetric):
    """Mean CLIP score of generated images against their captions (see module doc).

    model: a folder or hub name of a CLIP model with its processor (e.g. openai/clip-vit-large-patch14).
    update(images, real, captions): generated (N, 3, H, W) images in [-1, 1] (or uint8) with the
        captions they were generated from; real batches are ignored.
    """

    label = "clip_score"
    row_key = "clip_score"

    full_state_update = False
    higher_is_better = True

    def __init__(self, model: str, **kwargs):
        super().__init__(**kwargs)
        self.model, self.processor = load_clip(str(model))
        self.add_state("score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def rows(self, images: Tensor, captions: Sequence[str] | None = None) -> Tensor:
        """(N,) float64: the CLIP score of each generated image against its caption."""
        inputs = self.processor(text=list(captions), images=list(images_to_uint8(images).cpu()), return_tensors="pt",
                                padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        with torch.no_grad():
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        return clip_scores(out.image_embeds, out.text_embeds)

    def add_rows(self, scores: Tensor, captions: list[str]) -> None:
        """Add per-image CLIP scores to the sums."""
        self.score += scores.sum()
        self.n += len(scores)

    def compute(self) -> Tensor:
        """The mean CLIP score over all ranks' images."""
        if int(self.n) == 0:
            raise RuntimeError("clip_score saw no generated images: update(images, real=False, captions=...) "
                               "was never called")
        return self.score / self.n

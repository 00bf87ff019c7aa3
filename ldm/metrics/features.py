"""Feature extractors for FID, KID, IS and precision/recall, behind one interface.

Every extractor is an `nn.Module` that takes a batch of RGB images (N, 3, H, W), either uint8 in
[0, 255] or float in [-1, 1], and returns float32 features (N, num_features). It carries a `name`
and a `settings` dict that together say which features these are; cached statistics store both,
and numbers are only compared when both match (see ldm.metrics.fid.check_compatible).

- InceptionV3Features: torch-fidelity's port of the TF Inception-v3 (2015-12-05), the network
  behind the standard FID / KID / IS numbers (2048-d pool features, 1008 logits).
- VGG16Features: torchvision's ImageNet VGG16, fc7 after ReLU (4096-d), the layer the
  precision/recall paper and StyleGAN2-ADA use.
- ToyFeatures: a fixed, seeded random conv net, no weights file. For tests and toy runs only:
  its numbers are comparable with themselves, never with published ones.
- PrecomputedFeatures: passes features that were extracted earlier (and cached) through.

Float images are quantised to uint8 first (round((x + 1) * 127.5)), exactly what saving the samples
as PNG files would do, so features of a tensor and of its saved image agree.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ldm.utils.checkpoint import load_state_dict_file, load_strict

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


def images_to_uint8(images: Tensor) -> Tensor:
    """(N, 3, H, W) uint8 images as they are, float images in [-1, 1] rounded to uint8.

    Floats are clamped to [-1, 1] first (decoders overshoot slightly); floats beyond +-2 are
    refused, as they are almost surely [0, 255] data passed as floats.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 in [0, 255] or float in [-1, 1], got dtype {images.dtype}")
    if images.numel() and images.detach().abs().amax() > 2:
        raise ValueError("float images must lie in [-1, 1] (this batch reaches beyond +-2); "
                         "pass uint8 images for [0, 255] data, or map the floats to [-1, 1]")
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter and buffer of `module` (names, shapes, bytes).

    Stored in an extractor's settings so statistics from different weights never mix,
    whether the weights came from a local file or a download.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


class FeatureExtractor(nn.Module):
    """Base class: `forward(images) -> (N, num_features)` float32; `name` and `settings`
    identify the features. Extractors are fixed networks: they never leave eval mode."""

    name: str
    num_features: int

    def __init__(self, name: str, num_features: int, settings: Mapping[str, Any]):
        super().__init__()
        self.name = name
        self.num_features = num_features
        self._settings = dict(settings)

    @property
    def settings(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that changes the features."""
        return dict(self._settings)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Stay in eval mode: batch-norm statistics must not follow the evaluated batch."""
        return super().train(False)


class InceptionV3Features(FeatureExtractor):
    """torch-fidelity's TF-compatible Inception-v3: images resized to 299 with TF1 bilinear
    interpolation (as torch-fidelity, not torchmetrics' antialiased default).

    output='pool': the 2048-d pool features (FID, KID, precision/recall as in ADM);
    output='logits': the 1008 logits without bias (IS).
    weights_path: torch-fidelity's weight file (`INCEPTION_URL`); None downloads it into
    the torch hub cache, which needs a network.
    """

    def __init__(self, weights_path: str | Path | None = None, output: Literal["pool", "logits"] = "pool"):
        layers = {"pool": ("2048", 2048), "logits": ("logits_unbiased", 1008)}
        if output not in layers:
            raise ValueError(f"unknown Inception output {output!r}; choose 'pool' or 'logits'")
        layer, dim = layers[output]
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"no Inception weight file at {weights_path}; download {INCEPTION_URL} "
                                    "there, or pass weights_path=None on a machine with a network")
        try:
            # Its throwaway random init must not advance the caller's random stream.
            with torch.random.fork_rng(devices=[]):
                net = FeatureExtractorInceptionV3(
                    "inception-v3-compat", [layer],
                    feature_extractor_weights_path=None if weights_path is None else str(weights_path),
                    verbose=False,
                )
        except URLError as err:
            raise RuntimeError(f"could not download the Inception weights ({err}); fetch {INCEPTION_URL} "
                               "elsewhere and pass its path as weights_path") from err
        super().__init__("inception-v3-tf-2015-12-05", dim, {
            "layer": layer, "resize": "299 bilinear (TF1)", "weights": weights_fingerprint(net)})
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images -> (N, 2048) pool features or (N, 1008) logits."""
        return self.net(images_to_uint8(images))[0]


class VGG16Features(FeatureExtractor):
    """torchvision VGG16, fc7 after ReLU (4096-d), preprocessed as torch-fidelity's VGG16
    extractor: TF1 bilinear resize to 224, ImageNet mean/std.

    weights: a torchvision vgg16 state dict (file or mapping; keys `features.*`, `classifier.*`),
    or None to download torchvision's IMAGENET1K_V1 weights. These are not the NVlabs vgg16.pt
    (converted from Keras) that StyleGAN2-ADA uses: its tables are not reproduced exactly.
    """

    def __init__(self, weights: str | Path | Mapping[str, Tensor] | None = None):
        if weights is None:
            try:
                with torch.random.fork_rng(devices=[]):  # see InceptionV3Features
                    net = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
            except URLError as err:
                raise RuntimeError(f"could not download the torchvision VGG16 weights ({err}); pass a local "
                                   "vgg16 state dict file as weights") from err
        else:
            # Built on the meta device and materialised empty: loading replaces every value,
            # so the slow random init of 138M parameters is skipped.
            with torch.device("meta"):
                net = torchvision.models.vgg16()
            net = net.to_empty(device="cpu")
            state = load_state_dict_file(weights) if isinstance(weights, (str, Path)) else dict(weights)
            load_strict(net, state, source=str(weights) if isinstance(weights, (str, Path)) else "VGG16 weights")
        # fc7 + ReLU is classifier[4]; the dropout and the 1000-way fc8 after it are dropped.
        net.classifier = net.classifier[:5]
        super().__init__("vgg16-torchvision-fc7", 4096, {
            "layer": "fc7_relu", "resize": "224 bilinear (TF1)", "weights": weights_fingerprint(net)})
        self.net = net
        # Scaled in double precision before rounding to float32, as torch-fidelity's constants are.
        mean, std = [255 * m for m in (0.485, 0.456, 0.406)], [255 * s for s in (0.229, 0.224, 0.225)]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images -> (N, 4096) fc7 features."""
        x = images_to_uint8(images).float()
        x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(224, 224), align_corners=False)
        return self.net((x - self.mean) / self.std)


class ToyFeatures(FeatureExtractor):
    """A fixed random conv net (He-normal weights from `seed`, no file): images resized to 32x32,
    three 3x3 conv + ReLU stages (16, 32, 64 channels, the last two with stride 2), each
    average-pooled and concatenated into 112 features; output='logits' adds a fixed random
    linear head to `num_classes` logits (for IS).

    Only for tests and toy runs: its numbers are comparable with its own numbers (same seed),
    never with published FID/IS values.
    """

    widths = (16, 32, 64)

    def __init__(self, seed: int = 0, output: Literal["pool", "logits"] = "pool", num_classes: int = 10):
        if output not in ("pool", "logits"):
            raise ValueError(f"unknown toy output {output!r}; choose 'pool' or 'logits'")
        # Built on the meta device and initialised from a private generator: the global
        # random stream of the caller (e.g. a training run) is left untouched.
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], 3
        for i, c_out in enumerate(self.widths):
            conv = nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, device="meta").to_empty(device="cpu")
            nn.init.normal_(conv.weight, std=(2.0 / (9 * c_in)) ** 0.5, generator=gen)
            nn.init.normal_(conv.bias, std=0.1, generator=gen)
            convs.append(conv)
            c_in = c_out
        pool_dim = sum(self.widths)
        head = nn.Linear(pool_dim, num_classes, device="meta").to_empty(device="cpu")
        nn.init.normal_(head.weight, std=pool_dim ** -0.5, generator=gen)
        nn.init.zeros_(head.bias)
        dim = pool_dim if output == "pool" else num_classes
        settings = {"seed": seed, "layer": output, "resize": "32 bilinear antialias"}
        if output == "logits":
            settings["num_classes"] = num_classes
        super().__init__("toy-random-conv", dim, settings)
        self.convs = nn.ModuleList(convs)
        self.head = head if output == "logits" else None
        self._settings["weights"] = weights_fingerprint(self)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) images -> (N, 112) pooled activations or (N, num_classes) logits."""
        x = images_to_uint8(images).float() / 127.5 - 1
        x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        pooled = []
        for conv in self.convs:
            x = F.relu(conv(x))
            pooled.append(x.mean(dim=(2, 3)))
        features = torch.cat(pooled, dim=1)
        return features if self.head is None else self.head(features)


class PrecomputedFeatures(FeatureExtractor):
    """Identity on (N, num_features) features extracted earlier by the extractor called
    `name` with `settings` (e.g. loaded from a feature cache), so metrics and cached
    statistics keep knowing where the features came from."""

    def __init__(self, num_features: int, name: str, settings: Mapping[str, Any]):
        super().__init__(name, num_features, settings)

    def forward(self, features: Tensor) -> Tensor:
        """Check the shape and return the features as float32."""
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features (N, {self.num_features}) from {self.name}, "
                             f"got shape {tuple(features.shape)}")
        return features.float()


"""LPIPS (Zhang et al. 2018) with the VGG16 trunk: the reconstruction metric and the
autoencoder's perceptual loss.

Built on the `lpips` package: its calibrated linear layers (v0.1, shipped inside the package)
and its VGG16 trunk, whose ImageNet weights torchvision would download. `build_lpips` never
downloads when given a local torchvision vgg16 state dict (`backbone_weights`) or asked for a
random trunk (`random_backbone`, tests and toy runs only: such distances are not LPIPS).

The state dict has the reference layout (`scaling_layer.*`, `net.slice{1..5}.*`,
`lin{0..4}.model.1.weight`), so `loss.perceptual_loss.*` of reference autoencoder checkpoints fits.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from urllib.error import URLError

import lpips as lpips_package
import torch
from torch import Tensor

from ldm.utils.checkpoint import CheckpointMismatchError, load_state_dict_file, load_strict

# lpips looks for its weights next to the file of the class it builds, i.e. ours: point it home.
LINEAR_WEIGHTS = Path(lpips_package.__file__).parent / "weights" / "v0.1" / "vgg.pth"


# lpips cuts torchvision's vgg16.features into slices 1-5 at layers 4, 9, 16 and 23; these are
# the conv layers (the ones with weights) and their slice.
_TRUNK_SLICE = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}


def trunk_state(vgg_state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """The `features.*` entries of a torchvision vgg16 state dict under lpips' trunk names
    (`features.{i}.weight` -> `slice{s}.{i}.weight`); checked before any network is built."""
    features = {k: v for k, v in vgg_state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"{source} holds no `features.*` keys; pass torchvision's vgg16 state dict "
                         "(e.g. vgg16-397923af.pth)")
    renamed, unexpected = {}, []
    for key, value in features.items():
        _, index, param = key.split(".", 2)
        if index.isdigit() and int(index) in _TRUNK_SLICE and param in ("weight", "bias"):
            renamed[f"slice{_TRUNK_SLICE[int(index)]}.{index}.{param}"] = value
        else:
            unexpected.append(key)
    missing = sorted(f"features.{i}.{p}" for i in _TRUNK_SLICE for p in ("weight", "bias")
                     if f"slice{_TRUNK_SLICE[i]}.{i}.{p}" not in renamed)
    if missing or unexpected:
        raise CheckpointMismatchError(source, missing, sorted(unexpected), [])
    return renamed


class LPIPS(lpips_package.LPIPS):
    """LPIPS-VGG distance: `forward(x, y)` on [-1, 1] images (N, 3, H, W) -> (N, 1, 1, 1).

    Frozen and always in eval mode (the linear layers' dropout stays off); gradients still
    flow to the inputs, as the perceptual loss needs. See `build_lpips` for the arguments.
    """

    def __init__(self, backbone_weights: str | Path | None = None, random_backbone: bool = False):
        if backbone_weights is not None and random_backbone:
            raise ValueError("pass either backbone_weights or random_backbone=True, not both")
        trunk = None
        if backbone_weights is not None:
            trunk = trunk_state(load_state_dict_file(backbone_weights), str(backbone_weights))
        with warnings.catch_warnings():
            # lpips calls torchvision.models.vgg16(pretrained=...), deprecated in torchvision.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            # On a forked RNG with a fixed seed: a random trunk is the same in every run, and
            # the caller's random stream is untouched by the initialisation.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    super().__init__(net="vgg", pnet_rand=backbone_weights is not None or random_backbone,
                                     model_path=str(LINEAR_WEIGHTS), verbose=False)
                except URLError as err:
                    raise RuntimeError(f"could not download torchvision's VGG16 weights for LPIPS ({err}); pass "
                                       "backbone_weights=<local vgg16 .pth or .safetensors>") from err
        if trunk is not None:
            load_strict(self.net, trunk, source=str(backbone_weights))  # also checks the shapes
        # lpips also registers the linear layers as `lins.*`; the reference keeps them only as
        # lin0..lin4, so a plain list keeps the state dict in the reference layout.
        lins = list(self.lins)
        del self.lins
        self.lins = lins
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode: LPIPS is a fixed metric."""
        return super().train(False)


def build_lpips(backbone_weights: str | Path | None = None, random_backbone: bool = False) -> LPIPS:
    """LPIPS-VGG with the package's calibrated linear layers and a VGG16 trunk from
    `backbone_weights` (a torchvision vgg16 state dict file; only `features.*` is used), or a
    fixed random trunk (`random_backbone=True`), or, with neither, torchvision's download."""
    return LPIPS(backbone_weights=backbone_weights, random_backbone=random_backbone)

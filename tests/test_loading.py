"""Loading checkpoints: our first-stage .ckpt fits first_stage=from_checkpoint."""
from __future__ import annotations

import torch

from ldm.convert.reference import first_stage_from_checkpoint
from ldm.diffusion.ema import EMA
from ldm.first_stage.factory import autoencoder_kl


def test_first_stage_from_checkpoint_takes_our_autoencoder_run_with_its_ema(tmp_path):
    arch = {"_target_": "ldm.first_stage.factory.autoencoder_kl", "f": 4, "ch": 32, "num_res_blocks": 1,
            "z_channels": 4, "attn_resolutions": [], "resolution": 16}
    kwargs = {k: v for k, v in arch.items() if k != "_target_"}
    torch.manual_seed(0)
    trained = autoencoder_kl(**kwargs)
    ema = EMA(trained, 0.5)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # the live weights move away from the EMA's
    # The layout of an ldm.modules.autoencoder.AutoencoderModule checkpoint.
    state = {**{f"first_stage.{k}": v for k, v in trained.state_dict().items()},
             **{f"ema.{k}": v for k, v in ema.state_dict().items()},
             "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": state, "build_config": {}}, tmp_path / "last.ckpt")
    loaded = first_stage_from_checkpoint(arch, tmp_path / "last.ckpt")
    expected = autoencoder_kl(**kwargs)
    expected.load_state_dict(trained.state_dict())
    ema.copy_to(expected)
    for (name, got), want in zip(loaded.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    assert loaded.build_config == arch and not any(p.requires_grad for p in loaded.parameters())

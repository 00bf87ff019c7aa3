"""Loading a checkpoint from a stranger: the config stored in it builds only the project's own
model classes unless the caller trusts it; our first-stage .ckpt fits first_stage=from_checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.cli.evaluate import batch_transforms
from ldm.convert.reference import first_stage_from_checkpoint
from ldm.diffusion.ema import EMA
from ldm.first_stage.factory import autoencoder_kl
from ldm.modules.loading import load_module
from ldm.utils.trusted_config import UntrustedConfigError

TOKENIZER = "ldm.data.tokenizer.ensure_tokenizer"


def _pipe_tokenizer(tmp_path: Path, marker: Path) -> dict:
    """The tokenizer node of a text LDM whose tokenizer.json is missing, with a `pipe:` shard URL
    that runs a command when the tokenizer is rebuilt from the shards' captions."""
    return {"_target_": TOKENIZER, "path": str(tmp_path / "gone" / "tokenizer.json"),
            "shards": f"pipe:touch {marker} && cat /dev/null", "vocab_size": 300}


def _checkpoint(path: Path, build_config: dict) -> Path:
    torch.save({"build_config": build_config, "state_dict": {}}, path)
    return path


def test_a_strangers_stored_config_cannot_run_a_command(tmp_path):
    marker = tmp_path / "the-command-ran"
    config = {"_target_": "ldm.modules.latent_diffusion.LatentDiffusion",
              "cond_stage": {"_target_": "ldm.nets.embedders.TransformerTextEncoder",
                             "tokenizer": _pipe_tokenizer(tmp_path, marker), "n_embed": 8, "n_layer": 0}}
    ckpt = _checkpoint(tmp_path / "stranger.ckpt", config)
    with pytest.raises(UntrustedConfigError) as err:
        load_module(ckpt)
    assert not marker.exists()
    message = str(err.value)
    assert f"cond_stage.tokenizer: {TOKENIZER}" in message and "trust_config" in message
    assert "LatentDiffusion" not in message and "TransformerTextEncoder" not in message  # ours: allowed

    # The opt-in does what it says: the stored config is built as it is (the command runs).
    with pytest.raises(Exception):
        load_module(ckpt, trust_config=True)
    assert marker.exists()


def test_every_command_that_loads_a_checkpoint_refuses_it_without_the_opt_in(tmp_path):
    from helpers import compose
    from ldm.cli.evaluate import evaluate
    from ldm.cli.sample import sample
    from ldm.cli.word_gap import main as word_gap

    marker = tmp_path / "the-command-ran"
    ckpt = _checkpoint(tmp_path / "stranger.ckpt", _pipe_tokenizer(tmp_path, marker))
    out = f"out_dir={tmp_path / 'out'}"
    for run in (lambda: sample(compose("sample", [f"ckpt={ckpt}", "prompt=a red circle", out], tmp_path / "s")),
                lambda: evaluate(compose("evaluate", [f"ckpt={ckpt}", "features=toy", "metrics=[is]", out],
                                         tmp_path / "e")),
                lambda: word_gap([str(ckpt), str(tmp_path)])):
        with pytest.raises(UntrustedConfigError, match=TOKENIZER):
            run()
    assert not marker.exists()
    with pytest.raises(Exception):
        sample(compose("sample", [f"ckpt={ckpt}", "prompt=a red circle", "trust_config=true", out], tmp_path / "s"))
    assert marker.exists()
    marker.unlink()
    with pytest.raises(Exception):
        word_gap([str(ckpt), str(tmp_path), "--trust-config"])
    assert marker.exists()


@pytest.mark.parametrize("node, refused", [
    ({"_target_": "builtins.print", "_args_": ["hello"]}, "unet: builtins.print"),
    ({"_target_": "ldm.nets.unet.UNetModel", "_partial_": True}, "unet: _partial_"),
    ({"_target_": "ldm.nets.unet.UNetModel", "_args_": [1]}, "unet: _args_"),
    ({"_target_": "ldm.nets.unet.UNetModel", "model_channels": "${oc.env:HOME}"},
     "unet.model_channels: interpolation"),
    ([{"_target_": "ldm.nets.unet.UNetModel"}, {"_target_": "torch.load", "f": "x.pt"}], "unet[1]: torch.load"),
    ({"_target_": "ldm.nets.unet.UNetModel.__init__.__globals__"}, "unet: ldm.nets.unet.UNetModel.__init__"),
])
def test_only_the_projects_model_classes_are_built(tmp_path, node, refused):
    ckpt = _checkpoint(tmp_path / "x.ckpt", {"_target_": "ldm.modules.latent_diffusion.LatentDiffusion", "unet": node})
    with pytest.raises(UntrustedConfigError, match="trust_config") as err:
        load_module(ckpt)
    assert refused in str(err.value)


def test_evaluate_builds_a_run_folders_batch_transforms_only_from_the_allow_list(tmp_path):
    marker = tmp_path / "the-command-ran"
    run = tmp_path / "run"
    run.mkdir()
    spec = [{"_target_": "ldm.data.degradations.SRDegradation", "factor": 4},
            {"_target_": "ldm.data.tokenizer.captions_from_shards", "urls": f"pipe:touch {marker}"}]
    OmegaConf.save({"data": {"batch_transforms": spec}}, run / "config.yaml")
    cfg = OmegaConf.create({"batch_transforms": None, "trust_config": False})
    with pytest.raises(UntrustedConfigError, match=r"\[1\]: ldm.data.tokenizer.captions_from_shards"):
        batch_transforms(cfg, run)
    assert not marker.exists()
    OmegaConf.save({"data": {"batch_transforms": spec[:1]}}, run / "config.yaml")
    assert [type(t).__name__ for t in batch_transforms(cfg, run)] == ["SRDegradation"]


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


def test_the_stored_tokenizer_survives_the_config_round_trip():
    """A checkpoint stores its caption tokenizer in the build config; a vocabulary holding `${`
    (captions with code in them) must neither be refused nor resolved by OmegaConf."""
    from hydra.utils import instantiate

    from ldm.nets.tokenizer import CaptionTokenizer
    from ldm.modules.loading import MODEL_TARGETS
    from ldm.utils.trusted_config import refused_entries

    captions = ["set ${HOME} and ${oc.env:USER} in a shell"] * 50 + ["a red circle"] * 50
    tokenizer = CaptionTokenizer.train(captions, vocab_size=300)
    assert "${" in tokenizer.backend.to_str()
    node = {"_target_": "ldm.nets.tokenizer.CaptionTokenizer.from_base64", "data": tokenizer.to_base64()}
    assert refused_entries(node, MODEL_TARGETS) == []
    rebuilt = instantiate(node)
    for got, want in zip(rebuilt.encode_batch(captions[:1], 24), tokenizer.encode_batch(captions[:1], 24)):
        assert torch.equal(got, want)

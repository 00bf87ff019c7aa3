"""Helpers the tests share: fixture paths, composed configs as train.py gets them, the tiny
run settings, and small random models made without a download.

Tests import them with `from helpers import ...`: pytest puts tests/ on sys.path (rootdir
conftest, no __init__.py), whether it runs from the repository root or a single file.
"""
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "ldm-reference"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose(config_name: str, overrides: list[str], out_dir: Path, data_dir: Path | None = None):
    """A Hydra config as train.py would get it, with the run folder and data under tmp paths."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    paths = [f"paths.output_dir={out_dir}", f"paths.log_dir={out_dir.parent}"]
    if data_dir is not None:
        paths.append(f"paths.data_dir={data_dir}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides + paths)


# Small data and steps for end-to-end runs of the toy experiments (configs/debug/tiny.yaml).
TINY_RUN = ["debug=tiny"]


def make_tiny_clip(folder: Path) -> dict[str, int]:
    """A tiny random CLIP text model (hidden size 32) and a BPE tokenizer saved in `folder`
    as save_pretrained output; returns the vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab[token] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    CLIPTextModel(config).save_pretrained(folder)
    return vocab


def make_random_inception(path: Path) -> Path:
    """torch-fidelity's Inception-v3 weight file with random weights of the right layout, made
    without a download (for InceptionV3Features(weights_path=path))."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        state = tf_inception.FeatureExtractorInceptionV3("random", ["2048"]).state_dict()
    torch.save(state, path)
    return path


def _diffusers_pipeline_images(folder, prompts: list[str], x_T: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """What diffusers' own StableDiffusionPipeline draws from `folder` (images in [0, 1])."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
    size = x_T.shape[-1] * pipe.vae_scale_factor
    return pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, eta=0.0,
                latents=x_T.clone(), output_type="pt").images


def assert_diffusers_pipeline_matches(module, folder, prompts: list[str], steps: int = 4, guidance: float = 3.0) -> None:
    """Same initial latents, DDIM steps, guidance, eta 0: diffusers' images equal ours (fp32)."""
    x_T = torch.randn(len(prompts), *module.latent_shape(module.hparams.image_size),
                      generator=torch.Generator().manual_seed(1))
    ours = module.sample({"caption": prompts}, name="ddim", num_steps=steps, guidance_scale=guidance, x_T=x_T,
                         compat=True, eta=0.0, progress=False)
    theirs = _diffusers_pipeline_images(folder, prompts, x_T, steps, guidance)
    torch.testing.assert_close(theirs, ((ours + 1) / 2).clamp(0, 1), rtol=0, atol=1e-4)
    assert theirs.std() > 0.01  # not a constant image

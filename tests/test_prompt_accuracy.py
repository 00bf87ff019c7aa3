"""Text-alignment metrics: caption parsing, the shape classifier and its files, PromptAccuracy,
CLIP score, and both in evaluate.py and the evaluation callback on a tiny text LDM.

A shape classifier is trained once for the module (32 px, briefly) on generated images; the CLIP
model is a tiny random one saved locally (nothing is downloaded)."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import TINY_RUN, compose, make_tiny_clip
from ldm.evaluation.protocol import check_caption_metrics
from ldm.cli.evaluate import evaluate
from ldm.cli.train import train
from ldm.data.pipeline import SampleDecoder, ShardStream
from ldm.data.synthetic import SHAPES, ShapesGenerator
from ldm.data.transforms import ImageTransform
from ldm.metrics.clip_score import ClipScore, load_clip
from ldm.metrics.collection import build_metrics
from ldm.metrics.features import images_to_uint8
from ldm.metrics.prompt_accuracy import PromptAccuracy, chance_accuracy, set_codes
from ldm.metrics.prompts import LABELS, NUM_LABELS, Named, caption_labels, object_labels, parse_caption
from ldm.metrics.shape_classifier import ClassifierMismatchError, load_classifier, read_settings
from ldm.cli.train_classifier import generated_batch, held_out_accuracy, train_classifier
from ldm.cli.train_classifier import main as train_classifier_main
from ldm.cli.word_gap import SWAPS, swap_colors, swap_shapes, word_gaps
from ldm.cli.word_gap import main as word_gap_main
from ldm.modules.loading import load_module
from ldm.utils.checkpoint import CheckpointMismatchError


# ---------------------------------------------------------------- captions


def test_captions_name_exactly_the_drawn_objects():
    backgrounds = set()
    for seed, resolution in ((0, 32), (5, 64)):
        generator = ShapesGenerator(resolution, seed)
        samples = [generator[i] for i in range(300)]
        for s in samples:
            assert parse_caption(s.caption) == Named(frozenset(o.shape for o in s.objects),
                                                     frozenset(o.color for o in s.objects)), s.caption
            backgrounds.add(s.background)
        expected = torch.stack([object_labels(s.objects) for s in samples])
        assert torch.equal(caption_labels([s.caption for s in samples]), expected)
    assert {"dark blue", "light green"} <= backgrounds  # the background names that hold object colours


def test_caption_grammar_edge_cases():
    named = parse_caption("a small red circle above a large blue square on a light green background")
    assert named == Named(frozenset({"circle", "square"}), frozenset({"red", "blue"}))  # not green
    named = parse_caption("a small white star, a small white star and a small black hexagon on a dark blue background")
    assert named == Named(frozenset({"star", "hexagon"}), frozenset({"white", "black"}))  # not blue
    assert list(LABELS[:len(SHAPES)]) == list(SHAPES) and NUM_LABELS == 14
    with pytest.raises(ValueError, match="names no"):
        parse_caption("a photo of a cat on a grey background")
    with pytest.raises(ValueError, match="names no"):
        parse_caption("")  # the null condition names nothing


# ---------------------------------------------------------------- the metric


class StubClassifier(nn.Module):
    """Returns given logits, batch after batch (the unit test's stand-in for a trained classifier)."""

    resolution = 32

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits, self.done = logits, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.done:self.done + len(images)]
        self.done += len(images)
        return out


CAPTIONS = [
    "a large red circle on a grey background",
    "a small blue square above a large green star on a beige background",
    "a large yellow triangle on a dark blue background",
    "a small white hexagon, a small black diamond and a small orange hexagon on a grey background",
]
# Present labels per image; every other label gets a clearly negative logit.
PRESENT = [
    {"circle", "red", "star"},                              # all named present (+ an extra star): hit
    {"square", "blue", "green"},                            # star missing: shape miss, colours hit
    {"triangle", "blue"},                                   # yellow missing (blue is the background's)
    {"hexagon", "diamond", "white", "black", "orange", "red"},  # all named present: hit
]


def stub_logits(present: list[set[str]], margin: float = 0.4) -> torch.Tensor:
    """Logits just above / below the 0.5 threshold (probabilities ~0.6 / ~0.4)."""
    return torch.tensor([[margin if label in p else -margin for label in LABELS] for p in present])


def brute_force_chance(present: list[set[str]], captions: list[str]) -> float:
    """Share of all (image, caption) pairs whose named labels are all present."""
    named = [parse_caption(c) for c in captions]
    hits = [n.shapes | n.colors <= p for p, n in itertools.product(present, named)]
    return sum(hits) / len(hits)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric PromptAccuracy was called before")
def test_prompt_accuracy_against_a_hand_computation():
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    metric = PromptAccuracy(StubClassifier(stub_logits(PRESENT)))
    metric.update(torch.rand(3, 3, 32, 32), real=True)  # real batches do not enter
    metric.update(images[:3], real=False, captions=CAPTIONS[:3])
    metric.update(images[3:], real=False, captions=CAPTIONS[3:])
    result = {k: v.item() for k, v in metric.compute().items()}
    assert result["prompt_accuracy"] == 2 / 4 and result["shape_accuracy"] == 3 / 4
    assert result["color_accuracy"] == 3 / 4
    chance = brute_force_chance(PRESENT, CAPTIONS)
    assert result["prompt_accuracy_chance"] == pytest.approx(chance, abs=1e-12) and 0 < chance < 0.5

    # A stricter threshold: probabilities ~0.6 no longer count as present.
    strict = PromptAccuracy(StubClassifier(stub_logits(PRESENT)), threshold=0.7)
    strict.update(images, real=False, captions=CAPTIONS)
    assert strict.compute()["prompt_accuracy"].item() == 0

    with pytest.raises(ValueError, match="caption of every generated image"):
        PromptAccuracy(StubClassifier(stub_logits(PRESENT))).update(images, real=False)
    with pytest.raises(ClassifierMismatchError, match="trained on 32 px"):
        PromptAccuracy(StubClassifier(stub_logits(PRESENT))).update(torch.zeros(4, 3, 64, 64), real=False,
                                                                    captions=CAPTIONS)
    with pytest.raises(RuntimeError, match="no generated images"):
        PromptAccuracy(StubClassifier(stub_logits(PRESENT))).compute()


def test_chance_accuracy_equals_all_pairs_on_random_sets():
    g = torch.Generator().manual_seed(3)
    predicted = torch.rand(40, NUM_LABELS, generator=g) < 0.6
    named = torch.rand(25, NUM_LABELS, generator=g) < 0.15
    counts = [torch.bincount(set_codes(x), minlength=2 ** NUM_LABELS) for x in (predicted, named)]
    expected = sum(bool((p | ~n).all()) for p, n in itertools.product(predicted, named)) / (40 * 25)
    assert chance_accuracy(*counts) == pytest.approx(expected, abs=1e-12) and 0 < expected < 1


def test_metric_states_merge_like_ranks():
    # Two "ranks" with half the images each; merging their sum states (what DDP sync does with
    # dist_reduce_fx='sum') gives the numbers of one metric that saw everything.
    present = PRESENT * 3
    captions = CAPTIONS * 3
    images = torch.zeros(12, 3, 32, 32)
    whole = PromptAccuracy(StubClassifier(stub_logits(present)))
    whole.update(images, real=False, captions=captions)
    a = PromptAccuracy(StubClassifier(stub_logits(present[:5])))
    b = PromptAccuracy(StubClassifier(stub_logits(present[5:])))
    a.update(images[:5], real=False, captions=captions[:5])
    b.update(images[5:], real=False, captions=captions[5:])
    a.merge_state(b)
    assert {k: v.item() for k, v in a.compute().items()} == {k: v.item() for k, v in whole.compute().items()}


# ---------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A 32 px shape classifier trained briefly (generated images, nothing on disk but its files)."""
    folder = tmp_path_factory.mktemp("classifier") / "shapes-32"
    train_classifier(32, folder, steps=CLASSIFIER_STEPS, batch_size=CLASSIFIER_BATCH, held_out=200, progress=False)
    return folder


CLASSIFIER_STEPS, CLASSIFIER_BATCH = 300, 64


def test_briefly_trained_classifier_is_clearly_above_chance(classifier):
    settings = read_settings(classifier)
    assert settings["resolution"] == 32 and settings["training"]["images"] == CLASSIFIER_STEPS * CLASSIFIER_BATCH
    held_out = settings["held_out"]
    # Its own held-out numbers, and fresh images of another generator seed scored here.
    model = load_classifier(classifier, resolution=32)
    images, labels, captions = generated_batch(ShapesGenerator(32, seed=77), 0, 200)
    metric = PromptAccuracy(model)
    metric.update(images, real=False, captions=captions)
    fresh = {k: v.item() for k, v in metric.compute().items()}
    for result in (held_out, fresh):
        assert result["color_accuracy"] > 0.9
        # Brief training learns colours first; whole prompts (every shape right) lag but beat chance clearly.
        assert result["prompt_accuracy"] > max(0.05, 5 * result["prompt_accuracy_chance"]), result
    with torch.no_grad():
        label_accuracy = ((torch.sigmoid(model(images)) > 0.5) == labels).float().mean().item()
    assert label_accuracy > 0.85
    # Prompt accuracy against the wrong captions (shifted by one) collapses towards chance.
    shifted = PromptAccuracy(model)
    shifted.update(images, real=False, captions=captions[1:] + captions[:1])
    assert shifted.compute()["prompt_accuracy"].item() < fresh["prompt_accuracy"] / 2



@pytest.mark.parametrize("folder_name, resolution, scenes", [
    ("shapes-32", 32, {}),
    ("shapes-64", 64, {}),
    ("shapes-32-large", 32, {"max_objects": 1, "sizes": {"large": 0.4}}),  # data=shapes_large (the quickstart)
])
def test_shipped_classifiers_read_fresh_images_correctly(folder_name, resolution, scenes):
    # assets/classifiers/* are what the quickstart and the f-sweep score with: on images of a
    # generator seed they never saw, whole prompts must come out right almost always.
    folder = Path(__file__).resolve().parents[1] / "assets" / "classifiers" / folder_name
    model = load_classifier(folder, resolution=resolution)
    assert {k: read_settings(folder)["training"].get(k) for k in scenes} == scenes
    images, _, captions = generated_batch(ShapesGenerator(resolution, seed=123, **scenes), 0, 300)
    metric = PromptAccuracy(model)
    metric.update(images, real=False, captions=captions)
    result = {k: v.item() for k, v in metric.compute().items()}
    assert result["prompt_accuracy"] > 0.9 and result["prompt_accuracy_chance"] < 0.1, result

def test_classifier_command_trains_on_the_scenes_it_is_given(tmp_path):
    out = tmp_path / "large"
    train_classifier_main(["--resolution", "32", "--out", str(out), "--steps", "3", "--batch-size", "8",
                           "--held-out", "16", "--max-objects", "1", "--size", "large=0.4"])
    settings = read_settings(out)
    assert settings["training"]["max_objects"] == 1 and settings["training"]["sizes"] == {"large": 0.4}
    # The held-out score was taken on scenes of those settings (generator seed + 1), not the defaults.
    model = load_classifier(out)
    same = held_out_accuracy(model, ShapesGenerator(32, 1, max_objects=1, sizes={"large": 0.4}), 16, 8)
    assert settings["held_out"] == {"n": 16, "generator_seed": 1, **same}
    assert held_out_accuracy(model, ShapesGenerator(32, 1), 16, 8) != same
    with pytest.raises(SystemExit, match="WORD=RADIUS"):
        train_classifier_main(["--resolution", "32", "--out", str(out), "--size", "large"])


def test_classifier_files_round_trip_and_refuse_mismatches(classifier, tmp_path):
    model = load_classifier(classifier)
    assert not model.training and (classifier / "classifier.safetensors").stat().st_size < 1_000_000
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    again = load_classifier(classifier, resolution=32)
    assert torch.equal(model(x), again(x))
    with pytest.raises(ClassifierMismatchError, match="trained on 32 px images and cannot score 64 px"):
        load_classifier(classifier, resolution=64)

    def edited(name: str, **changes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "classifier.safetensors").write_bytes((classifier / "classifier.safetensors").read_bytes())
        (folder / "classifier.json").write_text(json.dumps({**read_settings(classifier), **changes}))
        return folder

    with pytest.raises(ClassifierMismatchError, match="trained for shapes"):
        load_classifier(edited("vocab", shapes=["circle", "square"]))
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_classifier(edited("width", width=8))
    with pytest.raises(ClassifierMismatchError, match="not a shape classifier"):
        load_classifier(edited("format", format="something-else"))
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "missing")
    with pytest.raises(ValueError, match="classifier=<folder>"):
        build_metrics(["prompt_accuracy"], None)


# ---------------------------------------------------------------- CLIP score


def make_tiny_clip_model(folder: Path) -> Path:
    """A tiny random CLIPModel (text and vision, 32 px) with its processor, saved in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    make_tiny_clip(folder)  # tokenizer and text model config
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    config = CLIPConfig(text_config=CLIPTextConfig.from_pretrained(folder).to_dict(), vision_config=vision.to_dict(),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return make_tiny_clip_model(tmp_path_factory.mktemp("clip"))


def test_clip_score_is_the_mean_clamped_cosine_of_clip_embeddings(tiny_clip):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = ["a red circle", "a blue square on a grey background", "red", "blue", "a blue circle", "red red"]
    metric = ClipScore(str(tiny_clip))
    metric.update(images[:4], real=False, captions=captions[:4])
    metric.update(torch.rand(2, 3, 32, 32), real=True)  # ignored
    metric.update(images[4:], real=False, captions=captions[4:])

    # By hand, through the vision and text towers and their projections.
    model, processor = load_clip(str(tiny_clip))
    inputs = processor(text=captions, images=list(images_to_uint8(images)), return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                             attention_mask=inputs["attention_mask"]).pooler_output)
    cos = F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
    assert (cos < 0).any() and (cos > 0).any()  # the per-image clamp matters here
    # float32 embeddings (the batches pad captions to different lengths): equal to ~1e-5 of the 0-100 scale
    assert metric.compute().item() == pytest.approx((100 * cos.clamp(min=0)).mean().item(), abs=1e-4)

    other = ClipScore(str(tiny_clip))
    other.update(images[:4], real=False, captions=captions[:4])
    rest = ClipScore(str(tiny_clip))
    rest.update(images[4:], real=False, captions=captions[4:])
    other.merge_state(rest)
    assert other.compute().item() == pytest.approx(metric.compute().item(), rel=1e-9)
    with pytest.raises(FileNotFoundError, match="clip_model="):
        ClipScore(str(tiny_clip / "missing"))


# ---------------------------------------------------------------- evaluate.py and the callback


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, classifier, tiny_clip) -> dict[str, Path]:
    """A tiny KL-f4 autoencoder and a tiny text LDM on it, trained 3 steps with the evaluation
    callback scoring prompt accuracy and CLIP score at the end (8 samples, 3 DDIM steps)."""
    root = tmp_path_factory.mktemp("text")
    data = root / "data"
    train(compose("train", ["experiment=toy/ae_kl", *TINY_RUN], root / "ae", data))
    callback = ["+callbacks@callbacks.evaluation=evaluation", "callbacks.evaluation.every_n_steps=100",
                "callbacks.evaluation.num_samples=8", "callbacks.evaluation.steps=3", "callbacks.evaluation.guidance=1",
                "callbacks.evaluation.metrics=[prompt_accuracy,clip_score]",
                f"callbacks.evaluation.classifier={classifier}", f"callbacks.evaluation.clip_model={tiny_clip}"]
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, f"first_stage.path={root / 'ae'}", *callback],
                  root / "ldm", data))
    return {"ae": root / "ae", "ldm": root / "ldm", "val": data / "shapes-32" / "val"}


KEYS = ["clip_score", "color_accuracy", "prompt_accuracy", "prompt_accuracy_chance", "shape_accuracy"]


def test_evaluate_scores_samples_against_the_captions_they_were_generated_from(text_run, classifier, tiny_clip,
                                                                              tmp_path):
    [line] = [json.loads(x) for x in (text_run["ldm"] / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert sorted(line["metrics"]) == KEYS and line["features"] is None

    settings = [f"ckpt={text_run['ldm']}", f"real={text_run['val']}", "n=8", "steps=3", "guidance=1",
                "metrics=[prompt_accuracy,clip_score]", f"classifier={classifier}", f"clip_model={tiny_clip}"]
    cfg = compose("evaluate", ["num_workers=0", "batch_size=4", f"out_dir={tmp_path}", *settings], tmp_path)
    record = json.loads(evaluate(cfg).read_text())  # default features=inception: not loaded, not needed
    assert record["kind"] == "ldm" and record["features"] is None and sorted(record["metrics"]) == KEYS
    assert record["real"]["source"] is None  # captions come from the real batches, no real-side metric

    # By hand: the same samples (seeds 0..7 under the validation captions, in stream order).
    batch = next(iter(ShardStream(str(text_run["val"]), 8, SampleDecoder(ImageTransform(32)), train=False)))
    model = load_module(text_run["ldm"])
    images = model.sample({"caption": batch["caption"]}, n=8, image_size=32, num_steps=3, seeds=range(8), eta=0.0,
                          guidance_scale=1.0, progress=False).clamp(-1, 1)
    expected = build_metrics(["prompt_accuracy", "clip_score"], None, classifier=classifier, clip_model=tiny_clip)
    expected.update(images, real=False, captions=batch["caption"])
    expected = {k: v.item() for k, v in expected.compute().items()}
    for key in KEYS:
        assert record["metrics"][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        assert line["metrics"][key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key  # the callback's
    assert all(math.isfinite(v) for v in record["metrics"].values())



def test_caption_metrics_on_reconstructions_and_refusals(text_run, classifier, tmp_path):
    # An autoencoder's reconstructions are scored against their own images' captions.
    cfg = compose("evaluate", [f"ckpt={text_run['ae']}", f"real={text_run['val']}", "n=null", "num_workers=0",
                               "metrics=[prompt_accuracy]", f"classifier={classifier}", f"out_dir={tmp_path / 'a'}"],
                  tmp_path)
    record = json.loads(evaluate(cfg).read_text())
    batch = next(iter(ShardStream(str(text_run["val"]), 8, SampleDecoder(ImageTransform(32)), train=False)))
    first_stage = load_module(text_run["ae"]).first_stage
    with torch.no_grad():
        rec = first_stage.decode(first_stage.encode(batch["image"]).mode()).clamp(-1, 1)
    expected = PromptAccuracy(load_classifier(classifier))
    expected.update(rec, real=False, captions=batch["caption"])
    assert record["kind"] == "autoencoder" and record["n"] == 8
    assert record["metrics"]["prompt_accuracy_chance"] == pytest.approx(
        expected.compute()["prompt_accuracy_chance"].item(), abs=1e-9)
    assert record["metrics"]["prompt_accuracy"] == expected.compute()["prompt_accuracy"].item()

    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    cfg = compose("evaluate", [f"images={tmp_path / 'images.npz'}", "metrics=[prompt_accuracy]",
                               f"classifier={classifier}", f"out_dir={tmp_path / 'b'}"], tmp_path)
    with pytest.raises(ValueError, match="images= does not carry"):
        evaluate(cfg)
    class_model = SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn"),
                                  hparams=SimpleNamespace(cond_stage_key="class_label"))
    with pytest.raises(ValueError, match="conditioned on class_label"):
        check_caption_metrics(class_model, ["fid", "prompt_accuracy"])
    check_caption_metrics(class_model, ["fid"])  # no caption metric: nothing to refuse


def test_word_swaps_change_only_the_object_words():
    caption = "a large purple star on a light green background"
    assert swap_shapes(caption) == "a large purple hexagon on a light green background"
    assert swap_colors(caption) == "a large orange star on a light green background"
    two = "a small black hexagon above a large red circle on a dark blue background"
    assert swap_shapes(two) == "a small black circle above a large red square on a dark blue background"
    assert swap_colors(two) == "a small red hexagon above a large green circle on a dark blue background"


def test_word_gaps_compare_captions_on_the_same_noise_and_timesteps(text_run, capsys):
    """The loss increase of a swapped caption is measured against the same latents, noise and t:
    an unchanged caption gives exactly no gap, a swapped word some; the command prints the table."""
    module = load_module(text_run["ldm"])
    # Three training steps leave the cross-attention outputs at their zero init (the caption is
    # not used yet): give them weights, so that the caption reaches the loss.
    torch.manual_seed(0)
    for name, layer in module.model.named_modules():
        if name.endswith("proj_out"):
            torch.nn.init.normal_(layer.weight, std=0.2)
    stream = ShardStream(str(text_run["val"]), 8, SampleDecoder(ImageTransform(32, "center", False)), train=False,
                         max_samples=8)
    batch = next(iter(stream))
    table = word_gaps(module, batch, [100, 900], swaps={"unchanged": lambda c: c, **SWAPS}, draws=1)
    assert list(table) == [100, 900]
    for row in table.values():
        assert row["unchanged"] == 0.0
        assert row["true"] > 0 and row["shape"] != 0.0 and row["colour"] != 0.0
    assert table[100]["true"] != table[900]["true"]
    word_gap_main([str(text_run["ldm"]), str(text_run["val"]), "--n", "8", "--t", "100", "900", "--draws", "1"])
    out = capsys.readouterr().out
    assert "| t | 100 | 900 |" in out and "| + shape word swapped | " in out and "| + colour word swapped | " in out
    loaded = word_gaps(load_module(text_run["ldm"]), batch, [100, 900], draws=1)  # the command's module, unchanged
    assert f"| true caption | {loaded[100]['true']:.3f} | {loaded[900]['true']:.3f} |" in out  # same seed, same numbers
    with pytest.raises(SystemExit, match="not a text-conditional LDM"):
        word_gap_main([str(text_run["ae"]), str(text_run["val"]), "--n", "8"])

"""Evaluation end to end: the training callback, evaluate.py on latent diffusion and autoencoder
runs and on given images, the real-statistics cache, evaluate.py on two ranks (torchrun) and
continuing a stopped evaluation, and the paper tables command.

One tiny KL autoencoder and one tiny text LDM (trained with the evaluation callback) are shared
by the module; metrics use the seeded ToyFeatures (features=toy), so nothing is downloaded."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from helpers import TINY_RUN, compose
from ldm.cli.evaluate import evaluate
from ldm.evaluation.protocol import SamplingProtocol, build_extractors, condition_chunks
from ldm.cli.tables import main as tables_main
from ldm.cli.train import train
from ldm.evaluation.distributed import Ranks, launch_environment, rank_device
from ldm.evaluation.image_files import write_npz
from ldm.data.pipeline import SampleDecoder, ShardStream
from ldm.data.transforms import ImageTransform
from ldm.metrics.bootstrap import bootstrap_fid
from ldm.metrics.features import ToyFeatures
from ldm.metrics.fid import ExtractorMismatchError, FeatureStatistics, feature_statistics, fid_from_statistics
from ldm.metrics.lpips import build_lpips
from ldm.metrics.reconstruction import psnr
from ldm.modules.loading import load_module
from ldm.utils.checkpoint import save_safetensors

ROOT = Path(__file__).resolve().parents[1]
ALL_METRICS = "[fid,kid,is,precision_recall]"
# Small-sample settings for 8 images: KID subsets of 4, IS over 2 splits.
SMALL = ["kid_subsets=5", "kid_subset_size=4", "is_splits=2"]

pytestmark = pytest.mark.filterwarnings("ignore:Metric `.*` will save all extracted features")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny KL-f4 autoencoder run and a tiny text LDM on it, trained for 3 steps with the
    evaluation callback every 2 steps (8 samples, 3 DDIM steps, guidance 3)."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    train(compose("train", ["experiment=toy/ae_kl", *TINY_RUN], root / "ae", data))
    callback = ["+callbacks@callbacks.evaluation=evaluation", "callbacks.evaluation.every_n_steps=2",
                "callbacks.evaluation.num_samples=8", "callbacks.evaluation.steps=3",
                f"callbacks.evaluation.metrics={ALL_METRICS}", *(f"callbacks.evaluation.{s}" for s in SMALL)]
    train(compose("train", ["experiment=toy/ldm_text", *TINY_RUN, f"first_stage.path={root / 'ae'}", *callback],
                  root / "ldm", data))
    return {"ae": root / "ae", "ldm": root / "ldm", "val": data / "shapes-32" / "val"}


def eval_cfg(out: Path, *overrides: str):
    """evaluate.py's config with toy features and small-sample metric settings."""
    return compose("evaluate", ["features=toy", "num_workers=0", "batch_size=4", *SMALL, f"out_dir={out}",
                                *overrides], out)


def val_images(val: Path) -> torch.Tensor:
    """The 32 px validation images, in stream order, as evaluate.py reads them."""
    stream = ShardStream(str(val), 100, SampleDecoder(ImageTransform(32)), train=False)
    return torch.cat([b["image"] for b in stream])


def toy_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID on ToyFeatures computed without the metrics package's classes."""
    net = ToyFeatures()
    a = FeatureStatistics.from_features(net(real), net.name, net.settings)
    b = FeatureStatistics.from_features(net(fake), net.name, net.settings)
    return fid_from_statistics(a, b)


def test_callback_logs_metrics_that_evaluate_py_reproduces(runs, tmp_path):
    lines = [json.loads(x) for x in (runs["ldm"] / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == [2, 3]  # every 2 steps, and once more at the end
    keys = ["fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"]
    for line in lines:
        assert sorted(line["metrics"]) == keys and all(math.isfinite(v) for v in line["metrics"].values())
        assert line["metrics"]["fid"] > 0 and 0 <= line["metrics"]["precision"] <= 1
        assert (line["n"], line["n_real"], line["f"], line["cond_key"]) == (8, 8, 4, "caption")
        assert (line["sampler"], line["steps"], line["guidance"], line["features"]) == \
            ("ddim", 3, 3.0, "toy-random-conv")
    # training time without the evaluations, carried in the checkpoint for a resumed run
    assert 0 < lines[0]["train_seconds"] < lines[1]["train_seconds"]
    saved = torch.load(runs["ldm"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("EvaluationCallback")]
    assert state["train_seconds"] >= lines[1]["train_seconds"] - 1e-6
    final = lines[-1]["metrics"]
    run_metrics = json.loads((runs["ldm"] / "metrics.json").read_text())
    assert run_metrics["eval/fid"] == pytest.approx(final["fid"], rel=1e-6)
    with open(runs["ldm"] / "csv" / "metrics.csv") as fh:
        logged = [row for row in csv.DictReader(fh) if row.get("eval/fid")]
    assert [int(r["step"]) for r in logged] == [2, 3]

    # The same protocol from the final checkpoint (same weights, conditions, seeds) gives the same numbers.
    path = evaluate(eval_cfg(tmp_path, f"ckpt={runs['ldm']}", f"real={runs['val']}", "n=8", "steps=3",
                             "guidance=3", f"metrics={ALL_METRICS}"))
    record = json.loads(path.read_text())
    assert record["kind"] == "ldm" and record["run"]["global_step"] == 3 and record["n"] == 8
    for key in keys:
        assert record["metrics"][key] == pytest.approx(final[key], rel=1e-4, abs=1e-6), key


def test_evaluate_py_subprocess_on_an_ldm_run(runs, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "evaluate.py", f"ckpt={runs['ldm']}", f"real={runs['val']}", "n=6",
                           "steps=2", "guidance=2", "features=toy", "metrics=[fid,is]", "is_splits=2",
                           "num_workers=0", "batch_size=4", f"hydra.run.dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "metrics.json").read_text())
    assert sorted(record["metrics"]) == ["fid", "is_mean", "is_std"] and record["metrics"]["fid"] > 0
    assert record["n"] == 6 and record["samples_per_s"] > 0 and record["real"] == \
        {"source": "shards", "n": 8, "stats": None}
    assert record["run"] | {"ckpt": None} == {"ckpt": None, "run_dir": str(runs["ldm"].resolve()), "global_step": 3,
                                              "f": 4, "first_stage": "kl", "conditioning": "crossattn",
                                              "cond_key": "caption"}
    assert (record["settings"]["guidance"], record["settings"]["steps"]) == (2.0, 2)
    assert "generating" in done.stderr  # progress bars


def random_vgg16_trunk() -> dict[str, torch.Tensor]:
    """`features.*` of a torchvision vgg16 state dict (the part LPIPS uses), He-normal random."""
    g = torch.Generator().manual_seed(0)
    state, index, c_in = {}, 0, 3
    for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if width == "M":
            index += 1  # max pool: no weights
            continue
        state[f"features.{index}.weight"] = torch.randn(width, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        state[f"features.{index}.bias"] = torch.zeros(width)
        index, c_in = index + 2, width  # conv, relu
    return state


def test_evaluate_autoencoder_reconstruction_metrics(runs, tmp_path, monkeypatch):
    lpips_file = tmp_path / "vgg16-features.safetensors"  # a random stand-in for torchvision's VGG16 trunk
    save_safetensors(random_vgg16_trunk(), lpips_file)
    lpips = build_lpips(backbone_weights=lpips_file)
    asked = []

    def build_once(backbone_weights):  # building LPIPS takes seconds: evaluate.py gets this one
        asked.append(backbone_weights)
        return lpips

    monkeypatch.setattr("ldm.cli.evaluate.build_lpips", build_once)
    path = evaluate(eval_cfg(tmp_path / "a", f"ckpt={runs['ae']}", f"real={runs['val']}", "n=null",
                             "metrics=[fid]", f"lpips_weights={lpips_file}"))
    record = json.loads(path.read_text())
    assert record["kind"] == "autoencoder" and record["n"] == 8 and record["run"]["f"] == 4

    x = val_images(runs["val"])
    first_stage = load_module(runs["ae"]).first_stage
    with torch.no_grad():
        rec = first_stage.decode(first_stage.encode(x).mode()).clamp(-1, 1)
    a, b = (x.double() + 1) / 2, (rec.double() + 1) / 2
    expected_psnr = (10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1))).mean().item()
    m = record["metrics"]
    assert sorted(m) == ["lpips", "psnr", "rfid", "ssim"]
    assert m["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
    assert m["rfid"] == pytest.approx(toy_fid(x, rec), rel=1e-4)
    assert asked == [str(lpips_file)]
    with torch.no_grad():
        assert m["lpips"] == pytest.approx(lpips(x, rec).mean().item(), rel=1e-5)
    assert 0 < m["ssim"] < 1 and record["notes"] == []

    # Without a VGG16 file LPIPS is skipped with a note; only the first n images are reconstructed.
    record = json.loads(evaluate(eval_cfg(tmp_path / "b", f"ckpt={runs['ae']}", f"real={runs['val']}", "n=4",
                                          "metrics=[fid]", "lpips_weights=null")).read_text())
    assert "lpips" not in record["metrics"] and "lpips skipped" in record["notes"][0]
    assert record["n"] == 4 and record["real"]["n"] == 8
    with pytest.raises(ValueError, match="fewer than n=9"):
        evaluate(eval_cfg(tmp_path / "c", f"ckpt={runs['ae']}", f"real={runs['val']}", "n=9", "metrics=[fid]"))


def test_evaluate_inpainting_ldm_uses_the_runs_masks_and_scores_pairs(runs, tmp_path):
    run = tmp_path / "inpaint"
    train(compose("train", ["experiment=toy/ldm_inpaint", *TINY_RUN, f"first_stage.path={runs['ae']}"],
                  run, runs["val"].parents[1]))
    record = json.loads(evaluate(eval_cfg(tmp_path / "e", f"ckpt={run}", f"real={runs['val']}", "n=4", "steps=2",
                                          "metrics=[fid]")).read_text())
    assert record["run"]["conditioning"] == "concat" and sorted(record["metrics"]) == ["fid", "psnr", "ssim"]
    assert any("pasted back" in note for note in record["notes"])

    # The same samples by hand: the run's own mask generator, seeds 0..3, known pixels pasted back.
    transforms = instantiate(OmegaConf.load(run / "config.yaml").data.batch_transforms)
    stream = ShardStream(str(runs["val"]), 4, SampleDecoder(ImageTransform(32)), train=False,
                         batch_transforms=transforms)
    batch = next(iter(stream))
    model = load_module(run)
    images = model.sample({k: batch[k] for k in ("masked_image", "mask")}, n=4, image_size=32, num_steps=2,
                          seeds=range(4), eta=0.0, progress=False)
    pasted = batch["mask"] * batch["image"] + (1 - batch["mask"]) * images
    assert 0 < (1 - batch["mask"]).mean() < 1  # some holes, some known pixels
    assert record["metrics"]["psnr"] == pytest.approx(psnr(batch["image"], pasted).mean().item(), rel=1e-4)


@pytest.mark.slow  # ~30 s: two spawned DDP ranks
def test_callback_under_ddp_scores_the_same_images_as_one_process(runs, tmp_path):
    # An unconditional model: the 2 ranks draw the seeds 0..7 between them and hold half of the
    # validation images each, so the synchronised FID and precision/recall are those of one process.
    run = tmp_path / "ldm"
    train(compose("train", ["experiment=toy/ldm_uncond", *TINY_RUN, f"first_stage.path={runs['ae']}",
                            "trainer=ddp_cpu", "+callbacks@callbacks.evaluation=evaluation",
                            "callbacks.evaluation.every_n_steps=100", "callbacks.evaluation.num_samples=8",
                            "callbacks.evaluation.steps=3", "callbacks.evaluation.metrics=[fid,precision_recall]"],
                  run, runs["val"].parents[1]))
    [line] = [json.loads(x) for x in (run / "metrics" / "eval.jsonl").read_text().splitlines()]
    assert (line["global_step"], line["world_size"], line["n"], line["n_real"]) == (3, 2, 8, 8)
    assert json.loads((run / "metrics.json").read_text())["eval/fid"] == pytest.approx(line["metrics"]["fid"])
    record = json.loads(evaluate(eval_cfg(tmp_path / "e", f"ckpt={run}", f"real={runs['val']}", "n=8", "steps=3",
                                          "metrics=[fid,precision_recall]")).read_text())
    for key in ("fid", "precision", "recall"):
        assert record["metrics"][key] == pytest.approx(line["metrics"][key], rel=1e-4), key


def test_given_images_and_the_real_statistics_cache(runs, tmp_path):
    x = val_images(runs["val"])
    folder = tmp_path / "pngs"
    folder.mkdir()
    pixels = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    stats = tmp_path / "real.npz"

    # The real images themselves score FID 0 and full precision/recall; the first run writes the cache.
    record = json.loads(evaluate(eval_cfg(tmp_path / "a", f"images={folder}", f"real={runs['val']}", "n=null",
                                          "metrics=[fid,precision_recall]", f"real_stats={stats}")).read_text())
    assert record["kind"] == "images" and record["n"] == 8 and record["run"] is None
    assert record["metrics"]["fid"] == pytest.approx(0, abs=1e-5)
    assert record["metrics"]["precision"] == record["metrics"]["recall"] == 1.0
    assert record["real"] == {"source": "shards", "n": 8, "stats": str(stats.resolve())} and stats.is_file()

    # Inverted images from an .npz, scored against the cache (no real= needed) and against the shards.
    np.savez(tmp_path / "inverted.npz", arr_0=255 - pixels)
    inverted = ["images=" + str(tmp_path / "inverted.npz"), "n=null", "metrics=[fid]"]
    cached = json.loads(evaluate(eval_cfg(tmp_path / "b", *inverted, f"real_stats={stats}")).read_text())
    fresh = json.loads(evaluate(eval_cfg(tmp_path / "c", *inverted, f"real={runs['val']}")).read_text())
    assert cached["real"] == {"source": "cache", "n": 8, "stats": str(stats.resolve())}
    assert cached["metrics"]["fid"] == pytest.approx(fresh["metrics"]["fid"], rel=1e-6)
    expected = toy_fid(x, torch.from_numpy(255 - pixels).permute(0, 3, 1, 2))
    assert cached["metrics"]["fid"] == pytest.approx(expected, rel=1e-4) and expected > 1
    # fid_bootstrap: the interval of ldm.metrics.bootstrap on the same features (the cache: fake side only)
    boot = json.loads(evaluate(eval_cfg(tmp_path / "k", *inverted, f"real_stats={stats}", "fid_bootstrap=20"))
                      .read_text())["metrics"]
    net = ToyFeatures()
    interval = bootstrap_fid(net(torch.from_numpy(255 - pixels).permute(0, 3, 1, 2)), *feature_statistics(net(x)),
                             resamples=20, seed=0)
    assert boot["fid"] == cached["metrics"]["fid"] and boot["fid_low"] < boot["fid_high"]
    assert [boot["fid_low"], boot["fid_high"], boot["fid_std"]] == pytest.approx(
        [interval.low, interval.high, interval.std], rel=1e-4)

    with pytest.raises(ValueError, match=r"FID statistics only.*\['kid'\]"):
        evaluate(eval_cfg(tmp_path / "d", *inverted[:2], "metrics=[fid,kid]", f"real_stats={stats}"))
    with pytest.raises(ExtractorMismatchError, match="settings differ"):
        evaluate(eval_cfg(tmp_path / "e", *inverted, f"real_stats={stats}", "features.seed=1"))
    alone = json.loads(evaluate(eval_cfg(tmp_path / "i", *inverted[:2], "metrics=[is]")).read_text())
    assert alone["real"]["source"] is None and sorted(alone["metrics"]) == ["is_mean", "is_std"]  # IS: no real side
    with pytest.raises(ValueError, match=r"\['fid'\] need real images"):
        evaluate(eval_cfg(tmp_path / "j", *inverted))
    with pytest.raises(ValueError, match="exactly one of ckpt"):
        evaluate(eval_cfg(tmp_path / "f", *inverted, f"ckpt={runs['ldm']}"))
    with pytest.raises(ValueError, match="conditional: pass real="):
        evaluate(eval_cfg(tmp_path / "g", f"ckpt={runs['ldm']}", f"real_stats={stats}", "metrics=[fid]", "n=2"))


# evaluate.py's arguments for the text LDM in the tests below: 10 samples in chunks of 4, 4 and 2.
SCALE_ARGS = ["n=10", "steps=2", "guidance=3", "metrics=[fid,kid,is,precision_recall]"]
CLI_DEFAULTS = ["features=toy", "num_workers=0", "batch_size=4", *SMALL]  # what eval_cfg adds


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """evaluate.py under torchrun on one node (a free port), one thread per rank."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "evaluate.py", *CLI_DEFAULTS, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_evaluate_py_under_torchrun_scores_the_images_of_one_process(runs, tmp_path):
    # Two gloo ranks make chunks 0, 2 and chunk 1 of the text LDM's samples, under the conditions
    # of the real batches; rank 0 scores all of them. Sample i comes from seed i on either count.
    model = [f"ckpt={runs['ldm']}", f"real={runs['val']}", *SCALE_ARGS, "save_npz=true"]
    one = json.loads(evaluate(eval_cfg(tmp_path / "one", *model)).read_text())
    done = torchrun(2, *model, "save_png=true", f"hydra.run.dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"], two["n"], two["real"]["n"]) == (1, 2, 10, 8)
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert a.files == b.files == ["arr_0"]  # the ADM evaluator's layout
        alone, shared = a["arr_0"], b["arr_0"]
    assert alone.shape == (10, 32, 32, 3) and alone.dtype == np.uint8 and np.array_equal(alone, shared)
    assert len(list((tmp_path / "two" / "samples").glob("*.png"))) == 10
    with Image.open(tmp_path / "two" / "samples" / "000009.png") as png:
        assert np.array_equal(np.asarray(png), shared[9])
    assert sorted(two["metrics"]) == sorted(one["metrics"])
    for key, value in one["metrics"].items():
        assert two["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # Ranks that would write into different folders are stopped before any work.
    done = torchrun(2, *model, f"out_dir={tmp_path}/rank" + "${oc.env:RANK}", f"hydra.run.dir={tmp_path / 'h'}")
    assert done.returncode != 0 and "write into different run folders" in done.stderr
    assert not (tmp_path / "rank0" / "chunks").exists()


@pytest.mark.slurm  # bash scripts/slurm_check.sh tests/test_evaluate.py (a one-node cluster on this machine)
@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no SLURM (bash scripts/slurm_check.sh)")
def test_evaluate_py_under_srun_scores_the_images_of_one_process(runs, tmp_path):
    # A 2-task job: evaluate.py in the batch script itself (no srun: one process, with a warning),
    # then under srun (2 ranks); both give the images of the in-process run.
    model = [f"ckpt={runs['ldm']}", f"real={runs['val']}", *SCALE_ARGS, "save_npz=true"]
    one = json.loads(evaluate(eval_cfg(tmp_path / "one", *model)).read_text())
    command = " ".join(f"'{a}'" for a in [sys.executable, "evaluate.py", *CLI_DEFAULTS, *model])
    script = tmp_path / "eval.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --output={tmp_path / 'eval.out'}
cd {ROOT}
{command} hydra.run.dir={tmp_path / 'alone'}
srun --kill-on-bad-exit=1 {command} hydra.run.dir={tmp_path / 'srun'}
""")
    done = subprocess.run(["sbatch", "--wait", str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = (tmp_path / "eval.out").read_text() if (tmp_path / "eval.out").exists() else ""
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert "not started by srun: it evaluates alone" in log
    for name, world in (("alone", 1), ("srun", 2)):
        record = json.loads((tmp_path / name / "metrics.json").read_text())
        assert record["world_size"] == world and record["metrics"] == pytest.approx(one["metrics"], rel=1e-9)
        with np.load(tmp_path / name / "samples.npz") as a, np.load(tmp_path / "one" / "samples.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"])


def test_a_stopped_evaluation_continues_where_it_stopped(runs, tmp_path, monkeypatch):
    import ldm.cli.evaluate as cli

    model = [f"ckpt={runs['ldm']}", f"real={runs['val']}", *SCALE_ARGS]
    fresh = json.loads(evaluate(eval_cfg(tmp_path / "fresh", *model)).read_text())
    sampled, real_generate = [], cli.generate

    def generate(model, batch, n, *args):
        if len(sampled) == stop_after:
            raise RuntimeError("killed")
        sampled.append(n)
        return real_generate(model, batch, n, *args)

    monkeypatch.setattr(cli, "generate", generate)
    stop_after, out = 2, tmp_path / "stopped"
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(eval_cfg(out, *model))
    chunks = out / "chunks"
    assert sorted(p.name for p in chunks.glob("samples-*")) == ["samples-000000.pt", "samples-000001.pt"]
    (chunks / ".samples-000002.pt.k1ll3d.tmp").write_bytes(b"half a chunk")  # a kill during a write leaves this
    real_chunks = {p: p.stat().st_mtime_ns for p in chunks.glob("real-*.pt")}
    assert len(real_chunks) == 2 and not (out / "metrics.json").exists()
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 then, 3 now\)"):
        evaluate(eval_cfg(out, *model, "steps=3"))
    ckpt = runs["ldm"] / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat()
    os.utime(ckpt, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # as if training had rewritten it
    try:
        with pytest.raises(ValueError, match="other settings \\(model: "):
            evaluate(eval_cfg(out, *model))
    finally:
        os.utime(ckpt, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    stop_after = None
    record = json.loads(evaluate(eval_cfg(out, *model)).read_text())
    assert sampled == [4, 4, 2]  # 8 images before the stop, the last 2 after it: none twice
    assert {p: p.stat().st_mtime_ns for p in chunks.glob("real-*.pt")} == real_chunks  # not made again
    assert record["metrics"] == fresh["metrics"] and record["n"] == 10
    assert not list(chunks.glob(".*.tmp"))  # the half-written file is cleared at the end
    # Finished: another launch only recomputes the metrics (here with other KID subsets) from the chunks.
    again = json.loads(evaluate(eval_cfg(out, *model, "kid_subsets=7")).read_text())
    assert sampled == [4, 4, 2] and again["metrics"]["fid"] == fresh["metrics"]["fid"]
    assert again["settings"]["kid_subsets"] == 7


def test_reference_statistics_alone_and_refused_options(runs, tmp_path):
    stats = tmp_path / "val-toy.npz"
    record = json.loads(evaluate(eval_cfg(tmp_path / "a", f"real={runs['val']}", f"real_stats={stats}",
                                          "image_size=32")).read_text())
    assert record["kind"] == "real_stats" and record["real"] == {"source": "shards", "n": 8,
                                                                 "stats": str(stats.resolve())}
    net = ToyFeatures()
    expected = FeatureStatistics.from_features(net(val_images(runs["val"])), net.name, net.settings)
    with np.load(stats) as cached:
        assert int(cached["n"]) == 8 and np.allclose(cached["mu"], expected.mu, rtol=1e-6)
        assert np.allclose(cached["sigma"], expected.sigma, rtol=1e-5, atol=1e-9)
    record = json.loads(evaluate(eval_cfg(tmp_path / "b", f"real={runs['val']}", f"real_stats={stats}",
                                          "image_size=32")).read_text())
    assert record["real"]["source"] == "cache"
    with pytest.raises(ValueError, match="image_size=<px"):
        evaluate(eval_cfg(tmp_path / "c", f"real={runs['val']}", f"real_stats={stats}"))
    np.savez(tmp_path / "given.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="save_png / save_npz keep the images a run makes"):
        evaluate(eval_cfg(tmp_path / "d", f"images={tmp_path / 'given.npz'}", f"real_stats={stats}",
                          "metrics=[fid]", "save_npz=true"))


def test_ranks_come_from_torchrun_or_slurm(monkeypatch):
    launcher = ["TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT"]
    slurm = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4321", "SLURM_JOB_NAME": "eval",
             "SLURM_STEP_ID": "0"}  # a task started by srun
    for name in [*launcher, *slurm]:  # (the environments set MASTER_ADDR / MASTER_PORT themselves)
        monkeypatch.setenv(name, "")  # recorded, so what the environments set is undone afterwards
        monkeypatch.delenv(name)
    assert launch_environment() is None  # one process
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    env = launch_environment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.main_address, env.main_port) == \
        (4, 3, 1, "gpu07", 19321)  # Lightning's port rule: 15000 + the job id's last 4 digits
    # torchrun inside an allocation: torchrun's ranks
    for name, value in zip(launcher, ["run1", "1", "2", "1", "0", "2", "127.0.0.1", "29511"]):
        monkeypatch.setenv(name, value)
    env = launch_environment()
    assert (env.world_size(), env.global_rank(), env.main_port) == (2, 1, 29511)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("SLURM_STEP_ID")
    assert launch_environment() is None  # the batch script, without srun: one process, not 4 that never come
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_environment() is None  # a single SLURM task
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    with pytest.raises(RuntimeError, match="--ntasks-per-node"):
        launch_environment()

    with pytest.raises(ValueError, match="every rank would use that one GPU"):
        rank_device("cuda:1", Ranks(0, 2, 0))
    assert rank_device("cpu", Ranks(1, 2, 1)) == torch.device("cpu")


def test_npz_of_sample_batches_is_written_whole_or_not_at_all(tmp_path):
    batches = [np.full((3, 4, 5, 3), i, np.uint8) for i in range(3)]
    path = write_npz(tmp_path / "samples.npz", iter(batches), 9, 4, 5)
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], np.concatenate(batches))
    with pytest.raises(ValueError, match="8 images given for an npz of 9"):
        write_npz(tmp_path / "short.npz", iter([*batches[:2], batches[2][:2]]), 9, 4, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_condition_chunks_cut_and_cycle_the_real_batches():
    batches = [{"image": torch.zeros(3, 1), "caption": ["a", "b", "c"], "skipped": torch.tensor(0)},
               {"image": torch.zeros(2, 1), "caption": ["d", "e"], "skipped": torch.tensor(0)}]
    parts = list(condition_chunks(batches, 7))
    assert [p["caption"] for p in parts] == [["a", "b", "c"], ["d", "e"], ["a", "b"]]
    assert "skipped" not in parts[0]
    with pytest.raises(RuntimeError, match="no batch"):
        list(condition_chunks([], 1))


def test_sampling_protocol_and_extractors_refuse_what_cannot_work():
    assert SamplingProtocol("plms", 20, 1.5).sample_kwargs() == {"name": "plms", "num_steps": 20,
                                                                "guidance_scale": 1.5, "use_ema": True}
    assert SamplingProtocol("ddim", 20, eta=1.0).sample_kwargs()["eta"] == 1.0
    with pytest.raises(ValueError, match="needs a condition to drop"):
        SamplingProtocol(guidance=2.0).check(SimpleNamespace(model=SimpleNamespace(conditioning_key=None)))
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        SamplingProtocol("plms", eta=1.0).check(SimpleNamespace(model=SimpleNamespace(conditioning_key="crossattn")))
    with pytest.raises(ValueError, match="IS needs class logits"):  # before any VGG16 download
        build_extractors({"_target_": "ldm.metrics.features.VGG16Features", "weights": None}, ["fid", "is"])
    toy, logits = build_extractors({"_target_": "ldm.metrics.features.ToyFeatures"}, ["is"])
    assert (toy.num_features, logits.num_features) == (112, 10)


def _write_run(folder: Path, model: str, first_stage: dict, cond: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    config = {"model": {"_target_": model}, "first_stage": first_stage}
    if cond is not None:
        config["cond"] = cond
    (folder / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return folder


def _record(kind: str, run: Path, step: int, metrics: dict, **extra) -> str:
    settings = {"sampler": "ddim", "steps": 200, "eta": 1.0, "guidance": extra.pop("guidance", 1.0)}
    return json.dumps({"kind": kind, "run": {"ckpt": str(run / "checkpoints" / "last.ckpt"), "run_dir": str(run),
                                             "global_step": step}, "metrics": metrics, "settings": settings,
                       "n": 50, "written": "2026-01-01T00:00:00+00:00", **extra})


def test_tables_from_a_sweep_of_results(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    ae_target, ldm_target = "ldm.modules.autoencoder.AutoencoderModule", "ldm.modules.latent_diffusion.LatentDiffusion"
    ae4 = _write_run(sweep / "ae_f4", ae_target, {"_target_": "ldm.first_stage.factory.autoencoder_kl", "f": 4})
    ae8 = _write_run(sweep / "ae_f8", ae_target, {"_target_": "ldm.first_stage.factory.autoencoder_vq", "f": 8})
    ae16 = _write_run(sweep / "ae_f16", ae_target, {"_target_": "ldm.first_stage.factory.autoencoder_kl", "f": 16})
    loader = "ldm.modules.loading.load_first_stage"
    ldm4 = _write_run(sweep / "ldm_f4", ldm_target, {"_target_": loader, "path": str(ae4)},
                      {"conditioning_key": None, "key": None})
    ldm8 = _write_run(sweep / "ldm_f8", ldm_target,  # first stage given as a .ckpt file
                      {"_target_": loader, "path": str(ae8 / "checkpoints" / "last.ckpt")},
                      {"conditioning_key": "crossattn", "key": "caption"})
    pixel = _write_run(sweep / "ldm_f1", ldm_target, {"_target_": "ldm.first_stage.factory.identity", "f": 1},
                       {"conditioning_key": None, "key": None})
    # evaluate.py outputs, in their own folders below the sweep
    for i, (kind, run, step, metrics, extra) in enumerate([
        ("autoencoder", ae4, 900, {"rfid": 0.58, "psnr": 27.43, "ssim": 0.8}, {}),
        ("autoencoder", ae8, 900, {"rfid": 1.14, "psnr": 23.07, "ssim": 0.7, "lpips": 0.12}, {}),
        ("autoencoder", ae16, 900, {"rfid": 5.15, "psnr": 20.83, "ssim": 0.6}, {}),
        ("ldm", ldm4, 100, {"fid": 30.0, "precision": 0.5, "recall": 0.3}, {"samples_per_s": 1.0}),
        ("ldm", ldm4, 300, {"fid": 5.11, "fid_low": 4.2, "fid_high": 6.3, "precision": 0.72, "recall": 0.49}, {"samples_per_s": 2.5}),
        ("ldm", ldm8, 300, {"fid": 12.63, "is_mean": 30.29, "is_std": 0.4, "precision": 0.6, "recall": 0.4,
                            "prompt_accuracy": 0.81, "clip_score": 27.5},
         {"samples_per_s": 7.25, "guidance": 1.5}),
    ]):
        (sweep / "evals" / str(i)).mkdir(parents=True)
        (sweep / "evals" / str(i) / "metrics.json").write_text(_record(kind, run, step, metrics, **extra))
    (sweep / "ldm_f4" / "metrics.json").write_text(json.dumps({"global_step": 300, "val/loss": 0.1}))  # train.py's
    for run, fids in [(ldm4, [40.0, 20.0, 9.0]), (pixel, [60.0, 45.0, 38.0])]:
        (run / "metrics").mkdir()
        (run / "metrics" / "eval.jsonl").write_text("".join(
            json.dumps({"global_step": 100 * (i + 1), "metrics": {"fid": f}, "sampler": "ddim", "steps": 50,
                        "eta": 0.0, "guidance": 1.0, "n": 64, "samples_per_s": 3.0,
                        "train_seconds": 200.0 * (i + 1)}) + "\n"
            for i, f in enumerate(fids)))

    out = tmp_path / "tables"
    done = subprocess.run([sys.executable, "-m", "ldm.cli.tables", str(sweep), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "tables.md").read_text()
    assert text in done.stdout
    assert "| ldm_f1 | 1 | identity | - | - | - | - | 38.00 | - | - | - | - | - | 3.00 | 0.50 | 300 |" in text  # from eval.jsonl
    assert "| ldm_f4 | 4 | kl | 0.58 | 27.43 | 0.80 | - | 5.11 | 4.20-6.30 | - | 0.72 | 0.49 | - | 2.50 | 0.50 | 300 |" in text  # newest step wins
    assert "| ldm_f8 | 8 | vq | 1.14 | 23.07 | 0.70 | 0.12 | 12.63 | - | 30.29 | 0.60 | 0.40 | 0.81 | 7.25 | - | 300 |" in text
    assert "| ae_f16 | 16 | kl | 5.15 | 20.83 | 0.60 | - | - | - | - | - | - | - | - | - | 900 |" in text  # unused first stage
    assert "| ldm_f4 | 4 | kl | 300 | ddim | 200 | 1.00 | 50 | 5.11 | 0.72 | 0.49 |" in text
    assert "| ldm_f8 | 8 | vq | 300 | ddim | 200 | 1.50 | 50 | 12.63 | 30.29 | 0.81 | 27.50 |" in text

    with open(out / "compression.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["run"], r["f"], r["FID"]) for r in rows] == [("ldm_f1", "1", "38.0"), ("ldm_f4", "4", "5.11"),
                                                            ("ldm_f8", "8", "12.63"), ("ae_f16", "16", "")]
    with open(out / "unconditional.csv") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["ldm_f1", "ldm_f4"]
    with open(out / "text.csv") as fh:
        assert [(r["run"], r["guidance"], r["IS"], r["prompt acc"], r["CLIP score"]) for r in csv.DictReader(fh)] == \
            [("ldm_f8", "1.5", "30.29", "0.81", "27.5")]
    for png in (out / "fid_vs_steps.png", out / "fid_vs_time.png"):
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size[0] > 300
    assert "fid_vs_time.png" in text

    # In process, with the default output folder
    tables_main([str(sweep)])
    assert (sweep / "tables" / "tables.md").read_text() == text
    with pytest.raises(SystemExit):
        tables_main([str(ae16)])  # a run folder whose results live elsewhere
    assert "no results below" in capsys.readouterr().err


def test_curves_command_plots_a_logged_metric(tmp_path):
    from ldm.cli.curves import main as curves_main
    from ldm.cli.curves import read_metric, smooth

    (tmp_path / "run" / "csv").mkdir(parents=True)
    (tmp_path / "run" / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/loss\n0,4,0.9,\n0,9,0.5,\n0,9,,0.6\n0,14,0.4,\n")
    assert read_metric(tmp_path / "run", "train/loss") == ([4, 9, 14], [0.9, 0.5, 0.4])
    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    curves_main([str(tmp_path / "run"), "--metric", "train/loss", "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no values"):
        read_metric(tmp_path / "run", "train/missing")

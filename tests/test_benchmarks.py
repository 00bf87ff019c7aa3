"""The benchmark scripts, checked on the CPU so that a GPU lease is not spent finding a broken one."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from xml.etree import ElementTree
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def unet_bench():
    spec = importlib.util.spec_from_file_location("unet_bench", ROOT / "benchmarks" / "unet.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_gpu_check_smoke_runs_every_phase_and_times_both_implementations(tmp_path):
    """scripts/gpu_check.sh --smoke: every phase of the GPU window on the CPU at tiny size (the CUDA
    tests rehearsed on the CPU, the entry points, the benchmarks, the profile), so it cannot rot."""
    pytest.importorskip("diffusers")
    # The script calls $PY: this interpreter.
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OUT": str(out), "PY": sys.executable, "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--smoke"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] is True
    assert {k: v["status"] for k, v in summary["phases"].items()} == dict.fromkeys(
        ["setup", "tests", "e2e", "bench", "profile"], "pass")
    suite = ElementTree.parse(out / "tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 16 and suite.get("failures") == suite.get("errors") == suite.get("skipped") == "0"
    assert (out / "e2e" / "grid_captioned.png").is_file()
    evaluation = json.loads((out / "e2e" / "eval_metrics.json").read_text())
    assert evaluation["n"] == 8 and "prompt_accuracy" in evaluation["metrics"]
    assert "| convolution |" in (out / "profile.md").read_text()
    assert "unet.py exit 0" in (out / "bench.log").read_text() and "data.py exit 0" in (out / "bench.log").read_text()
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    impls = {r["impl"]: r for r in records if r["kind"] == "impl"}
    assert set(impls) == {"ours", "ours-fast", "diffusers"}
    for record in impls.values():
        assert not record["errors"] and record["checkpoint"] is False
        assert record["train_samples_per_s"] > 0 and record["infer_evals_per_s"] > 0
        assert record["fwd_gflop_per_sample"] > 0
    # Our weights in diffusers' layout give diffusers' outputs: both time the same network.
    check = impls["ours"]["cross_check"]
    assert check["max_abs_diff_diffusers"] < 1e-5 * check["output_max_abs"]
    assert check["max_abs_diff_ours-fast"] < 1e-4 * check["output_max_abs"]  # NHWC convs sum in another order
    ratios = {r["impl"]: r for r in records if r["kind"] == "ratio"}
    assert set(ratios) == {"ours", "ours-fast"}
    assert ratios["ours-fast"]["train_ratio"] == pytest.approx(
        impls["ours-fast"]["train_samples_per_s"] / impls["diffusers"]["train_samples_per_s"], rel=1e-3)
    fastest = max(r["best_samples_per_s"] for r in impls["ours"]["rounds"]["infer"])
    assert impls["ours"]["infer_evals_best_per_s"] == fastest >= impls["ours"]["infer_evals_per_s"]
    assert ratios["ours"]["infer_best_ratio"] == pytest.approx(fastest / impls["diffusers"]["infer_evals_best_per_s"])
    encode = [r for r in records if r["kind"] == "encode"]
    assert len(encode) == 1 and encode[0]["images_per_s"] > 0 and encode[0]["encoder_gflop_per_image"] > 200


def test_checkpoint_flag_turns_on_gradient_checkpointing_in_both_implementations(unet_bench):
    pytest.importorskip("diffusers")
    bench = unet_bench.bench_config("small")
    theirs, why_not = unet_bench.diffusers_impl(bench, checkpoint=True)
    assert why_not == ""
    assert theirs.make().is_gradient_checkpointing
    assert unet_bench.ours_impl(bench.unet, "fast", checkpoint=True).make().use_checkpoint
    assert not unet_bench.diffusers_impl(bench)[0].make().is_gradient_checkpointing
    assert not unet_bench.ours_impl(bench.unet, "fast").make().use_checkpoint
    row = unet_bench.parse_args(["--config", "small", "--checkpoint", "--ours", "fast"])
    assert row.checkpoint and row.ours == ("fast",)


def test_compile_blocks_flag_compiles_the_repeated_blocks_of_both_implementations(unet_bench):
    """--compile blocks: regional compilation, ours through compile_blocks, diffusers through
    compile_repeated_blocks (the same transformer blocks); --compile alone compiles the whole model."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention import BasicTransformerBlock as TheirBlock

    from ldm.nets.attention import BasicTransformerBlock as OurBlock

    assert unet_bench.parse_args(["--config", "small", "--compile", "blocks"]).compile == "blocks"
    assert unet_bench.parse_args(["--config", "small", "--compile"]).compile is True
    assert unet_bench.parse_args(["--config", "small"]).compile is False
    bench = unet_bench.bench_config("small")
    for impl, block_type in ((unet_bench.ours_impl(bench.unet, "fast"), OurBlock),
                             (unet_bench.diffusers_impl(bench)[0], TheirBlock)):
        model = impl.make()
        impl.compile_blocks(model)
        compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
        assert compiled and all(isinstance(m, block_type) for m in compiled), impl.name
        assert len(compiled) == sum(isinstance(m, block_type) for m in model.modules())


@pytest.fixture(scope="module")
def data_bench():
    spec = importlib.util.spec_from_file_location("data_bench", ROOT / "benchmarks" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiled_encoder_rate_compiles_the_encoder_in_the_warm_up(data_bench, monkeypatch):
    """--compile: the encoder alone is compiled in place (as compile_first_stage), the compilation
    falls in the warm-up batches and the record says so."""
    import torch._dynamo

    compiled = []
    original = nn.Module.compile

    def compile_eagerly(module, *args, **kwargs):  # dynamo traces, no inductor: seconds, not minutes
        compiled.append(type(module).__name__)
        original(module, *args, backend="eager", **kwargs)

    monkeypatch.setattr(nn.Module, "compile", compile_eagerly)
    torch._dynamo.reset()
    args = data_bench.parse_args(["--skip-loading", "--compile", "--device", "cpu", "--encode-resolution", "32",
                                  "--encode-batch", "1", "--encode-steps", "1", "--encode-warmup", "1"])
    record = data_bench.measure_encoding(args, torch.device("cpu"))
    assert compiled == ["Encoder"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert record["compile"] is True and record["warmup_s"] > 0 and record["images_per_s"] > 0
    assert "| yes |" in data_bench.markdown_tables([record])
    with pytest.raises(SystemExit):
        data_bench.parse_args(["--skip-loading", "--compile", "--encode-warmup", "0"])


def test_paired_ratio_is_theirs_over_ours_step_time(unet_bench):
    """Interleaved step pairs: a ratio above 1 means ours is faster, as for every other ratio."""
    bench = unet_bench.BenchConfig(dict(in_channels=2, out_channels=2), size=4, tokens=None)
    conv = nn.Conv2d(2, 2, 1)

    def impl(name, delay):
        def call(model, x, t, c):
            time.sleep(delay)
            return model(x)
        return unet_bench.Impl(name, "test", lambda: nn.Conv2d(2, 2, 1), dict, call, lambda m: None)

    fast, slow = impl("ours", 0.0), impl("diffusers", 0.01)
    weights = conv.state_dict()
    for phase in ("train", "infer"):
        row = unet_bench.Row("small", 2, "fp32", False, phases=(phase,))
        ratio = unet_bench.paired_ratios([fast, slow], phase, row, bench, weights, torch.device("cpu"), 4, 1)
        assert ratio["ours"] > 3
        reverse = unet_bench.paired_ratios([impl("ours", 0.01), impl("diffusers", 0.0)], phase, row, bench, weights,
                                           torch.device("cpu"), 4, 1)
        assert reverse["ours"] < 1 / 3
    assert "(fastest step: 0.900; paired: 1.050)" in unet_bench._with_extras(1.0, ".3f", True, fastest_step=0.9,
                                                                              paired=1.05)


def test_checkpointed_rows_are_marked_in_the_table(unet_bench):
    record = {"config": "sd1", "batch": 32, "precision": "bf16", "compile": False, "checkpoint": True,
              "kind": "ratio", "impl": "ours-fast", "train_ratio": 1.1, "infer_ratio": None,
              "train_mem_ratio": 0.9, "infer_mem_ratio": None}
    assert "| sd1 | **ours-fast / diffusers** | 32 | bf16 | no | yes | **1.100** |" in unet_bench.markdown_table([record])
    record.update(train_best_ratio=1.2)  # CPU records also carry the fastest steps' ratio
    assert "| **1.100** (fastest step: 1.200) |" in unet_bench.markdown_table([record])
    record.update(compile="blocks", checkpoint=False)
    assert "| sd1 | **ours-fast / diffusers** | 32 | bf16 | blocks | no |" in unet_bench.markdown_table([record])


def test_a_suite_refuses_the_single_row_flags(unet_bench, capsys):
    with pytest.raises(SystemExit) as err:
        unet_bench.parse_args(["--suite", "gpu", "--checkpoint"])
    assert err.value.code == 2 and "drop --checkpoint" in capsys.readouterr().err

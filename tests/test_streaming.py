"""Streamed compression of a checkpoint on disk: same result as in memory, bounded memory,
resumable, never a half-written output."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import GPTQ, RTN, SparseGPT
from fxcompress.checkpoint import CheckpointWriter
from fxcompress.streaming import (
    MemoryBudgetError,
    ResumeError,
    compress_checkpoint,
    parse_size,
    partial_dir,
)

from .models import VOCAB, build

RECIPE = {r".*\.mlp\..*": GPTQ(4, 32), r".*": SparseGPT(0.5)}


def _calibration() -> torch.Tensor:
    return torch.randint(0, VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense") / "qwen2"
    build("qwen2", hidden=64, layers=2).save_pretrained(folder)  # biased q/k/v, untied head
    return folder


@pytest.fixture(scope="module")
def in_memory(checkpoint) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    fxcompress.compile(model, _calibration(), RECIPE, progress=False, batch_size=2)
    return model.state_dict()


def _assert_same(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    state = fxcompress.load(folder).state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def test_streamed_equals_in_memory(checkpoint, in_memory, tmp_path):
    out = tmp_path / "out"
    report = compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False,
                                 batch_size=2, max_shard_size=20_000, max_memory="1GiB")
    _assert_same(out, in_memory)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # written shard by shard
    assert not partial_dir(out).exists()
    assert len(report.layers) == 15 and {r.method for r in report.layers} == \
        {"GPTQ", "SparseGPT"}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["fxcompress"]["recipe"] is not None


def test_half_precision_checkpoint_calibrated_in_float32_on_cpu(tmp_path):
    """A bf16 checkpoint is calibrated in float32 on CPU by default (bf16 products are slow
    there; the in-memory CLI loads float32 too) and written in bf16: the compressed layers
    of in-memory compile on the model loaded in float32, everything else the checkpoint's own
    bf16 values, the config still bf16. ``compute_dtype=None`` calibrates in bf16 instead."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "bf16"
    build("qwen2", hidden=64, layers=2).to(torch.bfloat16).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    fxcompress.compile(model, _calibration(), RECIPE, progress=False, batch_size=2)
    expected = model.state_dict()
    compress_checkpoint(folder, _calibration(), RECIPE, tmp_path / "out", progress=False,
                        batch_size=2)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    state = fxcompress.load(tmp_path / "out").state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        if value.is_floating_point() and not name.endswith("_scale"):
            assert state[name].dtype == torch.bfloat16, name
        assert torch.equal(state[name], value.to(state[name].dtype)), name

    compress_checkpoint(folder, _calibration(), RECIPE, tmp_path / "half", progress=False,
                        batch_size=2, compute_dtype=None)
    half = fxcompress.load(tmp_path / "half").state_dict()
    packed = [n for n in half if n.endswith("weight_packed")]
    assert packed and any(not torch.equal(half[n], state[n]) for n in packed)
    with pytest.raises(ValueError, match="compute_dtype='int8'"):
        compress_checkpoint(folder, _calibration(), RECIPE, tmp_path / "bad", progress=False,
                            compute_dtype="int8")


def test_activations_spilled_to_disk_give_the_same_result(checkpoint, in_memory, tmp_path):
    compress_checkpoint(checkpoint, _calibration(), RECIPE, tmp_path / "out",
                        progress=False, batch_size=2, offload="disk")
    _assert_same(tmp_path / "out", in_memory)


def test_offload_to_disk_chosen_when_only_that_fits(checkpoint, tmp_path,
                                                    monkeypatch):
    """The default offload ("auto") keeps the frontier in memory unless only disk fits
    max_memory (a bound on tensor bytes); the estimate is in the report either way (here
    without the resident program, which the estimate adds as measured). Calibrated on 8 × 64
    tokens, so that the frontier is a real part of the peak."""
    monkeypatch.setattr("fxcompress.pipeline.resident_bytes", lambda: 0)
    calibration = torch.randint(0, VOCAB, (8, 64), generator=torch.Generator().manual_seed(2))
    runs = {o: compress_checkpoint(checkpoint, calibration, RECIPE, tmp_path / o,
                                   progress=False, batch_size=2, offload=o)
            for o in ("cpu", "disk")}
    cpu, disk = runs["cpu"].estimate, runs["disk"].estimate
    assert 0 < disk < cpu
    report = compress_checkpoint(checkpoint, calibration, RECIPE, tmp_path / "auto",
                                 progress=False, batch_size=2, max_memory=cpu - 1)
    assert report.offload == "disk" and report.estimate == disk
    _assert_same(tmp_path / "auto", fxcompress.load(tmp_path / "cpu").state_dict())
    assert compress_checkpoint(checkpoint, _calibration(), RECIPE, tmp_path / "roomy",
                               progress=False, batch_size=2, max_memory=2 * cpu).offload == "cpu"


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(checkpoint, in_memory, tmp_path,
                                                    monkeypatch):
    out = tmp_path / "out"
    add = CheckpointWriter.add
    calls = {"n": 0}

    def interrupt(self, name, t):  # die half-way through writing the 6th layer
        if name.endswith(".weight_scale") and "layers.0.mlp.up_proj" in name:
            raise Interrupted
        add(self, name, t)

    monkeypatch.setattr(CheckpointWriter, "add", interrupt)
    with pytest.raises(Interrupted):
        compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False,
                            batch_size=2, max_shard_size=20_000)
    assert not out.exists() and partial_dir(out).exists()

    monkeypatch.setattr(CheckpointWriter, "add", add)
    run = importlib.import_module("fxcompress.calibration.run").Run
    solve = run.solve

    def count(self, *args, **kwargs):
        calls["n"] += 1
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(run, "solve", count)
    report = compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False,
                                 batch_size=2, max_shard_size=20_000, resume=True)
    _assert_same(out, in_memory)
    assert calls["n"] == 15 - 5  # q, k, v, o, gate_proj of layer 0 were not solved again
    assert len(report.layers) == 15
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_resume_continues_from_the_frontier_snapshot(checkpoint, in_memory, tmp_path,
                                                     monkeypatch, caplog, offload):
    """A resumed run does not replay the layers before the last frontier snapshot (both
    paths of dense-output saved), and ends with the same checkpoint; a damaged snapshot is
    reported and the run replays instead, to the same result."""
    calibrate = importlib.import_module("fxcompress.calibration.run")
    monkeypatch.setattr("fxcompress.streaming.SNAPSHOT_EVERY", 0.0)  # after every barrier
    out = tmp_path / "out"
    add = CheckpointWriter.add

    def interrupt(self, name, t):  # die writing layer 1's up_proj: gate_proj is done
        if name.endswith(".weight_scale") and "layers.1.mlp.up_proj" in name:
            raise Interrupted
        add(self, name, t)

    def run_once(**kwargs):
        with monkeypatch.context() as m:
            m.setattr(CheckpointWriter, "add", interrupt)
            with pytest.raises(Interrupted):
                compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False,
                                    batch_size=2, offload=offload, **kwargs)
        state = json.loads((partial_dir(out) / "frontier" / "snapshot.json").read_text())
        assert len(state["paths"]) == 2  # the compressed and the dense frontier
        return state["segment"]

    ran = []
    run_segment = calibrate.Run.run_segment

    def record(self, k):
        ran.append(k)
        return run_segment(self, k)

    monkeypatch.setattr(calibrate.Run, "run_segment", record)
    last = run_once()
    assert last > 4  # layer 0 and layer 1's attention are behind it
    ran.clear()
    compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False, batch_size=2,
                        offload=offload, resume=True)
    assert ran[0] == last + 1
    _assert_same(out, in_memory)

    run_once()
    for f in (partial_dir(out) / "frontier").glob("1.*.pt"):
        f.write_bytes(b"damaged")
    ran.clear()
    compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False, batch_size=2,
                        offload=offload, resume=True)
    assert ran[0] == 0 and "frontier snapshot" in caplog.text and "damaged" in caplog.text
    _assert_same(out, in_memory)


def test_resume_refuses_another_job(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def interrupt(self, site, c, report):
        raise Interrupted

    from fxcompress.streaming import _Writer

    monkeypatch.setattr(_Writer, "sink", interrupt)
    with pytest.raises(Interrupted):
        compress_checkpoint(checkpoint, _calibration(), RECIPE, out, progress=False)
    monkeypatch.undo()
    with pytest.raises(ResumeError, match="another model, recipe or calibration"):
        compress_checkpoint(checkpoint, _calibration(), RTN(4, 32), out, progress=False,
                            resume=True)


def test_max_memory_too_small_names_the_layer(checkpoint, tmp_path):
    with pytest.raises(MemoryBudgetError, match=r"max_memory=64.00 KiB cannot hold .*"
                                                r"model\.layers\.0\.self_attn\.q_proj"):
        compress_checkpoint(checkpoint, _calibration(), RECIPE, tmp_path / "out",
                            progress=False, max_memory="64KiB")
    assert not (tmp_path / "out").exists()


def test_sizes_are_checked_before_any_work(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("fxcompress.streaming.skeleton", None)  # not reached
    with pytest.raises(ValueError, match=r"max_memory must be a positive number of bytes or "
                                         r"a string like '6GiB'.*got 'lots'"):
        compress_checkpoint(checkpoint, _calibration(), RECIPE, tmp_path / "out",
                            max_memory="lots")
    with pytest.raises(ValueError, match=r"max_shard_size must be .*got '5 PB'"):
        compress_checkpoint(checkpoint, _calibration(), RECIPE, tmp_path / "out",
                            max_shard_size="5 PB")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- bounded memory

RECIPES = {  # GPTQ where its workspace fits the budget; the rest rounded to nearest
    "attention0": {r"model\.layers\.0\.self_attn\..*": GPTQ(4, 128), r".*": RTN(4, 128)},
    "down": {r".*down_proj": GPTQ(4, 128), r".*": RTN(4, 128)},
}
CHILD = textwrap.dedent("""
    import json, sys
    from fxcompress.osmem import release_freed_memory
    from fxcompress.streaming import compress_checkpoint
    from tests.test_streaming import RECIPES, _ids

    def mib(key):  # from /proc: ru_maxrss would start at the parent's RSS at fork
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    small, big, out, budget, recipe = sys.argv[1:6]
    # warm up every code path (imports, torch.export, safetensors) on a one-layer model, so
    # that the baseline holds the process's fixed overhead; then reset the peak RSS to what
    # the process holds (freed memory handed back first)
    compress_checkpoint(small, _ids(), RECIPES[recipe], out + "-warmup", progress=False)
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = mib("VmRSS")
    compress_checkpoint(big, _ids(), RECIPES[recipe], out, progress=False, max_memory=budget)
    print(json.dumps({"baseline": baseline, "peak": mib("VmHWM")}))
""")


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))


def _synthetic_llama(folder: Path, layers: int, seed: int = 0, hidden: int = 1024,
                     intermediate: int = 2048, heads: int = 8) -> int:
    """A random Llama of ``layers`` × 36 MiB (fp32, at the default width) saved to
    ``folder``; its size in bytes."""
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate,
                           num_attention_heads=heads, num_key_value_heads=2,
                           num_hidden_layers=layers, tie_word_embeddings=True)
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _bounded(tmp_path: Path, layers: int, budget: str, recipe: str) -> None:
    """Compress a model > 4 × ``budget`` in a subprocess: its peak RSS stays within
    ``budget`` of its baseline, and the checkpoint equals an in-memory compression."""
    from transformers import AutoModelForCausalLM

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS is measured through Linux's /proc/self")
    big, small = tmp_path / "big", tmp_path / "small"
    assert _synthetic_llama(big, layers) > 4 * parse_size(budget)
    _synthetic_llama(small, layers=1, seed=1)
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # not needed
    run = subprocess.run([sys.executable, "-c", CHILD, str(small), str(big),
                          str(tmp_path / "out"), budget, recipe],
                         capture_output=True, text=True, timeout=3600, cwd=root, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    assert rss["peak"] - rss["baseline"] <= parse_size(budget), rss
    print(f"peak RSS {rss['peak'] / 2**20:.0f} MiB, {(rss['peak'] - rss['baseline']) / 2**20:.0f}"
          f" MiB above the baseline; max_memory={budget}")

    model = AutoModelForCausalLM.from_pretrained(big)
    fxcompress.compile(model, _ids(), RECIPES[recipe], progress=False)
    _assert_same(tmp_path / "out", model.state_dict())


def test_model_four_times_larger_than_max_memory(tmp_path):
    """17 layers: 0.6 GiB of fp32 weights within 144 MiB; GPTQ on layer 0's attention."""
    _bounded(tmp_path, 17, "144MiB", "attention0")


@pytest.mark.slow
def test_gigabyte_model_within_a_few_hundred_mib(tmp_path):
    """36 layers: 1.26 GiB of fp32 weights within 320 MiB; GPTQ on every down_proj."""
    _bounded(tmp_path, 36, "320MiB", "down")

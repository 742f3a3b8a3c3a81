"""llama.cpp's grids: bytes bit-exact against gguf-py, llama-quantize's type mixes, GPTQ on the
grids, and the GGMLLinear module through its codec and GGUF encoder (random weights; fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxcompress import Recipe
from fxcompress.algorithms import Statistics
from fxcompress.checkpoint.codecs import codec_for, codec_of
from fxcompress.errors import RecipeError
from fxcompress.gguf import ENCODERS, grids
from fxcompress.gguf.gptq import gptq_ggml, rtn_ggml
from fxcompress.gguf.linear import GGMLLinear
from fxcompress.gguf.mix import tensor_type, use_more_bits
from fxcompress.methods import GGUFQuant
from fxcompress.modules import compressed_module
from fxcompress.pipeline import block_count
from fxcompress.recipe import NAMED, method_from_dict, method_to_dict

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

TYPES = list(grids.TYPES)


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and a per-column spread, like trained weights
    return torch.randn(rows, cols, generator=g) * (0.02 + 0.05 * torch.rand(cols, generator=g))


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_dequantize_as_gguf_py_does(name, weighted):
    t = grids.TYPES[name]
    w = _weight(6, 512, seed=hash(name) % 1000)
    importance = torch.rand(512, generator=torch.Generator().manual_seed(2)) + 0.05
    g = grids.fit(w, t, importance if weighted else None)
    # every code of the type, not only those rounding reaches
    codes = torch.randint(0, t.maxq + 1, w.shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.uint8)
    for c in (codes, grids.quantize_weight(w, g)):
        raw = grids.encode(c, g)
        assert raw.shape == (6, t.row_bytes(512)) and raw.dtype == np.uint8
        ref = gq.dequantize(raw, gguf.GGMLQuantizationType(t.value))
        assert np.array_equal(_bits(ref), _bits(grids.dequantize_weight(c, g)))
        back, g2 = grids.decode(raw, t, 512)
        assert torch.equal(back, c)
        assert torch.equal(g2.scale, g.scale) and torch.equal(g2.offset, g.offset)


@pytest.mark.parametrize("name", TYPES)
def test_fitted_grids_are_close(name):
    """Rounding on the fitted grid: error in the range of the type's bits (and never worse
    than gguf-py's own quantizer, for the types it has one)."""
    t = grids.TYPES[name]
    w = _weight(32, 512, seed=7)
    g = grids.fit(w, t)
    err = ((grids.dequantize_weight(grids.quantize_weight(w, g), g) - w).norm() / w.norm())
    assert 0 < err < {3: 0.2, 4: 0.1, 5: 0.05, 6: 0.025, 8: 0.01}[t.bits]
    qtype = gguf.GGMLQuantizationType(t.value)
    if name in ("Q4_0", "Q5_0", "Q5_1", "Q8_0"):
        ref = torch.from_numpy(gq.dequantize(gq.quantize(w.numpy(), qtype), qtype))
        assert err <= 1.001 * (ref - w).norm() / w.norm()


def test_importance_lowers_the_weighted_error():
    w = _weight(32, 512, seed=4)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(5)) ** 4 + 1e-3
    for name in ("Q4_K", "Q3_K", "Q6_K", "Q5_0"):
        t = grids.TYPES[name]

        def weighted(g):
            q = grids.dequantize_weight(grids.quantize_weight(w, g), g)
            return float(((q - w) ** 2 * imp).sum())

        assert weighted(grids.fit(w, t, imp)) < weighted(grids.fit(w, t)), name


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        grids.fit(torch.randn(4, 576), "Q4_K")
    with pytest.raises(ValueError, match="unsupported ggml type"):
        grids.block_type("Q2_K")
    with pytest.raises(ValueError, match="do not hold rows"):
        grids.decode(np.zeros((2, 100), np.uint8), "Q4_K", 256)


# ------------------------------------------------------------------------- the mixes

def _llama(layers: int, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{n}"] = (hidden, hidden)
        for n in ("gate_proj", "up_proj"):
            shapes[f"{p}mlp.{n}"] = (inter, hidden)
        shapes[f"{p}mlp.down_proj"] = (hidden, inter)
    return shapes


def _types(ftype: str, shapes: dict[str, tuple[int, int]], layers: int) -> dict[str, str]:
    return {n: tensor_type(ftype, n, s[1], layers) for n, s in shapes.items()}


# From llama_tensor_get_type (src/llama-quant.cpp) by hand: use_more_bits(i, 30) holds for
# i < 3, i >= 26 and (i - 3) % 3 == 2; for 32 layers i < 4, i >= 28 and (i - 4) % 3 == 2.
MORE_30 = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
MORE_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def test_use_more_bits_layers():
    assert {i for i in range(30) if use_more_bits(i, 30)} == MORE_30
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_32


def test_smollm2_q4_k_m_types():
    """576-wide rows are no multiple of 256: Q4_K falls back to Q5_0 and Q6_K to Q8_0; the
    down projection (1536 wide) keeps the K types."""
    types = _types("q4_k_m", _llama(30, 576, 1536), 30)
    for i in range(30):
        p = f"model.layers.{i}."
        assert types[p + "self_attn.v_proj"] == ("Q8_0" if i in MORE_30 else "Q5_0")
        assert types[p + "mlp.down_proj"] == ("Q6_K" if i in MORE_30 else "Q4_K")
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj"):
            assert types[p + n] == "Q5_0"


def test_smollm2_q3_k_m_types():
    types = _types("q3_k_m", _llama(30, 576, 1536), 30)
    for i in range(30):
        p = f"model.layers.{i}."
        assert types[p + "self_attn.v_proj"] == ("Q5_1" if i < 2 else "Q5_0")
        assert types[p + "mlp.down_proj"] == ("Q5_K" if i < 1 else "Q4_K")  # 30 // 16 = 1
        assert types[p + "self_attn.o_proj"] == "Q5_0"
        for n in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert types[p + n] == "Q4_0"


def test_llama_7b_shape_types():
    """32 blocks of 4096 (intermediate 11008 = 43 x 256): no fallback anywhere."""
    q4 = _types("q4_k_m", _llama(32, 4096, 11008), 32)
    q3 = _types("q3_k_m", _llama(32, 4096, 11008), 32)
    for i in range(32):
        p = f"model.layers.{i}."
        more = "Q6_K" if i in MORE_32 else "Q4_K"
        assert q4[p + "self_attn.v_proj"] == more and q4[p + "mlp.down_proj"] == more
        assert q4[p + "self_attn.q_proj"] == q4[p + "mlp.up_proj"] == "Q4_K"
        assert q3[p + "self_attn.v_proj"] == ("Q5_K" if i < 2 else "Q4_K")
        assert q3[p + "mlp.down_proj"] == ("Q5_K" if i < 2 else "Q4_K")  # 32 // 16 = 2
        assert q3[p + "self_attn.o_proj"] == "Q4_K"
        assert q3[p + "self_attn.q_proj"] == q3[p + "mlp.gate_proj"] == "Q3_K"
    assert tensor_type("q4_k_m", "lm_head", 576, 30) == "Q8_0"
    assert tensor_type("q4_k_m", "lm_head", 4096, 32) == "Q6_K"


def test_mix_errors_name_the_layer():
    with pytest.raises(RecipeError, match="router"):
        tensor_type("q4_k_m", "model.layers.0.mlp.router", 576, 30)
    with pytest.raises(RecipeError, match="block 31"):
        tensor_type("q4_k_m", "model.layers.31.mlp.down_proj", 1536, 30)
    with pytest.raises(RecipeError, match="ftype"):
        GGUFQuant("q2_k")


# ------------------------------------------------------------------------- the solve

def _problem(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g)
    x = (x @ (0.2 * torch.randn(cols, cols, generator=g) + torch.eye(cols))) \
        * (0.2 + 2 * torch.rand(cols, generator=g))
    return x, 2 * x.t() @ x / x.shape[0], _weight(rows, cols, seed + 1)


@pytest.mark.parametrize("name", ["Q4_K", "Q3_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0"])
def test_gptq_on_a_grid_beats_rounding(name):
    t = grids.TYPES[name]
    x, h, w = _problem(16, 256)
    c = gptq_ggml(w, h, t)

    def out_err(c):
        return float(((x @ (c.dense() - w).t()) ** 2).sum()) / x.shape[0]

    assert out_err(c) < 0.7 * out_err(rtn_ggml(w, t, torch.diagonal(h)))
    # the blocks are the file's: gguf-py reads back the weight the solve computed with
    ref = gq.dequantize(c.blocks.numpy(), gguf.GGMLQuantizationType(t.value))
    assert np.array_equal(_bits(ref), _bits(c.dense()))
    # the loss the sweep reports is the output error ‖X(W - Q)ᵀ‖² / n (nearly undamped)
    exact = gptq_ggml(w, h, t, damp=1e-6, act_order=False)
    assert exact.loss == pytest.approx(out_err(exact), rel=0.02)


def test_act_order_codes_land_in_their_columns():
    """With act-order the columns are swept permuted: the codes must come back in place
    (a diagonal H makes every column independent, so GPTQ equals weighted rounding)."""
    t = grids.TYPES["Q4_K"]
    w = _weight(8, 256, 3)
    d = torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.1
    c = gptq_ggml(w, torch.diag(d), t, damp=0.0)
    assert torch.equal(c.dense(), rtn_ggml(w, t, d).dense())


# ------------------------------------------------------------------------- method, module, codec

def test_method_round_trips_and_resolves_per_layer():
    m = GGUFQuant("q3_k_m", act_order=False)
    assert method_from_dict(method_to_dict(m)) == m
    assert Recipe.from_yaml(Recipe({".*": m}).to_yaml()).rules == ((".*", m),)
    assert m.for_layer("model.layers.0.mlp.down_proj", (576, 1536), 30).type == "Q5_K"
    assert NAMED["gptq-q4_k_m"].match("model.layers.3.mlp.up_proj")[1] == GGUFQuant("q4_k_m")
    assert NAMED["gptq-q3_k_m"].match("lm_head")[1] is None
    assert block_count(["model.layers.0.a", "model.layers.29.b", "lm_head"]) == 30
    with pytest.raises(RecipeError, match="no type"):
        m.solve(torch.randn(4, 256), Statistics(torch.eye(256), 1), "x")


def test_module_codec_and_encoder_keep_the_blocks():
    x, h, w = _problem(12, 256)
    c = gptq_ggml(w, h, grids.TYPES["Q4_K"])
    bias = torch.randn(12)
    m = compressed_module(c, bias, torch.float32)
    assert isinstance(m, GGMLLinear)
    inp = torch.randn(3, 256)
    assert torch.allclose(m(inp), inp @ c.dense().t() + bias, rtol=1e-5, atol=1e-6)
    codec = codec_for(m)
    entry = codec.describe(m)
    assert entry["kind"] == "ggml" and entry["ggml_type"] == "Q4_K"
    assert codec_of(entry).entry_problem(entry) is None
    tensors = codec.encode(m, entry)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == codec.expected(entry)
    back = codec.decode(entry, {k: v.clone() for k, v in tensors.items()}, "")
    assert torch.equal(back.weight_blocks, m.weight_blocks) and torch.equal(back(inp), m(inp))
    assert torch.equal(codec.to_compressed(back, c.loss).blocks, c.blocks)
    value, raw = ENCODERS[GGMLLinear](m)
    assert value == gguf.GGMLQuantizationType.Q4_K and np.array_equal(raw, c.blocks.numpy())
    assert codec.entry_problem({**entry, "ggml_type": "Q4_K", "in_features": 100}) is not None
    # what the CLI, decompress and the GGUF writer ask the kind: Q4_K stores 4.5 bits a weight
    assert torch.equal(codec.dense_weight(m), c.dense())
    assert codec.stored_bits(m, "bitmask") == (4.5 * 12 * 256, 12 * 256)
    assert codec.pruned_weights(m) is None and not codec.lora_base


@pytest.mark.slow
def test_compile_plans_the_mix_and_checkpoints_round_trip(tmp_path):
    """The named recipe end to end on a tiny Llama of 2 blocks: each linear gets the type
    llama-quantize would give it (hidden 64: 32-block fallbacks; the down projection's 256
    columns: K-quants), and save/load keeps the blocks and the function exactly."""
    import fxcompress

    from .models import VOCAB, build, output

    model = build("llama", 64, layers=2, intermediate=256)
    fxcompress.compile(model, torch.randint(0, VOCAB, (4, 16)), NAMED["gptq-q4_k_m"],
                       progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    assert len(layers) == 2 * 7
    for i, more in enumerate([False, True]):  # use_more_bits(i, 2)
        assert use_more_bits(i, 2) == more
        assert layers[f"model.layers.{i}.mlp.down_proj"].type.name == ("Q6_K" if more else "Q4_K")
        assert layers[f"model.layers.{i}.self_attn.v_proj"].type.name == ("Q8_0" if more
                                                                            else "Q5_0")
        assert layers[f"model.layers.{i}.mlp.up_proj"].type.name == "Q5_0"
    fxcompress.save(model, tmp_path)
    loaded = fxcompress.load(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(output(model, ids), output(loaded, ids))
    for n, m in loaded.named_modules():
        if n in layers:
            assert torch.equal(m.weight_blocks, layers[n].weight_blocks), n

"""Write an fxcompress checkpoint as a GGUF file that llama.cpp loads.

The file holds what llama.cpp's own ``convert_hf_to_gguf.py`` writes for the dense model (the
same hyperparameter keys, tensor names, rope row order of Q and K, and tokenizer keys), with
each compressed layer stored as :data:`~fxcompress.gguf.ENCODERS` says for its class: GPTQ grids
that are ggml types keep their codes and scales (``encoders.py``), pruned layers are dense.
Everything else is the checkpoint's own floats: F32, F16 or BF16 as stored, norms and other 1-D
tensors F32 (what llama.cpp's kernels expect of them).

``dtype="f32"`` or ``"f16"`` writes every weight as a float matrix (quantized layers
dequantized): the same function in llama.cpp's float kernels, the reference a quantized GGUF is
compared with, and a way to export grids that are no ggml type.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from . import ENCODERS, Encoded
from .encoders import GGUFExportError, dense

log = logging.getLogger(__name__)

DTYPES = (None, "auto", "f32", "f16")


@dataclass(frozen=True)
class Architecture:
    """What differs between the decoder families written: GGUF's architecture, whether Q/K
    rows are reordered for llama.cpp's rope (interleaved pairs) from Hugging Face's (halves),
    and whether the converter's Llama class adds vocab_size and rope.dimension_count."""

    arch: gguf.MODEL_ARCH
    llama: bool


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, llama=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, llama=False),
}

# llama.cpp names a BPE pre-tokenizer by the sha256 of the token ids the Hugging Face tokenizer
# gives for this text (convert_hf_to_gguf.py, get_vocab_base_pre; the hashes below are its).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def write_gguf(checkpoint_dir: str | Path, out_file: str | Path, *,
               dtype: str | None = None, pre_tokenizer: str | None = None) -> Path:
    """Write the fxcompress checkpoint ``checkpoint_dir`` (or a dense Hugging Face model
    folder) as the GGUF file ``out_file``.

    ``dtype``: ``None``/``"auto"`` stores each compressed layer as its encoder says (an error
    names any layer whose grid is no ggml type); ``"f32"``/``"f16"`` stores every weight as a
    float matrix of that type. The tokenizer is read from the checkpoint folder (``fxcompress.
    save`` copies the model's tokenizer files there); llama.cpp's name of its pre-tokenizer is
    identified as llama.cpp's converter does, or given as ``pre_tokenizer`` (e.g. ``"gpt-2"``)
    for a tokenizer it does not know. Returns ``out_file``.
    """
    if dtype not in DTYPES:
        raise GGUFExportError(f"dtype must be one of 'auto', 'f32', 'f16', got {dtype!r}")
    folder, out_file = Path(checkpoint_dir), Path(out_file)
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder} is not a checkpoint or model folder (no config.json)")
    hparams = json.loads((folder / "config.json").read_text())
    arch = _architecture(hparams)
    model = _load(folder, hparams)
    # every tensor is encoded and the tokenizer read before the file is opened, and the file is
    # written beside out_file: a layer that cannot be written leaves no file, a crash no half
    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch.arch])
    mix = _mix_ftype(model) if dtype in (None, "auto") else None
    tensors = list(_tensors(model, hparams, arch, None if dtype == "auto" else dtype, mix))
    file_type = int(getattr(gguf.LlamaFileType, f"MOSTLY_{mix.upper()}")) if mix else \
        _file_type(tensors)
    _add_hyperparameters(writer, hparams, folder, arch, file_type)
    _add_tokenizer(writer, folder, hparams, arch, pre_tokenizer)
    for name, kind, data in tensors:
        writer.add_tensor(name, data, raw_dtype=T(kind))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    log.info("fxcompress: wrote %d tensors to %s", len(tensors), out_file)
    return out_file


# ------------------------------------------------------------------------------- tensors


def _load(folder: Path, hparams: dict[str, Any]) -> nn.Module:
    """The checkpoint's model; a Hugging Face folder without fxcompress's quantization config
    (the dense model a compressed one is compared with) is loaded by transformers."""
    if "fxcompress" in (hparams.get("quantization_config") or {}):
        from ..checkpoint import load

        return load(folder)
    if hparams.get("quantization_config"):
        raise GGUFExportError(f"{folder} holds a checkpoint quantized by another tool "
                              f"({hparams['quantization_config'].get('quant_method')!r})")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


def _architecture(hparams: dict[str, Any]) -> Architecture:
    model_type = hparams.get("model_type")
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(f"model_type {model_type!r} is not written to GGUF yet: "
                              f"supported are {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def _tensors(model: nn.Module, hparams: dict[str, Any], arch: Architecture,
             dtype: str | None, ftype: str | None = None
             ) -> Iterator[tuple[str, int, np.ndarray]]:
    """``(GGUF name, ggml type, data)`` of every tensor in the model's order (data: raw bytes
    ``(rows, bytes per row)``, or a float array for F32/F16): linears as their encoder or
    ``dtype`` says, the rest as stored; with a llama-quantize mix ``ftype``, the output head
    as that mix types it."""
    names = gguf.get_tensor_name_map(arch.arch, hparams["num_hidden_layers"])
    linears = {n: m for n, m in model.named_modules() if _is_linear(m)}
    tied = _tied_head(model)
    # what llama.cpp reads as the output head (the embedding, when the head is tied to it):
    # a _K_M mix quantizes it by llama.cpp's output rule unless the recipe compressed it
    head = model.get_output_embeddings()
    head_weight = next((n for n, p in model.named_parameters()
                        if head is not None and p is head.weight), None)
    done: set[str] = set()
    for key, t in model.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if ftype is not None and key == head_weight and type(linears.get(owner)) in (
                type(None), nn.Linear):  # not compressed by the recipe
            yield _named(names, key, hparams, arch, *_mix_head(t.detach(), ftype, hparams))
            continue
        if owner in linears:
            if owner in done or owner == tied:
                continue
            done.add(owner)
            for suffix, (kind, raw) in _linear(owner, linears[owner], dtype).items():
                yield _named(names, f"{owner}.{suffix}", hparams, arch, kind, raw)
        else:
            yield _named(names, key, hparams, arch, *_float(key, t.detach(), dtype))


def _mix_ftype(model: nn.Module) -> str | None:
    """The llama-quantize mix (``"q4_k_m"``) of a checkpoint made by a ``GGUFQuant`` recipe,
    None for any other (a method names its mix as ``ftype``; only GGUFQuant has one)."""
    recipe = getattr(model, "fxcompress_recipe", None)
    mixes = {f for _, m in getattr(recipe, "rules", ()) if (f := getattr(m, "ftype", None))}
    if len(mixes) > 1:
        raise GGUFExportError(f"the recipe mixes llama.cpp file types {sorted(mixes)}: "
                              f"a GGUF has one")
    return mixes.pop() if mixes else None


def _mix_head(w: torch.Tensor, ftype: str, hparams: dict[str, Any]) -> Encoded:
    """The output head (or the embedding a tied head shares) in the type llama-quantize's
    ``ftype`` mix gives it, rounded to nearest on llama.cpp's own grid (no importance: the
    head's inputs are not calibrated), as llama-quantize does for it."""
    from . import grids, mix

    t = mix.tensor_type(ftype, "lm_head", w.shape[1], hparams["num_hidden_layers"])
    g = grids.fit(w.float(), t)
    return grids.TYPES[t].value, grids.encode(grids.quantize_weight(w.float(), g), g)


def _is_linear(m: nn.Module) -> bool:
    return type(m) in ENCODERS or isinstance(m, nn.Linear)


def _tied_head(model: nn.Module) -> str | None:
    """The module name of an output head that shares the embedding's weight (llama.cpp reads
    the embedding then, as the converter writes no head for tied models)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and getattr(head, "weight", None) is embed.weight:
        return next(n for n, m in model.named_modules() if m is head)
    return None


def _linear(name: str, m: nn.Module, dtype: str | None) -> dict[str, Encoded]:
    """The weight (and bias) of one linear layer as ggml types."""
    out: dict[str, Encoded] = {}
    try:
        if dtype is not None:
            out["weight"] = _as(dtype, _dense_weight(m))
        elif type(m) in ENCODERS:
            out["weight"] = ENCODERS[type(m)](m)
        else:
            out["weight"] = dense(m.weight.detach().cpu())
    except GGUFExportError as e:
        raise GGUFExportError(f"layer {name!r} ({type(m).__name__}): {e}") from None
    if getattr(m, "bias", None) is not None:
        out["bias"] = _as("f32", m.bias.detach())
    return out


def _dense_weight(m: nn.Module) -> torch.Tensor:
    """The float32 weight a compressed layer (its codec says which) or a dense one computes
    with."""
    from ..checkpoint.codecs import codec_for

    codec = codec_for(m)
    w = codec.dense_weight(m) if codec is not None else None
    if w is not None:
        return w.float()
    if isinstance(getattr(m, "weight", None), torch.Tensor):
        return m.weight.detach().float()
    raise GGUFExportError(f"{type(m).__name__} has no dequantize(): it can only be written "
                          f"by its encoder (dtype=None)")


def _as(dtype: str, t: torch.Tensor) -> Encoded:
    """``t`` (any shape) as F32 or F16."""
    return dense(t.detach().cpu().to(torch.float32 if dtype == "f32" else torch.float16))


def _float(key: str, t: torch.Tensor, dtype: str | None) -> Encoded:
    """An unquantized tensor: 1-D tensors (norms, biases) in F32 as the converter writes them,
    matrices in ``dtype`` or their own."""
    if t.dim() <= 1 or dtype == "f32":
        return _as("f32", t)
    if dtype == "f16":
        return _as("f16", t)
    return dense(t.cpu())


def _named(names: gguf.TensorNameMap, key: str, hparams: dict[str, Any], arch: Architecture,
           kind: int, raw: np.ndarray) -> tuple[str, int, np.ndarray]:
    """GGUF's name for a Hugging Face tensor, with Q/K rows in llama.cpp's rope order."""
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"tensor {key!r} has no GGUF name in architecture "
                              f"{gguf.MODEL_ARCH_NAMES[arch.arch]!r}")
    if arch.llama and key.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight",
                                         "k_proj.bias")):
        heads = hparams["num_attention_heads"]
        if ".k_proj." in key:
            heads = hparams.get("num_key_value_heads") or heads
        raw = np.ascontiguousarray(raw[rope_rows(raw.shape[0], heads)])
    return name, kind, raw


def rope_rows(rows: int, heads: int) -> np.ndarray:
    """Row order of Q or K for llama.cpp: within each head, Hugging Face's rotary halves
    ``(x_0..x_{d/2-1}, y_0..y_{d/2-1})`` become interleaved pairs ``(x_0, y_0, x_1, y_1, …)``,
    the reordering ``LlamaModel.permute`` of convert_hf_to_gguf.py applies. Each row's
    blocks are independent, so quantized rows move with their scales unchanged."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _file_type(tensors: list[tuple[str, int, np.ndarray]]) -> int:
    """general.file_type: the type most of the blocks' matrices have (informational in
    llama.cpp; the converter writes its output type)."""
    kinds = Counter(T(k) for n, k, _ in tensors if n.startswith("blk.")
                    and n.endswith(".weight") and not n.endswith("_norm.weight"))
    if not kinds:
        return int(gguf.LlamaFileType.ALL_F32)
    return int(FILE_TYPES.get(kinds.most_common(1)[0][0], gguf.LlamaFileType.GUESSED))


# ------------------------------------------------------------------------------ metadata


def _add_hyperparameters(w: gguf.GGUFWriter, hp: dict[str, Any], folder: Path,
                         arch: Architecture, file_type: int) -> None:
    """The keys convert_hf_to_gguf.py writes for a Llama/Qwen2 model (TextModel and
    LlamaModel.set_gguf_parameters), from the same config.json."""
    source = Path(hp.get("_name_or_path") or folder.name).name or folder.name
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(source)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads") or hp["num_attention_heads"])
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rope_type, factor = rope.get("rope_type") or rope.get("type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type not in (None, "default"):
        raise GGUFExportError(f"rope type {rope_type!r} is not written to GGUF yet "
                              f"(default and linear are)")
    theta = rope.get("rope_theta", hp.get("rope_theta"))
    if theta is not None:
        w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if (head_dim := hp.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(file_type)
    if arch.llama:
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim or hp["hidden_size"] // hp["num_attention_heads"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(w: gguf.GGUFWriter, folder: Path, hp: dict[str, Any],
                   arch: Architecture, pre: str | None) -> None:
    """A Hugging Face BPE tokenizer as llama.cpp's converter writes it (``_set_vocab_gpt2``):
    every id's token and type, the pre-tokenizer's name, merges, special ids, add-BOS/EOS and
    the chat template."""
    if not (folder / "tokenizer.json").is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json: copy the model's tokenizer "
                              f"files into it (fxcompress.save copies them when the model was "
                              f"loaded from a folder, or pass tokenizer= to save)")
    from transformers import AutoTokenizer

    config = _read_json(folder / "tokenizer_config.json")
    if (prefix := config.get("add_prefix_space")) is not None:
        w.add_add_space_prefix(prefix)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokens, types = vocabulary(tokenizer, hp["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre or identify_pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True).add_to_gguf(w)
    if arch.llama and hp["vocab_size"] == 49152:
        # the converter's rule for Llama models with this vocabulary (Granite's small models,
        # SmolLM): they are trained without a BOS at the start
        w.add_add_bos_token(False)


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


def vocabulary(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and ggml token types of ids ``0 .. vocab_size-1`` (``get_vocab_base`` of the
    converter): missing ids are ``[PAD<i>]`` (unused), added tokens control when special or
    ``<|…|>``-shaped, user-defined otherwise (pre-normalized by an encode-decode round)."""
    by_id = {i: t for t, i in tokenizer.vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = by_id[i]
        kind = gguf.TokenType.NORMAL
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")
                kind = gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(kind)
    return tokens, [int(t) for t in types]


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") \
        or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) \
        or (token.startswith("<unused") and token.endswith(">"))


def identify_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, identified as the converter does."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise GGUFExportError(f"unknown BPE pre-tokenizer (hash {digest}): find the hash in "
                              f"llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre) and pass "
                              f"its name as pre_tokenizer=")
    return PRE_TOKENIZERS[digest]

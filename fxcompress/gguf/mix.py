"""Which ggml type llama-quantize gives each linear of a Llama-like model in a ``_K_M`` mix.

A mirror of ``llama_tensor_get_type`` in llama.cpp's ``src/llama-quant.cpp`` for the two
mixes fxcompress solves (LLAMA_FTYPE_MOSTLY_Q4_K_M and Q3_K_M) on dense (not
mixture-of-experts, not Falcon) models: the mix's default type, the bumps of ``attn_v`` and
``ffn_down`` by layer (``use_more_bits``), and ``tensor_type_fallback`` for rows that are not
a multiple of 256 weights (SmolLM2's 576). Not mirrored: the 70B-only ``attn_v`` bump (llama.cpp
recognises a 70B model by its hyperparameters, not by anything a linear carries) and the
8-expert rules. A GGUF made by fxcompress then holds each tensor in the type llama-quantize
would have chosen, so the two files are compared at the same size.
"""

from __future__ import annotations

import re

from ..errors import RecipeError
from .grids import QK_K

FTYPES = ("q4_k_m", "q3_k_m")

# Hugging Face projection names -> llama.cpp tensor roles
ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "lm_head": "output"}

# tensor_type_fallback: the 32-block type a 256-block type becomes on rows it cannot hold
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_LAYER = re.compile(r"\.(\d+)\.")


def role_of(name: str) -> str:
    """The llama.cpp role (``attn_v``, ``ffn_down``, ...) of a module named ``name``."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in ROLES:
        raise RecipeError(f"{name!r} is not a projection a llama.cpp mix knows ({', '.join(ROLES)}"
                          f"); leave it to another rule")
    return ROLES[leaf]


def layer_of(name: str) -> int | None:
    """The block index in a module name (``model.layers.12.mlp.down_proj`` -> 12)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth and
    every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def mix_type(ftype: str, role: str, layer: int, layers: int) -> str:
    """The type the mix ``ftype`` wants for ``role`` in block ``layer`` of ``layers``, before
    the shape fallback."""
    if ftype not in FTYPES:
        raise RecipeError(f"unknown llama.cpp mix {ftype!r}; expected one of {FTYPES}")
    if role == "output":
        return "Q6_K"
    if ftype == "q4_k_m":
        if role in ("attn_v", "ffn_down") and use_more_bits(layer, layers):
            return "Q6_K"
        return "Q4_K"
    if role == "attn_v":
        return "Q5_K" if layer < 2 else "Q4_K"
    if role == "ffn_down":
        return "Q5_K" if layer < layers // 16 else "Q4_K"
    if role == "attn_output":
        return "Q4_K"
    return "Q3_K"


def tensor_type(ftype: str, name: str, in_features: int, layers: int) -> str:
    """The ggml type llama-quantize gives the linear ``name`` with ``in_features`` columns in a
    model of ``layers`` blocks, fallback included."""
    role = role_of(name)
    layer = layer_of(name)
    if layer is None and role != "output":
        raise RecipeError(f"{name!r}: no block index in the name, which the mix needs")
    if layer is not None and not 0 <= layer < layers:
        raise RecipeError(f"{name!r}: block {layer} outside a model of {layers} blocks")
    t = mix_type(ftype, role, layer or 0, layers)
    if role == "output" and in_features % QK_K:
        return "Q8_0"  # llama.cpp's output rule, before any fallback
    if in_features % QK_K:
        t = FALLBACK[t]
    if in_features % 32:
        raise RecipeError(f"{name!r}: {in_features} columns are not a multiple of 32; "
                          f"llama.cpp would keep it in float16")
    return t

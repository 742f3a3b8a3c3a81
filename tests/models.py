"""Small randomly initialised models of the architectures fxcompress is tested on."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

VOCAB = 128


def build(arch: str, hidden: int = 128, layers: int = 2, seed: int = 0) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "llama":
            cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True, **common)
            model = T.LlamaForCausalLM(cfg)
        elif arch == "qwen2":
            cfg = T.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden,
                                num_attention_heads=4, num_key_value_heads=2, **common)
            model = T.Qwen2ForCausalLM(cfg)
        elif arch == "opt":
            cfg = T.OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_attention_heads=4,
                              word_embed_proj_dim=hidden, max_position_embeddings=64,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1, **common)
            model = T.OPTForCausalLM(cfg)
        elif arch == "gpt2":
            cfg = T.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4,
                               n_positions=64, bos_token_id=0, eos_token_id=0)
            model = T.GPT2LMHeadModel(cfg)
        elif arch == "bert":
            cfg = T.BertConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                               num_attention_heads=4, max_position_embeddings=64, **common)
            model = T.BertModel(cfg)
        else:
            raise ValueError(arch)
    return model.eval()


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def substituted(dense: nn.Module, compressed: nn.Module) -> nn.Module:
    """``dense`` with every compressed layer's weight replaced by its dequantized/masked
    value: the reference the compressed model must reproduce."""
    from fxcompress import QuantLinear, SparseLinear

    ref = copy.deepcopy(dense)
    for name, m in compressed.named_modules():
        if isinstance(m, QuantLinear):
            w = m.dequantize()
        elif isinstance(m, SparseLinear):
            w = torch.where(m.mask, m.weight, 0)
        else:
            continue
        target = ref.get_submodule(name)
        transposed = type(target).__name__ == "Conv1D"
        target.weight.data = (w.t() if transposed else w).contiguous().to(target.weight.dtype)
    return ref

"""Small randomly initialised models of the architectures fxcompress is tested on."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

VOCAB = 128


def build(arch: str, hidden: int = 128, layers: int = 2, seed: int = 0,
          experts: str = "grouped_mm", intermediate: int | None = None) -> nn.Module:
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "llama":
            cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
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
        elif arch in MOE:
            model = _moe(arch, hidden, experts, common)
        else:
            raise ValueError(arch)
    return model.eval()


MOE = ("mixtral", "qwen3moe", "qwen2moe")
EXPERTS = 4


def _moe(arch: str, hidden: int, experts: str, common: dict) -> nn.Module:
    """Tiny mixture-of-experts decoders: 4 experts, 2 per token; Qwen2-MoE with its shared
    expert (an ordinary MLP) and shared-expert gate. ``experts`` is the experts
    implementation (transformers' default is grouped_mm)."""
    import transformers as T

    attn = dict(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2,
                experts_implementation=experts, **common)
    if arch == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(
            intermediate_size=hidden, num_local_experts=EXPERTS, num_experts_per_tok=2, **attn))
    if arch == "qwen3moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_experts=EXPERTS,
            num_experts_per_tok=2, head_dim=hidden // 4, **attn))
    return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_experts=EXPERTS,
        num_experts_per_tok=2, shared_expert_intermediate_size=hidden, **attn))


def uneven_features(model: nn.Module, seed: int = 3) -> nn.Module:
    """Scale every norm's weight by a seeded log-normal factor, in place: the linears' inputs
    get the uneven feature scales of trained models (on isotropic inputs every method is
    close to its data-free baseline, and an end-to-end comparison says little)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        w = getattr(m, "weight", None)
        if "norm" in type(m).__name__.lower() and isinstance(w, nn.Parameter) and w.dim() == 1:
            w.data *= torch.exp(torch.randn(w.shape, generator=g))
    return model


def relative_error(model: nn.Module, dense: nn.Module, ids: torch.Tensor) -> float:
    """``‖f(ids) - f_dense(ids)‖ / ‖f_dense(ids)‖`` over the whole output."""
    with torch.no_grad():
        ref = output(dense, ids)
        return ((output(model, ids) - ref).norm() / ref.norm()).item()


def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def substituted(dense: nn.Module, compressed: nn.Module) -> nn.Module:
    """``dense`` with every compressed layer's weight replaced by its dequantized/masked
    value: the reference the compressed model must reproduce."""
    from fxcompress import QuantExperts, QuantLinear, SparseExperts, SparseLinear

    ref = copy.deepcopy(dense)
    for name, m in compressed.named_modules():
        if isinstance(m, (QuantExperts, SparseExperts)):
            experts = ref.get_submodule(name)
            for bank in ("gate_up_proj", "down_proj"):
                w = m.dequantize(bank) if isinstance(m, QuantExperts) else \
                    torch.where(getattr(m, f"{bank}_mask"), getattr(m, bank), 0)
                getattr(experts, bank).data = w.to(getattr(experts, bank).dtype).contiguous()
            continue
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

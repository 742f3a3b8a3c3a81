"""A real-weights mixture-of-experts model without a model hub: SmolLM2-135M "MoEfied".

Each MLP's 1536 intermediate neurons are split into ``experts`` groups by balanced k-means on
their (normalised) gate rows, every group becoming one expert of a Mixtral block (its gate,
up and down slices); the router scores an expert by the centroid of its gate rows
(MoEfication, Zhang et al. 2022, training-free). The top-k renormalised router weights sum to
1, so the experts' down projections are scaled by k to keep the sum of the selected experts'
outputs, as MoEfication does. Attention, norms and embeddings are SmolLM2's own.

It is not a good language model (only k/experts of each MLP runs per token), but its experts
hold real trained weights, see real activations and are hit unevenly: enough to compare
calibration choices by the relative output error of the MoE blocks, not to claim quality.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def _balanced_kmeans(rows: Tensor, k: int, iters: int = 6, seed: int = 0) -> list[Tensor]:
    """Split ``rows`` (n, d) into k groups of n/k rows, by cosine similarity to centroids."""
    n = rows.shape[0]
    cap = n // k
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(iters):
        sim = x @ centroids.t()  # (n, k)
        order = torch.argsort(sim.flatten(), descending=True)
        assign = [-1] * n
        fill, placed = [0] * k, 0
        for flat in order.tolist():
            i, c = divmod(flat, k)
            if assign[i] < 0 and fill[c] < cap:
                assign[i], fill[c] = c, fill[c] + 1
                placed += 1
                if placed == n:
                    break
        assign_t = torch.tensor(assign)
        centroids = torch.stack([torch.nn.functional.normalize(x[assign_t == c].mean(0), dim=0)
                                 for c in range(k)])
    return [torch.nonzero(assign_t == c).squeeze(1) for c in range(k)]


def moefy(dense: torch.nn.Module, experts: int = 8, top_k: int = 2,
          experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    """A ``MixtralForCausalLM`` made from a Llama-architecture ``dense`` model (see above)."""
    import transformers as T

    c = dense.config
    inter = c.intermediate_size // experts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = T.MixtralConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=inter,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
            tie_word_embeddings=c.tie_word_embeddings, num_local_experts=experts,
            num_experts_per_tok=top_k, sliding_window=None, bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id, experts_implementation=experts_implementation)
        model = T.MixtralForCausalLM(cfg).eval()
    sd = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, _ = model.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for i, layer in enumerate(dense.model.layers):
            mlp, moe = layer.mlp, model.model.layers[i].mlp
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            groups = _balanced_kmeans(gate, experts, seed=i)
            for e, idx in enumerate(groups):
                moe.experts.gate_up_proj[e] = torch.cat([gate[idx], up[idx]])
                moe.experts.down_proj[e] = down[:, idx] * top_k
                moe.gate.weight[e] = gate[idx].mean(0)
    left = [k for k in missing if ".mlp." not in k and "rotary" not in k]
    if left:
        raise RuntimeError(f"weights not transferred: {left[:5]}")
    return model

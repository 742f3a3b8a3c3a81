"""Training with compressed models in a plain PyTorch loop (fxcompress.training).

Pruned weights stay exactly zero under common optimizers (and ``keep_masks`` re-zeroes them
under one that moves them), sparse training compiles with ``fullgraph=True``, input gradients
of quantized layers equal those of their dequantized weight, LoRA adapters train on a
quantized base, and ``compile`` can be called again in the middle of a loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import QuantLinear, SparseGPT, SparseLinear
from fxcompress.methods import RTN, Magnitude
from fxcompress.modules import compressed_module
from fxcompress.training import LoRALinear, add_lora, densify, enforce_masks, keep_masks

from .models import VOCAB, build


def _sparse(linear: nn.Linear, sparsity: float = 0.5) -> SparseLinear:
    c = Magnitude(sparsity).solve(linear.weight.detach())
    return SparseLinear.from_compressed(c, linear.bias)


def _sparse_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(_sparse(nn.Linear(32, 64)), nn.GELU(), _sparse(nn.Linear(64, 16)))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 32, generator=g), torch.randn(64, 16, generator=g)


def _pruned_weights_are_zero(model: nn.Module) -> bool:
    return all(torch.count_nonzero(m.weight[~m.mask]) == 0
               for m in model.modules() if isinstance(m, SparseLinear))


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-fused-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1,
                                                       amsgrad=True, fused=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=False),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True,
                                              weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masks_survive_20_optimizer_steps_with_weight_decay(name):
    model = _sparse_mlp()
    before = copy.deepcopy(model)
    x, y = _data()
    opt = OPTIMIZERS[name](model.parameters())
    losses = []
    for _ in range(20):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for m, m0 in zip(model, before, strict=True):
        if isinstance(m, SparseLinear):
            assert torch.equal(m.mask, m0.mask)
            assert not torch.equal(m.weight[m.mask], m0.weight[m.mask])  # it did train
    assert _pruned_weights_are_zero(model)
    assert [n for n, _ in model.named_buffers()] == ["0.mask", "2.mask"]  # mask stored once


class NoisySGD(torch.optim.SGD):
    """SGD plus Gaussian noise on every weight (SGLD-like): moves weights whose gradient is
    zero, which is exactly what the common optimizers never do."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return loss


def test_keep_masks_rezeroes_after_an_optimizer_that_moves_pruned_weights():
    model = _sparse_mlp()
    x, y = _data()
    opt = NoisySGD(model.parameters(), lr=1e-2)
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert not _pruned_weights_are_zero(model)
    first = model[0]  # the op masks anyway: what the layer computes is unaffected
    torch.testing.assert_close(first(x), F.linear(x, first.weight * first.mask, first.bias))
    assert enforce_masks(model) == 2 and _pruned_weights_are_zero(model)

    handle = keep_masks(opt, model)
    for _ in range(3):
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert _pruned_weights_are_zero(model)
    handle.remove()
    opt.step()
    assert not _pruned_weights_are_zero(model)


def test_sparse_training_under_torch_compile_fullgraph_matches_eager():
    eager = _sparse_mlp()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    x, y = _data()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
            for m in (eager, model)]
    for _ in range(3):
        for m, opt in zip((eager, compiled), opts, strict=True):
            F.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    assert _pruned_weights_are_zero(model)
    for p, q in zip(eager.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


KERNELS = {"int4pack": RTN(4, 64), "int8pack": RTN(8, -1), "canonical": RTN(8, 64)}


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_input_gradient_matches_the_dequantized_dense_weight(kernel):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    m = QuantLinear.from_compressed(KERNELS[kernel].solve(linear.weight.detach()), linear.bias)
    assert m.kernel == kernel
    buffers = {n: b.clone() for n, b in m.named_buffers()}
    x = torch.randn(3, 5, 128, requires_grad=True)
    g = torch.randn(3, 5, 96)
    m(x).backward(g)

    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, m.dequantize(), m.bias).backward(g)
    rel = ((x.grad - x_ref.grad).norm() / x_ref.grad.norm()).item()
    assert rel < (1e-2 if kernel == "int4pack" else 1e-6)  # int4pack: bf16 scales
    assert m.bias.grad is None  # the quantized layer stays frozen
    assert all(torch.equal(b, buffers[n]) for n, b in m.named_buffers())
    assert set(buffers) == {n for n, _ in m.named_buffers()}  # no dense weight kept


def _quantize_layers(model: nn.Module, cfg: RTN) -> nn.Module:
    """Swap the decoder's linears for QuantLinear (what ``compile`` with RTN installs),
    without the capture cost."""
    layers = model.model.layers
    for name, mod in list(layers.named_modules()):
        if isinstance(mod, nn.Linear):
            q = compressed_module(cfg.solve(mod.weight.detach()), mod.bias, mod.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(layers.get_submodule(parent), child, q)
    return model


def test_lora_starts_as_the_base_and_trains_only_adapters():
    model = _quantize_layers(build("llama", hidden=64), RTN(4, 32))
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
    add_lora(model, rank=4, alpha=8, dropout=0.1)
    model.eval()
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 14 and all(isinstance(m.base, QuantLinear) for m in wrapped)
    assert wrapped[0].scaling == 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_add_lora_targets_are_patterns_over_module_names():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(model)  # default: compressed linears only, and there are none
    add_lora(model, rank=2, targets=["2"], freeze_base=False)
    assert isinstance(model[2], LoRALinear) and isinstance(model[0], nn.Linear)
    assert model[0].weight.requires_grad and not model[2].base.weight.requires_grad
    add_lora(model, rank=2, targets=".*")  # never wraps an adapter's base again
    assert isinstance(model[0], LoRALinear) and isinstance(model[2].base, nn.Linear)


def test_adapter_on_a_quantized_smollm2_sized_model_reduces_its_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                      tie_word_embeddings=True)  # SmolLM2-135M's layer shapes, 2 of 30 layers
    model = _quantize_layers(LlamaForCausalLM(cfg), RTN(4, 64))
    assert {m.kernel for m in model.modules() if isinstance(m, QuantLinear)} == {"int4pack"}
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_packed")}
    # adapters on the top layer: their gradients cross its quantized o/gate/up/down inputs,
    # and the bottom layer (forward only) keeps the test fast
    add_lora(model, rank=8, targets=r"model\.layers\.1\..*")
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    packed = {n.replace(".base", ""): b for n, b in model.named_buffers()
              if n.endswith("weight_packed")}
    assert all(torch.equal(packed[n], b) for n, b in frozen.items())


def test_gradual_pruning_inside_a_training_loop():
    model = build("llama", hidden=64).train()
    stream = (torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(i))
              for i in range(1000))

    def train(steps: int, batch: torch.Tensor | None = None) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        losses = []
        for _ in range(steps):
            ids = next(stream) if batch is None else batch
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    train(2)
    fxcompress.compile(model, [next(stream) for _ in range(4)], SparseGPT(0.25), progress=False)
    assert model.training
    train(2)
    first = {n: m.mask.clone() for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    densify(model)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert all(model.get_submodule(n).weight is w for n, w in weights.items())
    assert all(torch.count_nonzero(w[~first[n]]) == 0 for n, w in weights.items())
    fxcompress.compile(model, [next(stream) for _ in range(4)], SparseGPT(0.5), progress=False)
    losses = train(5, next(stream))  # training goes on, at the new sparsity
    assert losses[-1] < losses[0]
    reported = {r.fqn: r.sparsity for r in model.fxcompress_report.layers}  # OWL's, per block
    kept = total = 0
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear):
            assert m.sparsity() == pytest.approx(reported[name], abs=0.02)
            assert first[name].float().mean() > m.mask.float().mean()
            kept, total = kept + int(m.mask.sum()), total + m.mask.numel()
    assert 1 - kept / total == pytest.approx(0.5, abs=0.01)
    assert _pruned_weights_are_zero(model)

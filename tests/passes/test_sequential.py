"""True-sequential calibration: each linear's Hessian comes from the compressed model so far."""

import copy

import torch

from fxcompress import GPTQ
from fxcompress.algorithms import Hessian
from fxcompress.api import _batch
from fxcompress.passes import calibrate, capture, find_sites
from fxcompress.passes.capture import call_kwargs

from ..models import VOCAB, build


def _hessian_of_input(model, module_name, calls):
    h = Hessian.zeros(model.get_submodule(module_name).in_features)
    handle = model.get_submodule(module_name).register_forward_pre_hook(
        lambda m, args: h.add(args[0]))
    with torch.no_grad():
        for args, kwargs in calls:
            model(*args, **kwargs)
    handle.remove()
    return h.value()


def test_later_hessians_see_the_compressed_earlier_layers():
    model = build("llama", layers=2)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(1))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    seen = {}
    results, _ = calibrate(ep, sites, {s.fqn: GPTQ(2, 32) for s in sites}, calls,
                           progress=False, on_hessian=lambda name, h: seen.setdefault(name, h))

    def with_compressed(prefixes):
        ref = copy.deepcopy(dense)
        for name, c in results.items():
            if name.startswith(prefixes):
                ref.get_submodule(name).weight.data = c.dense()
        return ref

    # layer 1's q_proj: computed from the model whose layer 0 is compressed
    name = "model.layers.1.self_attn.q_proj"
    expected = _hessian_of_input(with_compressed(("model.layers.0.",)), name, calls)
    dense_h = _hessian_of_input(dense, name, calls)
    assert torch.allclose(seen[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert (seen[name] - dense_h).norm() > 100 * (seen[name] - expected).norm()

    # within a layer: o_proj's input comes from the compressed q/k/v
    name = "model.layers.0.self_attn.o_proj"
    qkv = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    expected = _hessian_of_input(with_compressed(qkv), name, calls)
    assert torch.allclose(seen[name], expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert not torch.allclose(seen[name], _hessian_of_input(dense, name, calls), rtol=1e-3)


def test_linears_reading_the_same_input_share_one_hessian():
    model = build("llama", layers=1)
    ids = torch.randint(0, VOCAB, (4, 16))
    calls = _batch([((), call_kwargs(model, (row[None],), {})) for row in ids], 4)
    ep = capture(model, *calls[0])
    sites, _ = find_sites(ep, model)
    seen = {}
    calibrate(ep, sites, {s.fqn: GPTQ(4, 32) for s in sites}, calls, progress=False,
              on_hessian=lambda name, h: seen.setdefault(name, h))
    q, k, v = (seen[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert seen["model.layers.0.mlp.gate_proj"] is seen["model.layers.0.mlp.up_proj"]

"""The CPU paths of the fxcompress ops against the dequantized reference, and opcheck."""

import pytest
import torch
import torch.nn.functional as F

from fxcompress.algorithms import Hessian, Statistics
from fxcompress.methods import GPTQ, RTN, SparseGPT
from fxcompress.modules import QuantLinear, SparseLinear

K, N = 256, 96


def _h(k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = Hessian.zeros(k)
    h.add(torch.randn(4 * k, k, generator=g) @ torch.randn(k, k, generator=g))
    return h.value()


def _args(m: QuantLinear, x):
    if m.kernel == "int4pack":
        return torch.ops.fxcompress.int4pack_linear, (
            x, m._w_int4, m._scale_zeros, m._perm, m.bias, m.kernel_group)
    if m.kernel == "int8pack":
        return torch.ops.fxcompress.int8pack_linear, (x, m._w_int8, m._scale8, m._offset8, m.bias)
    return torch.ops.fxcompress.quant_linear, (
        x, m.weight_packed, m.weight_scale, m.weight_zero_point, m.weight_g_idx, m.bias,
        m.bits, m.group_size, m.in_features)


CASES = [
    (GPTQ(4, 128), "int4pack"), (GPTQ(4, 32, sym=True), "int4pack"),
    (GPTQ(4, -1), "int4pack"), (GPTQ(3, 64), "int4pack"), (GPTQ(2, 32), "int4pack"),
    (GPTQ(4, 64, act_order=True), "int4pack"),
    (GPTQ(3, 32, act_order=True, static_groups=False), "int4pack"),
    (GPTQ(8, -1), "int8pack"), (GPTQ(8, -1, sym=True), "int8pack"),
    (GPTQ(8, 64), "canonical"), (GPTQ(4, 16), "canonical"),
]


@pytest.mark.parametrize("cfg, kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_dequantized_reference(cfg, kernel, dtype):
    w = torch.randn(N, K)
    c = cfg.solve(w, Statistics(_h(), K))
    m = QuantLinear.from_compressed(c, torch.randn(N), dtype=dtype)
    assert m.kernel == kernel
    x = torch.randn(3, 5, K, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (3, 5, N)
    ref = F.linear(x.double(), c.dense().double(), m.bias.double())
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    # int4pack runs bf16 activations; bf16 inputs carry their own rounding
    bound = 1e-5 if (kernel != "int4pack" and dtype == torch.float32) else 1.5e-2
    assert rel < bound
    assert torch.equal(m.dequantize(), c.dense())


@pytest.mark.parametrize("cfg, kernel", CASES[:3] + CASES[6:10])
def test_ops_pass_opcheck(cfg, kernel):
    m = QuantLinear.from_compressed(cfg.solve(torch.randn(N, K), Statistics(_h(), K)),
                                    torch.randn(N))
    op, args = _args(m, torch.randn(2, 7, K, requires_grad=True))
    torch.library.opcheck(op, args)


def test_canonical_path_is_the_reference_on_cpu():
    c = RTN(4, 64).solve(torch.randn(N, K))
    m = QuantLinear.from_compressed(c)
    x = torch.randn(4, K)
    y = torch.ops.fxcompress.quant_linear(x, m.weight_packed, m.weight_scale,
                                          m.weight_zero_point, None, None, 4, 64, K)
    torch.testing.assert_close(y, x @ c.dense().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [GPTQ(4, 64), GPTQ(8, -1), GPTQ(3, 32, act_order=True,
                                                                  static_groups=False)])
def test_input_gradient_matches_dense_weight(cfg):
    c = cfg.solve(torch.randn(N, K), Statistics(_h(), K))
    m = QuantLinear.from_compressed(c)
    x = torch.randn(6, K, requires_grad=True)
    g = torch.randn(6, N)
    (m(x) * g).sum().backward()
    ref = g @ c.dense()
    # the int4 path computes in bf16 (8 significant bits): bound the relative error of the
    # whole gradient, not of single entries that cancel out to nearly zero
    assert ((x.grad - ref).norm() / ref.norm()).item() < 1e-2


def test_masked_linear_matches_and_masks_weight_gradient():
    c = SparseGPT(n_m=(2, 4)).solve(torch.randn(N, K), Statistics(_h(), K))
    m = SparseLinear.from_compressed(c, torch.randn(N))
    x = torch.randn(4, K, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, c.dense(), m.bias))
    y.square().sum().backward()
    assert (m.weight.grad[~m.mask] == 0).all() and (m.weight.grad[m.mask] != 0).any()
    torch.library.opcheck(torch.ops.fxcompress.masked_linear, (x, m.weight, m.mask, m.bias))


def test_module_moves_and_reloads_rebuild_the_kernel_layout():
    c = GPTQ(4, 64).solve(torch.randn(N, K), Statistics(_h(), K))
    m = QuantLinear.from_compressed(c)
    x = torch.randn(2, K)
    y = m(x)
    m2 = QuantLinear(K, N, 4, 64)
    m2.load_state_dict(m.state_dict())
    assert m2.kernel == "int4pack" and torch.equal(m2(x), y)
    m.to(torch.bfloat16)  # scales stay float16: the stored grid is exact
    assert m.weight_scale.dtype == torch.float16 and torch.equal(m.dequantize(), c.dense())
    assert set(m.state_dict()) == {"weight_packed", "weight_scale", "weight_zero_point"}


def test_wrong_input_width_is_a_clear_error():
    m = QuantLinear.from_compressed(RTN(4, 64).solve(torch.randn(N, K)))
    with pytest.raises(ValueError, match="expects 256 input features"):
        m(torch.randn(2, 100))


@pytest.mark.parametrize("cfg", [GPTQ(4, 64), GPTQ(3, 32), GPTQ(8, -1), GPTQ(2, 64, sym=True),
                                 GPTQ(4, 32, act_order=True, static_groups=False),
                                 SparseGPT(n_m=(2, 4), quant=GPTQ(4, 64)),
                                 SparseGPT(n_m=(2, 4), quant=GPTQ(8, -1))])
def test_triton_layouts_decode_to_the_same_weight(cfg):
    """The layouts prepared for the CUDA kernels, read back by the ops' CPU reference branch
    (the kernels themselves are tested under the Triton interpreter in test_triton_kernels)."""
    w, h = torch.randn(N, K), _h()
    c = cfg.solve(w, Statistics(h, K))
    m = QuantLinear.from_compressed(c, torch.randn(N))
    m._prepare_triton()
    assert m.kernel == ("sparse24" if isinstance(cfg, SparseGPT) else "triton")
    x = torch.randn(2, 3, K, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, F.linear(x, c.dense(), m.bias), rtol=1e-4, atol=1e-4)
    op = torch.ops.fxcompress.sparse24_quant_linear if m.kernel == "sparse24" else \
        torch.ops.fxcompress.prepared_quant_linear
    args = (x, m._v24, m._meta24, m.weight_scale, m.weight_zero_point, m.bias, m.bits,
            m.group_size) if m.kernel == "sparse24" else \
        (x, m._tw, m._ts, m._tz, m._tperm, m.bias, m.bits, m.kernel_group)
    torch.library.opcheck(op, args)

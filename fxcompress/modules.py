"""Compressed replacements for ``nn.Linear`` (and Hugging Face ``Conv1D``).

``QuantLinear`` keeps its weight in the canonical compressed-tensors layout (persistent
buffers, what ``state_dict`` and checkpoints hold) and derives a kernel layout for the device
it lives on (non-persistent buffers, rebuilt whenever the module moves or loads a state dict):
on CPU, aten's int4 layout for 2/3/4-bit codes or int8 for per-channel 8-bit; elsewhere the
canonical layout itself. ``SparseLinear`` keeps a dense weight with a keep-mask, so that it
can be fine-tuned with the pattern intact.

Both call exactly one ``torch.ops.fxcompress`` op in ``forward``, and both pickle like any
``nn.Module`` (``torch.save(model)``): a ``QuantLinear`` pickles its canonical buffers only and
rebuilds its kernel layout when unpickled, for the machine that loads it.

**Precision.** aten's CPU int4 kernel computes with bf16 activations and bf16 scales: a
float32 model's logits then differ from the dequantized float32 model's by up to about 1 %
(relative; 0.8 % on SmolLM2-135M). :func:`set_precision` (``"exact"``) makes the int4 layers
compute in the activations' own dtype instead, from the canonical layout (dequantized per
call: slower, and the dequantized model's arithmetic). The choice is an attribute of each
module, not global state, so ``torch.compile`` and ``torch.export`` capture it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .algorithms import Compressed
from .hub import DEFAULT_EXPERT_NAMES, expert_names
from .kernels import ops, pack

CPU_INT4_GROUPS = (256, 128, 64, 32)
PRECISIONS = ("fast", "exact")
# kernel layouts derived from the canonical buffers (non-persistent, rebuilt by ``prepare``)
_DERIVED = ("_w_int4", "_scale_zeros", "_perm", "_w_int8", "_scale8", "_offset8",
            "_tw", "_ts", "_tz", "_tperm", "_v24", "_meta24")


def _prepare_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """A ``load_state_dict`` post-hook: the kernel layout follows the loaded buffers. A
    module-level function, not a lambda, so that the module pickles."""
    module.prepare()


class QuantLinear(nn.Module):
    """A linear layer with 2/3/4/8-bit weights (optionally also pruned: ``weight_bitmask``)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int,
                 sym: bool = False, bias: bool = False, dynamic_groups: bool = False,
                 sparse: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.sym = bits, sym
        self.group_size = in_features if group_size == -1 else group_size
        groups = in_features // self.group_size
        self.register_buffer("weight_packed", torch.zeros(
            out_features, pack.packed_width(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(
            out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("weight_zero_point", torch.full(
            (out_features, groups), 2 ** (bits - 1), dtype=torch.uint8, device=device))
        self.register_buffer("weight_g_idx", torch.zeros(
            in_features, dtype=torch.int32, device=device) if dynamic_groups else None)
        self.register_buffer("weight_bitmask", torch.zeros(
            out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device)
            if sparse else None)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.kernel, self.kernel_group = "canonical", 0
        self.precision = "fast"
        self.register_load_state_dict_post_hook(_prepare_after_load)
        self.prepare()

    @classmethod
    def from_compressed(cls, c: Compressed, bias: Tensor | None = None,
                        dtype: torch.dtype = torch.float32, prepare: bool = True
                        ) -> QuantLinear:
        """The layer computing with ``c``; ``prepare=False`` leaves out the kernel layout
        (the canonical buffers are all a checkpoint stores)."""
        if not c.quantized:
            raise ValueError("QuantLinear needs a quantized Compressed result")
        out_features, in_features = c.shape
        device = c.scale.device
        m = cls(in_features, out_features, c.bits, c.group_size, c.sym, bias is not None,
                dynamic_groups=not c.static_groups, sparse=c.pruned, device="meta",
                dtype=dtype)
        m.weight_packed = c.packed if c.packed is not None else pack.pack(c.codes, c.bits)
        m.weight_scale = c.scale.to(torch.float16)
        m.weight_zero_point = c.zero.to(torch.uint8)
        if m.weight_g_idx is not None:
            m.weight_g_idx = c.g_idx.to(torch.int32)
        if m.weight_bitmask is not None:
            m.weight_bitmask = c.bitmask if c.bitmask is not None else pack.pack_bitmask(c.mask)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
        if prepare:
            m.prepare()
        return m

    def codes(self) -> Tensor:
        """Unpacked integer codes ``(out, in)`` uint8."""
        return pack.unpack(self.weight_packed, self.bits, self.in_features)

    def dequantize(self) -> Tensor:
        """The dense float32 weight this layer computes with (canonical layout)."""
        return ops.dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point,
                              self.weight_g_idx, self.bits, self.group_size, self.in_features)

    # -- kernel layouts ------------------------------------------------------------------

    def _cpu_int4_group(self) -> int | None:
        if self.bits > 4 or self.out_features % 16:
            return None
        return next((g for g in CPU_INT4_GROUPS if self.group_size % g == 0), None)

    def prepare(self) -> None:
        """(Re)build the kernel layout for the device the canonical buffers are on."""
        for name in _DERIVED:
            self.register_buffer(name, None, persistent=False)
        device = self.weight_packed.device
        self.kernel = "canonical"
        if device.type == "cuda":
            self._prepare_triton()
        if device.type != "cpu":
            return
        kg = self._cpu_int4_group() if self.precision == "fast" else None
        if kg is not None:
            self._prepare_int4(kg)
        elif self.bits == 8 and self.group_size == self.in_features and self.weight_g_idx is None:
            self._prepare_int8()

    def _sorted_groups(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Codes with columns ordered by group, the column permutation (None if natural),
        and the group of each reordered column."""
        codes = self.codes()
        natural = torch.arange(self.in_features, device=codes.device) // self.group_size
        if self.weight_g_idx is None:
            return codes, None, natural
        perm = torch.argsort(self.weight_g_idx, stable=True)
        return codes[:, perm], perm, self.weight_g_idx[perm].long()

    def _prepare_int4(self, kg: int) -> None:
        codes, perm, groups = self._sorted_groups()
        self._w_int4, self._scale_zeros = int4pack(codes, self.weight_scale,
                                                   self.weight_zero_point, groups, self.bits, kg)
        self._perm = perm
        self.kernel_group = kg
        self.kernel = "int4pack"

    def _prepare_int8(self) -> None:
        scale = self.weight_scale.float()[:, 0]
        self._w_int8 = (self.codes().to(torch.int16) - 128).to(torch.int8)
        self._scale8 = scale
        offset = (128 - self.weight_zero_point.float()[:, 0]) * scale
        self._offset8 = None if self.sym else offset
        self.kernel = "int8pack"

    def _prepare_triton(self) -> None:
        """The Triton kernels' layouts: 2:4 kept half + positions for 2:4-sparse layers,
        otherwise ``prepare_quant_weight`` (3-bit planes, act-order columns sorted by group).
        Runs on any device (on CPU the ops' reference branches read the same layouts)."""
        from .kernels import triton_kernels as tk

        k, gs = self.in_features, self.group_size
        if gs % 16 and gs < k:
            return  # the kernels need groups of a multiple of 16 columns: canonical path
        if self.weight_bitmask is not None:
            mask = pack.unpack_bitmask(self.weight_bitmask, k)
            is_24 = k % 4 == 0 and bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())
            if is_24 and self.bits != 3 and self.weight_g_idx is None:
                self._v24, self._meta24 = pack.pack_24(self.codes(), mask, self.bits)
                self.kernel = "sparse24"
                return
        try:
            p = tk.prepare_quant_weight(self.weight_packed, self.weight_scale,
                                        self.weight_zero_point, self.bits, k, gs,
                                        self.weight_g_idx)
        except ValueError:
            return
        self._tw, self._ts, self._tz, self._tperm = p.weight, p.scale, p.zero, p.perm
        self.kernel_group = p.group_size
        self.kernel = "triton"

    def __getstate__(self) -> dict:
        """Pickle the canonical buffers only: the kernel layouts are derived, and aten's CPU
        int4 layout depends on the machine that packed it."""
        state = self.__dict__.copy()
        state["_buffers"] = {k: v for k, v in self._buffers.items() if k not in _DERIVED}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.prepare()

    def _apply(self, fn, recurse: bool = True):
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:  # keep the stored grid exact under .to(dtype)
            self.weight_scale = scale.to(self.weight_scale.device)
        if self.weight_packed.device.type != "meta":
            self.prepare()
        return self

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantLinear expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        if self.kernel == "int4pack" and x.device.type == "cpu":
            return torch.ops.fxcompress.int4pack_linear(
                x, self._w_int4, self._scale_zeros, self._perm, self.bias, self.kernel_group)
        if self.kernel == "int8pack" and x.device.type == "cpu":
            return torch.ops.fxcompress.int8pack_linear(
                x, self._w_int8, self._scale8, self._offset8, self.bias)
        if self.kernel == "triton":
            return torch.ops.fxcompress.prepared_quant_linear(
                x, self._tw, self._ts, self._tz, self._tperm, self.bias, self.bits,
                self.kernel_group)
        if self.kernel == "sparse24":
            return torch.ops.fxcompress.sparse24_quant_linear(
                x, self._v24, self._meta24, self.weight_scale, self.weight_zero_point, self.bias,
                self.bits, self.group_size)
        return torch.ops.fxcompress.quant_linear(
            x, self.weight_packed, self.weight_scale, self.weight_zero_point, self.weight_g_idx,
            self.bias, self.bits, self.group_size, self.in_features)

    def extra_repr(self) -> str:
        grid = f"g{self.group_size}" if self.group_size != self.in_features else "per-channel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, {grid}, sym={self.sym}, kernel={self.kernel}"
                + (", sparse" if self.weight_bitmask is not None else "")
                + (f", precision={self.precision}" if self.precision != "fast" else ""))


class SparseLinear(nn.Module):
    """A pruned linear layer: dense ``weight`` (trainable) and a boolean keep-``mask``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype,
                                               device=device))
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool,
                                                device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) \
            if bias else None

    @classmethod
    def from_compressed(cls, c: Compressed, bias: Tensor | None = None,
                        dtype: torch.dtype = torch.float32) -> SparseLinear:
        if c.values is None:
            raise ValueError("SparseLinear needs a pruned, unquantized Compressed result")
        out_features, in_features = c.shape
        m = cls(in_features, out_features, bias is not None, device="meta", dtype=dtype)
        # values are zero where pruned: a result in the target dtype (an in-memory run's,
        # folded into the original weight) becomes the weight without a copy
        m.weight = nn.Parameter(c.values.to(dtype))
        m.mask = c.keep()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().to(c.values.device, dtype))
        return m

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects {self.in_features} input features, "
                             f"got input of shape {tuple(x.shape)}")
        return torch.ops.fxcompress.masked_linear(x, self.weight, self.mask, self.bias)

    def sparsity(self) -> float:
        return 1.0 - self.mask.float().mean().item()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity():.2f}")


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Choose how ``model``'s quantized layers compute on CPU, in place; returns ``model``.

    ``"fast"`` (the default): 2/3/4-bit layers whose groups suit aten's int4 kernel run it,
    with activations and scales rounded to bf16: logits up to about 1 % (relative) from the
    dequantized float32 model's (0.8 % on SmolLM2-135M). ``"exact"``: every layer computes in
    the activations' own dtype from its canonical layout (dequantized per call, then
    ``F.linear``), as the dequantized model does — slower, for evaluation and reference runs.
    GPUs' Triton kernels and 8-bit per-channel layers compute in the activations' dtype in
    both modes.

    The setting is an attribute of each ``QuantLinear``: it moves with the module (``.to``,
    pickling) and ``torch.compile``/``torch.export`` capture it; checkpoints do not store it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.precision != precision:
            m.precision = precision
            if m.weight_packed.device.type != "meta":
                m.prepare()
    return model


_EXPERT_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
                       "gelu_pytorch_tanh": "gelu_tanh"}
EXPERT_BANKS = ("gate_up_proj", "down_proj")


def experts_unsupported(module: nn.Module) -> str:
    """Why ``module`` (a transformers experts module) cannot become a compressed experts
    module, or ``""``. Supported: the ``use_experts_implementation`` contract with a gated,
    concatenated ``gate_up_proj`` (gate rows first), ``down_proj``, no biases, no post-expert
    norm, the default gate and a SiLU/GELU/ReLU activation."""
    name = type(module).__name__
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    checks = [
        (all(isinstance(getattr(module, b, None), nn.Parameter) for b in EXPERT_BANKS),
         "it has no gate_up_proj/down_proj parameters"),
        (getattr(module, "has_gate", False), "its experts are not gated (no gate_up_proj)"),
        (getattr(module, "is_concatenated", True), "gate and up rows are interleaved"),
        (not getattr(module, "has_bias", False), "its experts have biases"),
        (not getattr(module, "has_post_expert_norm", False), "it has a post-expert norm"),
        (getattr(type(module), "_apply_gate", None) is None
         or type(module)._apply_gate.__name__ == "_default_apply_gate",
         "it has its own gate function (_apply_gate)"),
        (act in _EXPERT_ACTIVATIONS, f"its activation {act!r} is not one of "
                                     f"{sorted(_EXPERT_ACTIVATIONS)}"),
    ]
    for ok, why in checks:
        if not ok:
            return f"{name}: {why}"
    return ""


def experts_activation(module: nn.Module) -> str:
    """The activation of a supported experts module, by the name the experts ops take."""
    return _EXPERT_ACTIVATIONS[module.config.hidden_act]


def checkpoint_expert_names(module: nn.Module) -> tuple[str, str, str]:
    """(gate, up, down): how checkpoints of the model name one expert's linears."""
    return expert_names(getattr(getattr(module, "config", None), "model_type", None))


def expert_orientation(module: nn.Module, bank: str) -> tuple[int, int]:
    """(out, in) of one expert of ``bank`` in the module (which may store experts (in, out))."""
    p = getattr(module, bank)
    return (p.shape[2], p.shape[1]) if getattr(module, "is_transposed", False) \
        else (p.shape[1], p.shape[2])


class QuantExperts(nn.Module):
    """All experts of one mixture-of-experts block with 2/3/4/8-bit weights.

    Replaces a transformers experts module (``forward(hidden_states, top_k_index,
    top_k_weights)``). For each bank (``gate_up_proj``, ``down_proj``) it keeps the canonical
    compressed-tensors layout stacked over experts, ``<bank>_packed`` (E, out, words),
    ``<bank>_scale`` and ``<bank>_zero_point`` (E, out, groups), and ``<bank>_bitmask`` when the
    experts were also pruned (the codes of pruned weights are their zero point, so they
    dequantize to exactly 0). On CPU with ≤ 4 bits it repacks each expert to aten's int4 layout
    (``moe_int4pack``); otherwise it computes from the canonical layout (``moe_quant``, the
    grouped Triton kernel on CUDA)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, bits: int,
                 group_size: int, sym: bool = False, act: str = "silu", sparse: bool = False,
                 device: torch.device | str | None = None,
                 names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self.bits, self.sym, self.act = bits, sym, act
        self.names = tuple(names)  # (gate, up, down) of one expert in checkpoints
        self.group_size = group_size  # -1: per channel
        for bank, (out, inp) in self._shapes().items():
            groups = inp // self.bank_group(bank)
            self.register_buffer(f"{bank}_packed", torch.zeros(
                num_experts, out, pack.packed_width(inp, bits), dtype=torch.int32, device=device))
            self.register_buffer(f"{bank}_scale", torch.ones(
                num_experts, out, groups, dtype=torch.float16, device=device))
            self.register_buffer(f"{bank}_zero_point", torch.full(
                (num_experts, out, groups), 2 ** (bits - 1), dtype=torch.uint8, device=device))
            self.register_buffer(f"{bank}_bitmask", torch.zeros(
                num_experts, out, (inp + 7) // 8, dtype=torch.uint8, device=device)
                if sparse else None)
        self.kernel = "canonical"
        self.register_load_state_dict_post_hook(_prepare_after_load)
        self.prepare()

    def _shapes(self) -> dict[str, tuple[int, int]]:
        return {"gate_up_proj": (2 * self.intermediate, self.hidden),
                "down_proj": (self.hidden, self.intermediate)}

    def bank_group(self, bank: str) -> int:
        """The effective group size of a bank (its in_features when per channel)."""
        inp = self._shapes()[bank][1]
        return inp if self.group_size == -1 else self.group_size

    @classmethod
    def from_compressed(cls, module: nn.Module, results: dict[str, list[Compressed]]
                        ) -> QuantExperts:
        """From the per-expert results of each bank of ``module`` (a transformers experts
        module), experts in order."""
        first = results["gate_up_proj"][0]
        if any(not c.static_groups for cs in results.values() for c in cs):
            raise ValueError(f"{type(module).__name__}: experts need static quantization "
                             f"groups (GPTQ(act_order=True) needs static_groups=True)")
        out, hidden = expert_orientation(module, "gate_up_proj")
        down = results["down_proj"][0]
        per_channel = first.group_size == hidden and down.group_size == out // 2
        if not per_channel and first.group_size != down.group_size:
            raise ValueError(f"{type(module).__name__}: gate_up_proj and down_proj were "
                             f"quantized with groups of {first.group_size} and "
                             f"{down.group_size}: one experts module holds one grid")
        group = -1 if per_channel else first.group_size
        m = cls(len(results["gate_up_proj"]), hidden, out // 2, first.bits, group, first.sym,
                experts_activation(module), first.mask is not None,
                device="meta", names=checkpoint_expert_names(module))
        for bank, cs in results.items():
            setattr(m, f"{bank}_packed", pack.pack(torch.stack([c.codes for c in cs]), m.bits))
            setattr(m, f"{bank}_scale", torch.stack([c.scale for c in cs]).to(torch.float16))
            setattr(m, f"{bank}_zero_point", torch.stack([c.zero for c in cs]).to(torch.uint8))
            if first.mask is not None:
                mask = torch.stack([c.mask for c in cs])
                setattr(m, f"{bank}_bitmask", pack.pack_bitmask(
                    mask.reshape(-1, mask.shape[-1])).reshape(*mask.shape[:2], -1))
        m.prepare()
        return m

    def dequantize(self, bank: str) -> Tensor:
        """The dense float32 (E, out, in) weights of a bank."""
        inp = self._shapes()[bank][1]
        packed, scale, zero = (getattr(self, f"{bank}_{t}") for t in ("packed", "scale",
                                                                       "zero_point"))
        return torch.stack([ops.dequantize(packed[e], scale[e], zero[e], None, self.bits,
                                           self.bank_group(bank), inp)
                            for e in range(self.num_experts)])

    def prepare(self) -> None:
        """(Re)build the CPU int4 layout when the buffers are on CPU and the grid allows it."""
        self.register_buffer("_w1", None, persistent=False)
        self.register_buffer("_sz1", None, persistent=False)
        self.register_buffer("_w2", None, persistent=False)
        self.register_buffer("_sz2", None, persistent=False)
        self.kernel, self.kernel_groups = "canonical", (0, 0)
        if self.gate_up_proj_packed.device.type != "cpu" or self.bits > 4:
            return
        groups = [next((g for g in CPU_INT4_GROUPS if self.bank_group(b) % g == 0), None)
                  for b in EXPERT_BANKS]
        if None in groups or any(out % 16 for out, _ in self._shapes().values()):
            return
        for i, bank in enumerate(EXPERT_BANKS, 1):
            inp = self._shapes()[bank][1]
            natural = torch.arange(inp, device=self.gate_up_proj_packed.device) \
                // self.bank_group(bank)
            w, sz = zip(*(int4pack(self._expert_codes(bank, e),
                                   getattr(self, f"{bank}_scale")[e],
                                   getattr(self, f"{bank}_zero_point")[e], natural, self.bits,
                                   groups[i - 1])
                          for e in range(self.num_experts)), strict=True)
            setattr(self, f"_w{i}", torch.stack(w))
            setattr(self, f"_sz{i}", torch.stack(sz))
        self.kernel, self.kernel_groups = "int4pack", tuple(groups)

    def _expert_codes(self, bank: str, e: int) -> Tensor:
        return pack.unpack(getattr(self, f"{bank}_packed")[e], self.bits,
                           self._shapes()[bank][1])

    def _apply(self, fn, recurse: bool = True):
        scales = {b: getattr(self, f"{b}_scale") for b in EXPERT_BANKS}
        super()._apply(fn, recurse)
        for b, scale in scales.items():  # keep the stored grid exact under .to(dtype)
            if getattr(self, f"{b}_scale").dtype != scale.dtype:
                setattr(self, f"{b}_scale", scale.to(getattr(self, f"{b}_scale").device))
        if self.gate_up_proj_packed.device.type != "meta":
            self.prepare()
        return self

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                ) -> Tensor:
        if self.kernel == "int4pack" and hidden_states.device.type == "cpu":
            return torch.ops.fxcompress.moe_int4pack(
                hidden_states, top_k_index, top_k_weights, self._w1, self._sz1, self._w2,
                self._sz2, *self.kernel_groups, self.act)
        return torch.ops.fxcompress.moe_quant(
            hidden_states, top_k_index, top_k_weights, self.gate_up_proj_packed,
            self.gate_up_proj_scale, self.gate_up_proj_zero_point, self.down_proj_packed,
            self.down_proj_scale, self.down_proj_zero_point, self.bits,
            self.bank_group("gate_up_proj"), self.bank_group("down_proj"), self.act)

    def extra_repr(self) -> str:
        grid = f"g{self.group_size}" if self.group_size != -1 else "per-channel"
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, bits={self.bits}, {grid}, "
                f"act={self.act}, kernel={self.kernel}"
                + (", sparse" if self.gate_up_proj_bitmask is not None else ""))


def int4pack(codes: Tensor, scale: Tensor, zero: Tensor, groups: Tensor, bits: int,
             kernel_group: int) -> tuple[Tensor, Tensor]:
    """An (N, K) weight in aten's CPU int4 layout, with ``groups`` the group of each column.

    aten's kernel computes ``(c - 8) * scale + bias``. 2- and 3-bit codes are shifted by
    ``8 - zero`` (still < 16) so that the bias term is exactly 0; 4-bit codes keep
    ``bias = (8 - zero) * scale``, rounded to bf16 like the scale."""
    scale, zero = scale.float(), zero.float()
    if bits <= 3:
        codes = codes.to(torch.int32) + (8 - zero[:, groups]).to(torch.int32)
        zero = torch.full_like(zero, 8)
    g = groups[::kernel_group]  # group of each kernel group
    sz = torch.stack([scale[:, g], (8 - zero[:, g]) * scale[:, g]], -1)  # (N, G', 2)
    return (torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1),
            sz.transpose(0, 1).contiguous().to(torch.bfloat16))


class SparseExperts(nn.Module):
    """All experts of one mixture-of-experts block, pruned (not quantized): dense
    ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) whose pruned weights are exactly 0,
    with the keep-masks ``<bank>_mask`` recording the pattern. The weights are frozen
    (``requires_grad=False``): training through experts is not supported yet."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu",
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32,
                 names: tuple[str, str, str] = DEFAULT_EXPERT_NAMES) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.intermediate, self.act = \
            num_experts, hidden, intermediate, act
        self.names = tuple(names)  # (gate, up, down) of one expert in checkpoints
        shapes = {"gate_up_proj": (2 * intermediate, hidden), "down_proj": (hidden, intermediate)}
        for bank, shape in shapes.items():
            setattr(self, bank, nn.Parameter(torch.zeros(num_experts, *shape, dtype=dtype,
                                                         device=device), requires_grad=False))
            self.register_buffer(f"{bank}_mask", torch.ones(num_experts, *shape,
                                                            dtype=torch.bool, device=device))

    @classmethod
    def from_compressed(cls, module: nn.Module, results: dict[str, list[Compressed]],
                        dtype: torch.dtype | None = None) -> SparseExperts:
        out, hidden = expert_orientation(module, "gate_up_proj")
        dtype = dtype or module.gate_up_proj.dtype
        m = cls(len(results["gate_up_proj"]), hidden, out // 2,
                experts_activation(module), device="meta", dtype=dtype,
                names=checkpoint_expert_names(module))
        for bank, cs in results.items():
            mask = torch.stack([c.mask for c in cs])
            setattr(m, bank, nn.Parameter(torch.stack([c.values for c in cs]).to(dtype) * mask,
                                          requires_grad=False))
            setattr(m, f"{bank}_mask", mask)
        return m

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
                ) -> Tensor:
        return torch.ops.fxcompress.moe_pruned(hidden_states, top_k_index, top_k_weights,
                                               self.gate_up_proj, self.down_proj, self.act)

    def extra_repr(self) -> str:
        kept = torch.cat([self.gate_up_proj_mask.flatten(), self.down_proj_mask.flatten()])
        return (f"num_experts={self.num_experts}, hidden={self.hidden}, "
                f"intermediate={self.intermediate}, act={self.act}, "
                f"sparsity={1 - kept.float().mean().item():.2f}")


def compressed_experts(module: nn.Module, results: dict[str, list[Compressed]],
                       dtype: torch.dtype | None = None) -> nn.Module:
    """The module that computes ``module``'s experts with their compressed weights (pruned
    weights kept in ``dtype``, by default ``module``'s)."""
    if results["gate_up_proj"][0].quantized:
        return QuantExperts.from_compressed(module, results)
    return SparseExperts.from_compressed(module, results, dtype)


def compressed_module(c: Compressed, bias: Tensor | None, dtype: torch.dtype,
                      prepare: bool = True) -> nn.Module:
    """The module that computes with ``c`` (``prepare``: see :meth:`QuantLinear.
    from_compressed`)."""
    if c.blocks is not None:
        from .gguf.linear import GGMLLinear

        return GGMLLinear.from_compressed(c, bias, dtype, prepare)
    if c.quantized:
        return QuantLinear.from_compressed(c, bias, dtype, prepare)
    return SparseLinear.from_compressed(c, bias, dtype)



def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the dotted ``name``, replacing what was there: how
    compressed, decompressed and LoRA modules are swapped in by name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

"""Compressed replacements for a transformers experts module (all experts of one
mixture-of-experts block, in the ``use_experts_implementation`` contract): ``QuantExperts``
keeps the canonical per-expert codes and derives aten's CPU int4 layout per expert where the
groups suit it; ``SparseExperts`` keeps dense, frozen banks whose pruned weights are zeros.
The helpers say which experts modules are supported and how checkpoints name and orient
their experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..algorithms import Compressed
from ..hub import DEFAULT_EXPERT_NAMES, expert_names
from ..kernels import ops, pack
from .linear import CPU_INT4_GROUPS, _prepare_after_load, int4pack

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

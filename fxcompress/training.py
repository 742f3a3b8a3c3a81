"""Training with compressed models, in an ordinary PyTorch loop: no trainer, no callbacks.

Three uses, and what each needs from fxcompress:

- **Sparse fine-tuning** (recover accuracy after one-shot pruning). ``SparseLinear`` already
  trains: its op computes with ``weight ⊙ mask`` and its backward masks the weight gradient, so
  a pruned weight gets an exactly-zero gradient. For SGD (momentum, Nesterov, weight decay),
  Adam, AdamW, Adagrad, RMSprop, Lion-style sign updates … a weight that is zero, with a zero
  gradient and zero optimizer state, gets an exactly-zero update: the pattern survives every
  step with no help, and the mask is stored once (a bool buffer; the optimizer only ever sees
  the dense ``weight`` it must hold anyway). That is not true of every update rule: noise
  injection (SGLD), decay towards a non-zero anchor (L2-SP), optimizer state carried over from
  before pruning, or user code writing into ``weight``. The forward stays correct in those cases
  (the op masks), but the stored weights — what ``state_dict`` saves — would drift. So
  :func:`enforce_masks` re-zeroes in place, and :func:`keep_masks` registers it as an optimizer
  step post-hook: cheap (one ``masked_fill_`` per layer) insurance, opt-in because the common
  optimizers do not need it.

- **Adapters on a quantized base** (QLoRA-style). Every ``QuantLinear`` op has a backward
  with respect to its input that dequantizes the weight transiently, so gradients flow
  through frozen integer weights. :func:`add_lora` wraps chosen linears in
  :class:`LoRALinear` (frozen base + trainable low-rank ``B @ A``). We do not use PEFT: it
  installs against our torch, but its LoRA dispatches on layer types (``nn.Linear``, ``Conv1D``
  …) and rejects ``QuantLinear``; supporting it means a custom PEFT layer class registered
  through an API PEFT itself marks experimental, which is more code and a dependency for what
  is ~40 lines here. Our wrapper works for any linear-like module (``QuantLinear``,
  ``SparseLinear``, ``nn.Linear``, ``Conv1D``) and stays traceable by ``torch.compile``.

- **Gradual pruning**. ``fxcompress.compile`` compresses ``nn.Linear`` layers, and can be
  called at any step of a loop on the live model with batches from the training stream. To
  prune further, :func:`densify` first turns each ``SparseLinear`` back into an ``nn.Linear``
  holding the pruned weight (zeros included, same parameter object), so that the next
  ``compile`` sees ordinary linears and SparseGPT picks a new, sparser mask with the earlier
  zeros as its starting point. ``compile`` installs new modules, hence new parameters: build
  the optimizer (again) after it. (Letting ``compile`` take ``SparseLinear`` sites directly
  would need the calibration interpreter to swap the op's mask as well as its weight, or
  weights SparseGPT revives would stay masked while later layers calibrate.)

All of it traces with ``torch.compile(..., fullgraph=True)``: the ops carry their autograd
formulas, and the wrappers are plain tensor code.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .checkpoint.codecs import SPARSE, codec_for
from .modules import SparseLinear, set_module

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- masks


def sparse_modules(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    """Every ``SparseLinear`` in ``model`` (the ``sparse`` kind), with its name."""
    for name, module in model.named_modules():
        if codec_for(module) is SPARSE:
            yield name, module


@torch.no_grad()
def enforce_masks(model: nn.Module) -> int:
    """Set every pruned weight of every ``SparseLinear`` in ``model`` to exactly zero, in place.

    Returns the number of layers visited. Only needed after updates that can move a weight
    whose gradient is zero (see the module docstring); the forward pass masks regardless.
    """
    count = 0
    for _, module in sparse_modules(model):
        module.weight.masked_fill_(module.mask.logical_not(), 0)
        count += 1
    return count


def keep_masks(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Re-zero ``model``'s pruned weights after every ``optimizer.step()``.

    Returns the hook handle (``handle.remove()`` stops it).
    """
    return optimizer.register_step_post_hook(lambda *_: enforce_masks(model))


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Turn every ``SparseLinear`` of ``model`` into an ``nn.Linear``, in place, and return
    ``model``.

    The linear keeps the very same ``weight`` (and ``bias``) parameters, with pruned entries
    zeroed, so nothing is copied and an existing optimizer keeps training them. Use it before
    calling ``fxcompress.compile`` again to prune further.
    """
    for name, module in list(sparse_modules(model)):
        module.weight.masked_fill_(module.mask.logical_not(), 0)
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = module.weight
        linear.bias = module.bias
        linear.train(module.training)
        set_module(model, name, linear)
    return model


# ----------------------------------------------------------------------------- LoRA


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear-like module (a compressed one: of a kind
    adapters train on), None for anything else."""
    if isinstance(module, nn.Linear) or _compressed_base(module):
        return module.in_features, module.out_features
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[0], module.weight.shape[1]  # stored (in, out)
    return None


def _compressed_base(module: nn.Module) -> bool:
    """Whether ``module`` is a compressed layer of a kind adapters train on (its codec says:
    ``QuantLinear`` and ``SparseLinear``)."""
    codec = codec_for(module)
    return codec is not None and codec.lora_base


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype of a linear-like module (a compressed one's: as its codec says,
    a QuantLinear's float16 scales saying nothing about it)."""
    codec = codec_for(module)
    if codec is not None:
        return codec.placement(module)
    return module.weight.device, module.weight.dtype


class LoRALinear(nn.Module):
    """``base(x) + scaling · B(A(dropout(x)))`` with ``base`` frozen and ``A``, ``B`` trainable.

    ``A`` (rank, in) starts like an ``nn.Linear`` weight and ``B`` (out, rank) at zero, so the
    wrapped layer computes exactly what ``base`` did until training moves ``B``. Nothing is
    merged into ``base``: a quantized base stays quantized.
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        features = _features(base)
        if features is None:
            raise TypeError(f"LoRALinear wraps a linear layer, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank}")
        self.in_features, self.out_features = features
        self.rank = rank
        self.scaling = (rank if alpha is None else alpha) / rank
        self.base = base
        self.base.requires_grad_(False)
        device, dtype = _placement(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device,
                                               dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device,
                                               dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        delta = (h @ self.lora_A.t()) @ self.lora_B.t()
        return y + (self.scaling * delta).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def _target_patterns(targets: str | Sequence[str] | None) -> list[str] | None:
    if targets is None:
        return None
    patterns = [targets] if isinstance(targets, str) else list(targets)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"invalid target pattern {p!r}: {e}") from e
    return patterns


def _is_target(name: str, module: nn.Module, patterns: list[str] | None) -> bool:
    if _features(module) is None:
        return False
    if patterns is None:
        return _compressed_base(module)
    return any(re.fullmatch(p, name) for p in patterns)


def add_lora(model: nn.Module, rank: int = 8, targets: str | Sequence[str] | None = None,
             *, alpha: float | None = None, dropout: float = 0.0,
             freeze_base: bool = True) -> nn.Module:
    """Wrap linear layers of ``model`` in :class:`LoRALinear` adapters, in place; return it.

    ``targets`` are regular expressions matched against whole module names (as in a
    :class:`~fxcompress.Recipe`); by default every compressed linear (``QuantLinear``,
    ``SparseLinear``) gets an adapter. ``scaling = alpha / rank`` (``alpha`` defaults to
    ``rank``). With ``freeze_base`` every parameter but the adapters' stops requiring
    gradients, so ``[p for p in model.parameters() if p.requires_grad]`` is what to optimize.
    """
    patterns = _target_patterns(targets)
    wrapped = [f"{n}." for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    chosen = [(name, m) for name, m in model.named_modules()
              if name and _is_target(name, m, patterns)
              and not any(name.startswith(w) for w in wrapped)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if _features(m) is not None]
        shown = ", ".join(linears[:12]) + (" ..." if len(linears) > 12 else "")
        raise ValueError(f"add_lora: no linear layer matches targets {patterns!r} "
                         f"(default: compressed linears); the linear layers are: {shown}")
    if freeze_base:
        model.requires_grad_(False)
    for name, module in chosen:
        set_module(model, name, LoRALinear(module, rank, alpha, dropout))
    log.debug("add_lora: %d adapters of rank %d", len(chosen), rank)
    return model

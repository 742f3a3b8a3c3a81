"""Layer codecs: how each kind of layer is stored in a checkpoint, in both directions.

A checkpoint stores a compressed layer as a few tensors under its module name (e.g.
``model.layers.0.mlp.down_proj.weight_packed``) and describes it by one entry of
``config.json["quantization_config"]["fxcompress"]["layers"]`` whose ``"kind"`` names its
codec. A :class:`~.base.Codec` is the one place that knows a kind's layout:

* ``describe(m)`` → the entry and ``encode(m, entry)`` → the tensors: what ``fxcompress.save``
  and the streamed ``compress_checkpoint`` write (both through
  :class:`~fxcompress.checkpoint.writer.CheckpointWriter`);
* ``entry_problem(entry)``, ``original_problem(module, entry)`` (the module it replaces in the
  model built from ``config.json``) and ``expected(entry)`` (shape and dtype of every tensor):
  what ``fxcompress.load`` checks against the safetensors headers before reading any data;
* ``decode(entry, tensors)`` → the module, validating what the headers cannot show;
* ``to_compressed(m, loss, part)`` → the :class:`~fxcompress.algorithms.Compressed` result the
  module (or its site ``part``, for experts) was made from (what a resumed streamed run
  replays);
* ``config_group(name, entry)`` → its compressed-tensors ``QuantizationArgs`` and ``targets``,
  for the kinds compressed-tensors readers understand.

Tensors outside compressed layers (embeddings, norms, dense linears, buffers) are stored as
they are under their ``state_dict`` names: :func:`~fxcompress.checkpoint.model.dense_tensors`
chooses them and :func:`~fxcompress.checkpoint.model.set_tensor` assigns them back.

The codec is also the one place that knows a kind's module for the code that treats every
kind alike: the CLI's bits per weight and sparsity, ``add_lora``'s default targets,
``decompress`` and the GGUF writer ask ``codec_for(m)`` (see the last methods of
:class:`~.base.Codec`) instead of testing module classes.

Pruned kinds have two **layouts** (:data:`~.base.SPARSE_LAYOUTS`), chosen when a checkpoint is
written and recorded in the entry's ``"layout"`` (absent: ``"bitmask"``, the only layout of
earlier checkpoints):

* ``"dense"`` (the default): what serving engines read. A pruned linear is an ordinary
  ``weight`` holding its zeros; a pruned and quantized one is compressed-tensors'
  ``pack-quantized`` with every pruned weight at its group's zero-point code, so it
  dequantizes to exactly 0. The keep-mask is the non-zero pattern (:func:`~.linear.implied_mask`);
* ``"bitmask"``: fxcompress's compact layout, a keep-mask and the kept values only (smaller
  on disk; read by ``fxcompress.load`` alone).

A new layer kind (the experts of a mixture-of-experts block, say) is one :class:`~.base.Codec`
subclass in a module of its own, passed to :func:`~.base.register` and imported below; the
writer, the loader, the streamed path and the callers above need no change. The registry is
:mod:`.base`, the linear kinds :mod:`.linear` and :mod:`.ggml`, the experts :mod:`.experts`.
"""

from .base import (
    DEFAULT_SPARSE_LAYOUT,
    SPARSE_LAYOUTS,
    CheckpointError,
    Codec,
    Entry,
    Shapes,
    codec_for,
    codec_of,
    register,
)
from .experts import EXPERTS
from .ggml import GGML
from .linear import LINEAR_CODECS, QUANTIZED, SPARSE, SPARSE_QUANTIZED, implied_mask, is_two_four

__all__ = ["DEFAULT_SPARSE_LAYOUT", "EXPERTS", "GGML", "LINEAR_CODECS", "QUANTIZED", "SPARSE",
           "SPARSE_LAYOUTS", "SPARSE_QUANTIZED", "CheckpointError", "Codec", "Entry", "Shapes",
           "codec_for", "codec_of", "implied_mask", "is_two_four", "register"]

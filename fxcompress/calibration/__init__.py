"""calibration: run the captured graph over the calibration data and compress each site in
turn.

The graph is interpreted *node by node over all calibration chunks*, not sample by sample
through the whole model: when the interpreter reaches the first linear that reads some
activation X, every chunk's X is available, so the layer Hessian ``H = 2XᵀX/n`` is complete;
all linears reading X (q/k/v, gate/up) are compressed with that one H, and the interpreter
continues with their compressed weights. Every later layer therefore sees the errors of the
layers before it (true-sequential, at the granularity of single linears), and each node runs
exactly once per chunk: one forward pass in all, where layer-wise calibrate-then-propagate
schemes run two per layer.

What a method asks for is its own declaration (``Method.needs``); the statistics it names are
registered in :mod:`.statistics`. One of them, the cross moment of dense-output calibration,
reads the dense model's inputs too: a second, *dense* path then runs the same segments with
the original weights next to the compressed one, so that at each barrier both the compressed
model's inputs X̃ and the dense model's inputs X are complete (``Needs.dense`` is the one
flag the run, the liveness plan and the estimate ask).

Between two such barriers the nodes run chunk-major (chunk by chunk through the whole
segment), so only values that cross a barrier are held for all chunks at once; everything is
freed after its last use, and only the nodes that lead to some site's input run at all.

The same loop scales past one process's memory and one process. Three small seams
(:mod:`.seams`) make that possible without changing the in-memory path:

* **where parameters come from** — by default the captured program's own tensors; when the
  program was captured on the meta device, a :class:`WeightSource` loads each parameter just
  before the first segment that reads it and the loop drops it after its last use
  (``fxcompress.streaming`` reads them from safetensors files);
* **where the frontier lives** — values that cross a barrier are kept per chunk as they are,
  on CPU (``offload="cpu"``: moved to the compute device op by op as nodes read them) or on
  disk (``offload="disk"``): :mod:`.frontier`;
* **who reduces the statistics and who solves** — a :class:`Team`: :class:`Local` here, or
  ``fxcompress.distributed.Distributed``, whose ranks run disjoint chunks, sum their partial
  Hessians, split the solves by cost and share the results, so that every rank continues
  with the same compressed weights.

Results can be handed to a ``sink`` as they are made instead of being returned (a streamed
checkpoint writer), and sites already compressed by an interrupted run can be given as
``done``: the loop replays their forward with the stored weights and solves nothing for
them, or continues from a frontier snapshot (:mod:`.snapshots`).

The rooms, each depending only on those above it: :mod:`.seams`; :mod:`.precision`;
:mod:`.schedule` (which nodes run, where the barriers are); :mod:`.frontier` (values and
parameters); :mod:`.interpreter`; :mod:`.liveness` (what each segment computes, keeps and
frees); :mod:`.snapshots`; :mod:`.statistics`; :mod:`.run` (the state of a run and its
steps); :mod:`.entry` (:func:`calibrate`); :mod:`.estimate` (the memory estimate). OS memory
(trimming the heap, paging out, the resident set) is ``fxcompress.osmem``.
"""

from .entry import calibrate
from .estimate import (
    MemoryBudgetError,
    SegmentMemory,
    check_memory,
    estimate_memory,
    over_budget,
)
from .liveness import EAGER, PRICE
from .precision import resolve_precision
from .run import folds, held_bytes
from .seams import LayerReport, Local, Step, Team, WeightSource
from .snapshots import Snapshots

__all__ = ["EAGER", "PRICE", "LayerReport", "Local", "MemoryBudgetError", "SegmentMemory",
           "Snapshots", "Step", "Team", "WeightSource", "calibrate", "check_memory",
           "estimate_memory", "folds", "held_bytes", "over_budget", "resolve_precision"]

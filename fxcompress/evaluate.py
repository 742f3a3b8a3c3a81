"""Calibration samples and perplexity: the two numbers every one-shot compression paper needs.

GPTQ and SparseGPT calibrate on random fixed-length windows of real text and report perplexity
on held-out text split into non-overlapping windows. Both are implemented here the standard way
(as in the IST reference code), deterministically, so that a compressed model and its dense
original can be compared on exactly the same tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .passes.capture import evaluating

TextOrIds = str | torch.Tensor


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a model on ``windows`` windows of ``seqlen`` tokens.

    ``nll`` is the mean negative log-likelihood (nats) over the ``tokens`` predicted tokens,
    ``windows * (seqlen - 1)``; ``ppl = exp(nll)``.
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


def tokenize(tokenizer: Any, text: TextOrIds) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor, without special tokens.

    ``text`` may already be a 1-D tensor of ids, in which case ``tokenizer`` may be None.
    """
    if isinstance(text, torch.Tensor):
        if text.dim() != 1 or text.dtype.is_floating_point or text.dtype.is_complex:
            raise ValueError(f"token ids must be a 1-D integer tensor, got {text.dtype} "
                             f"of shape {tuple(text.shape)}")
        return text.to(torch.int64)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to evaluate text; pass token ids otherwise")
    ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.as_tensor(ids, dtype=torch.int64).flatten()


def calibration_samples(
    tokenizer: Any, text: TextOrIds, n: int = 128, seqlen: int = 512, seed: int = 0
) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens from ``text``, shape (n, seqlen), int64.

    The text is tokenized once; window starts are drawn by a ``torch.Generator`` seeded with
    ``seed``, so the same arguments always give the same tensor.
    """
    ids = tokenize(tokenizer, text)
    if ids.numel() < seqlen + 1:
        raise ValueError(f"calibration text has {ids.numel()} tokens; "
                         f"need at least seqlen + 1 = {seqlen + 1}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=generator)
    samples = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    return samples if isinstance(text, torch.Tensor) else with_bos(tokenizer, samples)


def evaluation_windows(
    tokenizer: Any, text: TextOrIds, seqlen: int = 512, windows: int | None = 32
) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens, shape (windows, seqlen).

    ``windows=None`` takes every full window.
    """
    ids = tokenize(tokenizer, text)
    available = ids.numel() // seqlen
    windows = available if windows is None else windows
    if windows < 1 or windows > available:
        raise ValueError(f"asked for {windows} windows of {seqlen} tokens but the text has "
                         f"{ids.numel()} tokens, i.e. {available} windows")
    chunks = ids[: windows * seqlen].view(windows, seqlen)
    return chunks if isinstance(text, torch.Tensor) else with_bos(tokenizer, chunks)


def with_bos(tokenizer: Any, windows: torch.Tensor) -> torch.Tensor:
    """``windows`` of a text with the beginning-of-sequence token first, where the tokenizer
    puts one before every text it encodes (Gemma's does; SmolLM2's does not, and its windows
    are returned as they are). A model trained that way scores far worse on a window without
    it, and is calibrated on inputs it never saw: both would bury the compression's effect.
    The window keeps its length, so it gives up its last token. Ids given as a tensor are the
    caller's to prepare and are never changed."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return windows
    encoded = tokenizer("a")["input_ids"]
    if not encoded or encoded[0] != bos:
        return windows
    return torch.cat([torch.full_like(windows[:, :1], bos), windows[:, :-1]], dim=1)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    text: TextOrIds,
    seqlen: int = 512,
    windows: int | None = 32,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on the first ``windows`` non-overlapping ``seqlen`` windows.

    Every window predicts its tokens 1..seqlen-1 from the ones before (``logits[:, :-1]`` vs
    ``ids[:, 1:]``); the result is exp of the mean NLL over all of them. The loss is computed in
    fp32 one row at a time, so memory stays at one batch of logits. ``model`` may return a
    Hugging Face output (``.logits``) or a plain logits tensor.
    """
    batches = evaluation_windows(tokenizer, text, seqlen, windows)
    device = _device_of(model)
    total = 0.0
    with evaluating(model):
        for chunk in tqdm(batches.split(batch_size), desc="perplexity", disable=not progress):
            chunk = chunk.to(device)
            total += _nll_sum(_logits(model, chunk), chunk)
    count = batches.shape[0] * (seqlen - 1)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, batches.shape[0], seqlen)


def format_settings(result: PerplexityResult) -> str:
    """One line stating how a perplexity was measured, for tables and logs."""
    return (f"seqlen={result.seqlen} windows={result.windows} "
            f"predicted tokens={result.tokens} (non-overlapping windows, no special tokens)")


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of a batch, in fp32, one row at a time."""
    total = 0.0
    for row_logits, row_ids in zip(logits, ids, strict=True):
        loss = F.cross_entropy(row_logits[:-1].float(), row_ids[1:], reduction="sum")
        total += loss.item()
    return total


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Call ``model`` on ids, with ``use_cache=False`` where it accepts it; return the logits."""
    kwargs = {"use_cache": False} if _accepts_use_cache(model) else {}
    out = model(ids, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _accepts_use_cache(model: torch.nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is p.VAR_KEYWORD for p in params)


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")

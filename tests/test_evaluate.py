"""Tests of calibration sampling and perplexity on a tiny random Llama (no network, fast)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fxcompress.evaluate import (
    PerplexityResult,
    calibration_samples,
    evaluation_windows,
    format_settings,
    perplexity,
    tokenize,
)

VOCAB = 256
TEXT = "Four score and seven years ago our fathers brought forth on this continent. " * 20


class CharTokenizer:
    """Byte-level stand-in for a Hugging Face tokenizer: one id per UTF-8 byte."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append(add_special_tokens)
        ids = list(text.encode("utf-8"))
        return [1, *ids] if add_special_tokens else ids


class UniformModel(torch.nn.Module):
    """Predicts every token with equal probability: all logits zero."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, VOCAB)


@pytest.fixture(scope="module")
def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def test_tokenize_adds_no_special_tokens():
    tok = CharTokenizer()
    ids = tokenize(tok, "ab")
    assert tok.calls == [False]
    assert ids.tolist() == [97, 98] and ids.dtype == torch.int64


def test_tokenize_accepts_ids_without_tokenizer():
    ids = torch.arange(10, dtype=torch.int32)
    assert tokenize(None, ids).dtype == torch.int64
    with pytest.raises(ValueError, match="1-D integer"):
        tokenize(None, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize(None, "text")


def test_calibration_samples_shape_and_determinism():
    tok = CharTokenizer()
    a = calibration_samples(tok, TEXT, n=8, seqlen=32, seed=0)
    b = calibration_samples(tok, TEXT, n=8, seqlen=32, seed=0)
    c = calibration_samples(tok, TEXT, n=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.int64
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_samples_are_windows_of_the_text():
    ids = torch.arange(1000)
    samples = calibration_samples(None, ids, n=16, seqlen=50, seed=3)
    starts = samples[:, 0]
    assert torch.equal(samples, starts[:, None] + torch.arange(50))
    assert int(starts.max()) + 50 <= 1000


def test_calibration_samples_short_text():
    with pytest.raises(ValueError, match="seqlen \\+ 1 = 65"):
        calibration_samples(CharTokenizer(), "x" * 64, n=1, seqlen=64)
    calibration_samples(CharTokenizer(), "x" * 65, n=1, seqlen=64)


def test_evaluation_windows_error_says_how_many():
    with pytest.raises(ValueError, match="i.e. 3 windows"):
        evaluation_windows(None, torch.arange(100), seqlen=30, windows=4)
    assert evaluation_windows(None, torch.arange(100), seqlen=30, windows=None).shape == (3, 30)


def test_perplexity_matches_reference(tiny_llama):
    tok = CharTokenizer()
    seqlen, windows = 48, 5
    result = perplexity(tiny_llama, tok, TEXT, seqlen=seqlen, windows=windows, batch_size=2,
                        progress=False)

    ids = torch.tensor(list(TEXT.encode()))[: seqlen * windows].view(windows, seqlen)
    with torch.no_grad():
        logits = tiny_llama(ids).logits
    ref_nll = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()

    assert result.tokens == windows * (seqlen - 1)
    assert (result.windows, result.seqlen) == (windows, seqlen)
    assert abs(result.nll - ref_nll) / ref_nll < 1e-5
    assert abs(result.ppl - math.exp(ref_nll)) / math.exp(ref_nll) < 1e-5


def test_perplexity_is_deterministic_and_independent_of_batch_size(tiny_llama):
    ids = torch.tensor(list(TEXT.encode()))
    a = perplexity(tiny_llama, None, ids, seqlen=32, windows=6, batch_size=4, progress=False)
    b = perplexity(tiny_llama, None, ids, seqlen=32, windows=6, batch_size=4, progress=False)
    c = perplexity(tiny_llama, None, ids, seqlen=32, windows=6, batch_size=1, progress=False)
    assert a == b
    assert abs(a.ppl - c.ppl) / a.ppl < 1e-5


def test_perplexity_restores_training_mode(tiny_llama):
    tiny_llama.train()
    try:
        perplexity(tiny_llama, None, torch.arange(64) % VOCAB, seqlen=32, windows=2,
                   progress=False)
        assert tiny_llama.training
    finally:
        tiny_llama.eval()


def test_uniform_model_has_perplexity_vocab_size():
    ids = torch.randint(0, VOCAB, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(UniformModel(), None, ids, seqlen=100, windows=10, progress=False)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-6)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_format_settings():
    line = format_settings(PerplexityResult(ppl=10.0, nll=2.3, tokens=16352, windows=32,
                                            seqlen=512))
    assert "seqlen=512" in line and "windows=32" in line and "16352" in line


class BosTokenizer(CharTokenizer):
    """A tokenizer that puts a BOS (id 1) before every text, as Gemma's does."""

    bos_token_id = 1

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


class NoBosTokenizer(BosTokenizer):
    """Has a BOS token but does not put it first, as SmolLM2's."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


def test_windows_start_with_bos_where_the_tokenizer_puts_one():
    plain = evaluation_windows(CharTokenizer(), TEXT, 64, 4)
    with_bos = evaluation_windows(BosTokenizer(), TEXT, 64, 4)
    assert with_bos.shape == plain.shape
    assert (with_bos[:, 0] == 1).all() and torch.equal(with_bos[:, 1:], plain[:, :-1])
    samples = calibration_samples(BosTokenizer(), TEXT, 5, 32, seed=3)
    reference = calibration_samples(CharTokenizer(), TEXT, 5, 32, seed=3)
    assert (samples[:, 0] == 1).all() and torch.equal(samples[:, 1:], reference[:, :-1])
    # a tokenizer that does not put its BOS first, and ids given directly, are left alone
    assert torch.equal(evaluation_windows(NoBosTokenizer(), TEXT, 64, 4), plain)
    ids = tokenize(CharTokenizer(), TEXT)
    assert torch.equal(evaluation_windows(BosTokenizer(), ids, 64, 4), plain)

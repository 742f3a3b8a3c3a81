"""Bad input gets a clear error (or warning) naming the problem."""

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import GPTQ, CaptureError, Recipe, RecipeError

from ..models import VOCAB, build


class Uncapturable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_uncapturable_model_names_the_module():
    with pytest.raises(CaptureError, match="'inner'"):
        fxcompress.compile(Uncapturable(), [torch.randn(4, 8)], GPTQ(4, -1), progress=False)


def test_pattern_matching_nothing_warns_with_the_linears():
    model = build("llama", layers=1)
    recipe = Recipe({r"decoder\..*": GPTQ(4, 128), r".*": None})
    with pytest.warns(UserWarning, match=r"matches no module.*self_attn\.q_proj"):
        fxcompress.compile(model, torch.randint(0, VOCAB, (4, 16)), recipe, progress=False)


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="calibration data is empty"):
        fxcompress.compile(build("llama", layers=1), [], GPTQ(4, 128), progress=False)


def test_inputs_of_the_wrong_shape_name_the_input():
    model = build("llama", layers=1)
    data = [torch.randint(0, VOCAB, (1, 16)), torch.randint(0, VOCAB, (1, 16, 2))]
    with pytest.raises(ValueError, match="input_ids"):
        fxcompress.compile(model, data, GPTQ(4, 128), progress=False)


def test_targeting_a_module_that_cannot_be_compressed():
    model = build("llama", layers=1)
    with pytest.raises(RecipeError, match="embed_tokens.*Embedding"):
        fxcompress.compile(model, torch.randint(0, VOCAB, (4, 16)),
                           Recipe({r"model\.embed_tokens": GPTQ(4, 128)}), progress=False)


class BorrowsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return nn.functional.linear(x, self.w)


def test_linear_call_without_an_nn_linear_is_refused_when_targeted():
    model = nn.Sequential(BorrowsWeight(), nn.Linear(8, 8))
    with pytest.raises(RecipeError, match="'0'.*BorrowsWeight"):
        fxcompress.compile(model, [torch.randn(16, 8)], Recipe({"0": GPTQ(8, -1)}),
                           progress=False)


def test_bad_recipes():
    with pytest.raises(RecipeError, match="bits must be one of"):
        GPTQ(bits=5)
    with pytest.raises(RecipeError, match="invalid pattern"):
        Recipe({"(": GPTQ()})
    with pytest.raises(RecipeError, match="group_size 100 does not divide"):
        fxcompress.compile(nn.Sequential(nn.Linear(64, 8)), [torch.randn(16, 64)],
                           GPTQ(4, 100), progress=False)

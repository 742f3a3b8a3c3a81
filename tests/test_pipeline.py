"""The pipeline's own promises: what needs no data is checked before any work, one rule
lookup for every name, and a team of one answers what a team of many does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import GPTQ, RTN, Magnitude, Recipe, RecipeError, SparseGPT
from fxcompress.calibration import Local
from fxcompress.distributed import current_team
from fxcompress.pipeline import first_rule

from .models import VOCAB, build


@pytest.fixture
def no_work(monkeypatch):
    """Any memory estimate or calibration fails the test: the error must come before."""
    def reached(*args, **kwargs):
        raise AssertionError("the run got past its plan")

    monkeypatch.setattr("fxcompress.pipeline.estimate_memory", reached)
    monkeypatch.setattr("fxcompress.pipeline.calibrate", reached)


@pytest.mark.parametrize("method, match", [
    (GPTQ(4, 16), r"'?1'?: group_size 16 does not divide in_features 8"),
    (SparseGPT(n_m=(2, 16)), r"'?1'?: 2:16 sparsity needs in_features divisible by 16, got 8"),
    (Magnitude(0.5, quant=RTN(4, 16)), r"'?1'?: group_size 16 does not divide in_features 8"),
])
def test_methods_that_cannot_fit_a_layer_fail_in_the_plan(no_work, method, match):
    model = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8))
    with pytest.raises(RecipeError, match=match):
        fxcompress.compile(model, [torch.randn(4, 32) for _ in range(2)], method,
                           progress=False)


def test_a_streamed_run_checks_its_plan_before_opening_the_output(tmp_path, no_work):
    from fxcompress.streaming import compress_checkpoint, partial_dir

    dense = tmp_path / "dense"
    build("llama", hidden=64, layers=1).save_pretrained(dense)
    out = tmp_path / "out"
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3))
    with pytest.raises(RecipeError, match=r"layers\.0\.self_attn\.q_proj: group_size 48"):
        compress_checkpoint(dense, ids, GPTQ(4, 48), out, progress=False)
    assert not out.exists() and not partial_dir(out).exists()


def test_first_rule_is_the_earliest_matching_any_name():
    expert, module = "m.layers.0.mlp.experts.gate_up_proj.3", "m.layers.0.mlp.experts"
    by_module = Recipe({r".*\.experts": GPTQ(4, 32), r".*gate_up.*": None})
    assert first_rule(by_module, (expert, module)) == (r".*\.experts", GPTQ(4, 32))
    by_name = Recipe({r".*gate_up.*": None, r".*\.experts": GPTQ(4, 32)})
    assert first_rule(by_name, (expert, module)) == (r".*gate_up.*", None)
    assert first_rule(by_name, ("m.lm_head",)) is None
    assert first_rule(by_module, (module,)) == by_module.match(module)


def test_one_process_is_a_team_of_one():
    team = current_team()  # no process group in the test process
    assert isinstance(team, Local) and (team.rank, team.world) == (0, 1)
    chunks = [torch.randn(2, 3) for _ in range(3)]
    mine = team.shard(chunks)
    assert mine == chunks and mine is not chunks
    assert team.barrier("anywhere") is None
    assert team.device.type == ("cuda" if torch.cuda.is_available() else "cpu")

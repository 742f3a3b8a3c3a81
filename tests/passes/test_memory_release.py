"""When calibration hands freed memory back to the OS, and the huge pages it asks for."""

import os
import subprocess
import sys

import pytest

from fxcompress import osmem


def test_freed_memory_is_trimmed_only_once_the_slack_is_used(monkeypatch):
    trims, resident = [], [1000]
    monkeypatch.setattr(osmem, "_TRIM", trims.append)
    monkeypatch.setattr(osmem, "resident_bytes", lambda: resident[0])
    monkeypatch.setattr(osmem, "_trimmed_at", 0)
    osmem.release_freed_memory()  # no slack: always
    assert len(trims) == 1
    resident[0] = 1500
    osmem.release_freed_memory(600)  # grown by 500 since the trim at 1000: kept
    assert len(trims) == 1
    resident[0] = 1601
    osmem.release_freed_memory(600)
    assert len(trims) == 2
    resident[0] = 900  # the trim's result is the new mark
    osmem.release_freed_memory(0)
    assert len(trims) == 3
    resident[0] = 1400
    osmem.release_freed_memory(600)
    assert len(trims) == 3
    resident[0] = 1501
    osmem.release_freed_memory(600)
    assert len(trims) == 4


def test_slack_is_none_under_a_budget_and_a_bounded_share_of_the_estimate():
    assert osmem.trim_slack(1 << 30, 2 << 30) == 0
    assert osmem.trim_slack(1 << 30, "2GiB") == 0
    assert osmem.trim_slack(400 << 20, None) == 100 << 20
    assert osmem.trim_slack(100 << 30, None) == osmem.TRIM_SLACK


@pytest.mark.parametrize("given", [None, "0"])
def test_huge_pages_are_asked_for_unless_the_user_says_otherwise(given):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run(
        [sys.executable, "-c", "import os, fxcompress; print(os.environ['THP_MEM_ALLOC_ENABLE'])"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (given or "1")

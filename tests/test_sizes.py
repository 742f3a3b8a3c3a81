"""The one size parser behind ``max_shard_size`` and ``max_memory``."""

from __future__ import annotations

import re

import pytest

from fxcompress.sizes import parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096),
    ("512B", 512),
    ("512 b", 512),
    ("5GB", 5 * 10**9),
    ("5gb", 5 * 10**9),
    ("20KB", 20_000),
    ("500MB", 500 * 10**6),
    ("2TB", 2 * 10**12),
    ("1.5 GB", 1_500_000_000),
    ("6GiB", 6 * 2**30),
    ("6gib", 6 * 2**30),
    ("64KiB", 64 * 2**10),
    ("144MiB", 144 * 2**20),
    ("1.5GiB", 3 * 2**29),
    (" 2 TiB ", 2 * 2**40),
    (".5KiB", 512),
])
def test_accepted_spellings(text, expected):
    assert parse_size(text) == expected


def test_an_int_is_bytes():
    assert parse_size(123) == 123


@pytest.mark.parametrize("text", ["lots", "5 G", "5GBs", "5 PB", "GB", "-1GB", "1,5GB", "",
                                  "1e9", "5 Gi B"])
def test_bad_spellings_name_the_argument_and_the_units(text):
    with pytest.raises(ValueError, match=r"max_memory must be a positive number of bytes or a "
                                         r"string like '6GiB', '500MB' or '1\.5 GiB' \(units: "
                                         r"B, KB, MB, GB, TB, KiB, MiB, GiB, TiB\), got "):
        parse_size(text, "max_memory")


@pytest.mark.parametrize("size", [0, -5, "0GB", "0.1B"])
def test_a_size_must_be_positive(size):
    with pytest.raises(ValueError, match=r"max_shard_size must be a positive number"):
        parse_size(size, "max_shard_size")


@pytest.mark.parametrize("size", [1.5e9, True, None, [5]])
def test_other_types_are_refused(size):
    with pytest.raises(TypeError, match=re.escape(f"got {size!r}")):
        parse_size(size)


def test_save_and_compress_checkpoint_share_the_parser():
    from fxcompress import streaming
    from fxcompress.checkpoint import writer

    assert streaming.parse_size is parse_size and writer.parse_size is parse_size

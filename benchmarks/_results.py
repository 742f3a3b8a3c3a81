"""Write one section of benchmarks/RESULTS.md, replacing an older version of it."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(title: str, command: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# fxcompress benchmark results\n"
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    section = (f"## {title}\n\nCommand: `{command}` ({datetime.date.today()}, {machine})\n\n"
               f"{body.strip()}\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_block(text: str, name: str, where: str = "the text") -> str:
    """What stands between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (generated text).

    Generated numbers live between marker comments so that a script can rewrite them and a
    test can tell a hand edit from the results files they come from.
    """
    begin, end = _markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{where} must hold exactly one {begin} and one {end}, found "
                         f"{text.count(begin)} and {text.count(end)}")
    start, stop = text.index(begin) + len(begin), text.index(end)
    if stop < start:
        raise ValueError(f"{where}: {end} comes before {begin}")
    return text[start:stop].strip("\n")


def replace_block(text: str, name: str, body: str, where: str = "the text") -> str:
    """``text`` with the block ``name`` (see ``read_block``) replaced by ``body``."""
    read_block(text, name, where)  # the same checks, with the same errors
    begin, end = _markers(name)
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body.strip("\n") + "\n" + text[stop:]

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

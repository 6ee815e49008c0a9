"""Shared by every bench/NAME.py: record a section of docs/benchmarks.md, print the JSON line."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by `python bench/NAME.py` (or `rlrt bench NAME`).\n"


def machine() -> str:
    import torch  # lazily: benchmarks without torch (bus, verifier) stay light

    return (f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"python {platform.python_version()}, torch {torch.__version__}")


def record(name: str, body: str) -> None:
    """Replace this benchmark's section (between its markers) in docs/benchmarks.md."""
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = (f"<!-- bench:{name} -->\n## {name}\n\n_Last run {stamp} on {machine()}._\n\n"
               f"{body.strip()}\n<!-- /bench:{name} -->")
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def emit(name: str, ours: float, reference: float, unit: str, higher_is_better: bool = True) -> dict:
    """Print the one JSON line every benchmark ends with. ratio > 1 means ours is better."""
    ratio = (ours / reference) if higher_is_better else (reference / ours)
    line = {"bench": name, "ours": round(ours, 4), "reference": round(reference, 4), "unit": unit,
            "ratio": round(ratio, 4)}
    print(json.dumps(line), flush=True)
    return line

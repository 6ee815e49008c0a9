#!/usr/bin/env python3
"""Write deploy/docker/constraints.txt: the exact versions of rlrt's runtime dependencies
(transitively) as installed in the current environment, for reproducible image builds.

    python deploy/docker/freeze_constraints.py > deploy/docker/constraints.txt

torch is left out: each image pins its own build (CPU or CUDA) through a build argument.
Run it in an environment where `pip install -e .` succeeded and the test suite passes.
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIP = {"torch"}  # pinned per image (CPU/CUDA builds differ)


def closure(dist: str = "rlrt") -> dict[str, str]:
    pins: dict[str, str] = {}
    stack = [Requirement(r) for r in md.requires(dist) or []]
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra (dev, ...) or another platform's dependency
        name = canonicalize_name(req.name)
        if name in pins:
            continue
        pins[name] = md.version(req.name)
        stack.extend(Requirement(r) for r in md.requires(req.name) or [])
    return pins


def main() -> int:
    pins = closure()
    out = [
        "# Exact versions of rlrt's runtime dependencies, used as pip constraints (-c) by every",
        "# image in deploy/docker/. Regenerate: python deploy/docker/freeze_constraints.py",
        f"# (frozen {datetime.date.today().isoformat()}, python {sys.version.split()[0]}).",
        "# torch is not here: each image pins its own build with a build argument.",
    ]
    out += [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in SKIP]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Copy the few SGLang functions the GPU check's receiver runs out of the released sources
(scripts/fetch-upstream.sh unpacks them under .upstream/sglang) into one small module that
travels with the check (`.whl/sglang_update_group.py`; SGLang's code is never committed here):

- `init_custom_process_group` and `torch_release` (srt/utils/common.py): the server's side of
  the update group's rendezvous;
- `WeightUpdater.init_weights_update_group`, `.destroy_weights_update_group` and
  `.receive_weights_from_distributed` (srt/model_executor/model_runner_components/
  weight_updater.py): how the server joins the group and receives each bucket.

    python -m selfcheck.extract_sglang UPSTREAM_DIR OUT_FILE
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

COMMON = "srt/utils/common.py"
UPDATER = "srt/model_executor/model_runner_components/weight_updater.py"
METHODS = ("init_weights_update_group", "destroy_weights_update_group",
           "receive_weights_from_distributed")

# What the copied code needs from the rest of SGLang. NetworkAddress: only `.to_tcp()` of an
# IPv4 address is used (srt/utils/network.py brackets IPv6 hosts; the check runs on 127.0.0.1).
PRELUDE = '''\
from __future__ import annotations  # the methods annotate `self: WeightUpdater`

import logging
import torch
from dataclasses import dataclass
from packaging import version as pkg_version

logger = logging.getLogger("sglang")


@dataclass
class NetworkAddress:
    host: str
    port: int

    def to_tcp(self) -> str:
        return f"tcp://{self.host}:{self.port}"

'''


def _top(tree: ast.Module, name: str) -> ast.stmt:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node
    raise SystemExit(f"SGLang source has no top-level {name} (moved upstream?)")


def extract(upstream: Path) -> str:
    """The module text: SGLang's own source of each piece, unchanged, after PRELUDE."""
    pkg = upstream / "sglang"
    version = (pkg / "VERSION").read_text().strip()
    common = ast.parse((pkg / "sglang" / COMMON).read_text())
    updater = ast.parse((pkg / "sglang" / UPDATER).read_text())
    (cls,) = [n for n in updater.body if isinstance(n, ast.ClassDef) and n.name == "WeightUpdater"]
    methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
    missing = [m for m in METHODS if m not in methods]
    if missing:
        raise SystemExit(f"SGLang {version} WeightUpdater lacks {missing} (moved upstream?)")
    parts = [f'"""Copied by tests/gpu/selfcheck/extract_sglang.py from SGLang {version}\'s '
             'released sources; do not edit."""\n\n', PRELUDE, f"SGLANG_VERSION = {version!r}\n\n"]
    for name in ("torch_release", "init_custom_process_group"):
        parts.append(ast.unparse(_top(common, name)) + "\n\n")
    body = "\n\n".join("    " + ast.unparse(methods[m]).replace("\n", "\n    ") for m in METHODS)
    parts.append(f"class WeightUpdater:\n    _model_update_group: dict\n    tp_rank: int\n"
                 f"    device: str\n\n{body}\n")
    return "".join(parts)


def main(argv: list[str]) -> None:
    out = Path(argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(extract(Path(argv[0])))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""TEST HARNESS: the released SGLang / vLLM sources that scripts/fetch-upstream.sh unpacks
under .upstream/<name>/ (override: RLRT_UPSTREAM_DIR), read with `ast` -- importing them
needs CUDA -- or, for one function that needs only torch.distributed, loaded in isolation.

Tests skip with the reason when the sources are absent; CI fetches them (.ci/run).
"""

from __future__ import annotations

import ast
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = Path(os.environ.get("RLRT_UPSTREAM_DIR") or ROOT / ".upstream")
HTTP_METHODS = {"get": "GET", "post": "POST", "put": "PUT", "delete": "DELETE",
                "patch": "PATCH"}


def package_dir(name: str) -> Path:
    """.upstream/<name>, or skip: the sources are fetched by scripts/fetch-upstream.sh."""
    d = UPSTREAM / name
    if not (d / "VERSION").exists():
        pytest.skip(f"{name} sources not fetched into {d}: run `bash scripts/fetch-upstream.sh`")
    return d


def version(name: str) -> str:
    return (package_dir(name) / "VERSION").read_text().strip()


def source(name: str, relpath: str) -> Path:
    """A file of the package, e.g. source("sglang", "srt/entrypoints/http_server.py")."""
    p = package_dir(name) / name / relpath
    assert p.exists(), f"{name} {version(name)} has no {relpath} (moved upstream?)"
    return p


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def routes(path: Path) -> dict[str, set[str]]:
    """The FastAPI route table of one module: {path: methods} from `@<app|router>.get(...)`,
    `.post(...)`, ..., and `.api_route(path, methods=[...])` decorators with a literal path."""
    table: dict[str, set[str]] = {}
    for node in ast.walk(parse(path)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)):
                continue
            attr = dec.func.attr
            if not dec.args or not isinstance(dec.args[0], ast.Constant):
                continue
            route = dec.args[0].value
            if attr in HTTP_METHODS:
                table.setdefault(route, set()).add(HTTP_METHODS[attr])
            elif attr == "api_route":
                for kw in dec.keywords:
                    if kw.arg == "methods":
                        table.setdefault(route, set()).update(
                            ast.literal_eval(kw.value))
    return table


def handler(path: Path, route: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The function that serves `route` in that module."""
    for node in ast.walk(parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if (isinstance(dec, ast.Call) and dec.args
                        and isinstance(dec.args[0], ast.Constant) and dec.args[0].value == route):
                    return node
    raise AssertionError(f"no handler for {route} in {path}")


def _class(path: Path, name: str) -> ast.ClassDef:
    for node in parse(path).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"no class {name} in {path}")


def fields(path: Path, name: str) -> dict[str, dict[str, Any]]:
    """Annotated fields of a dataclass / msgspec Struct / pydantic model, base classes of the
    same module first: {field: {"type": annotation source, "required": no default}}."""
    cls = _class(path, name)
    out: dict[str, dict[str, Any]] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name):
            try:
                out.update(fields(path, base.id))
            except AssertionError:
                pass  # a base from another module (msgspec.Struct, BaseModel, ...)
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            ann = ast.unparse(stmt.annotation)
            if ann.startswith("ClassVar"):
                continue
            out[stmt.target.id] = {"type": ann, "required": stmt.value is None}
    return out


def load_function(path: Path, name: str, namespace: dict[str, Any],
                  assigns: tuple[str, ...] = ()) -> Any:
    """One top-level function of an upstream module, compiled on its own: the module-level
    assignments named in `assigns` run first in `namespace` (which supplies the imports they
    and the function need). The rest of the module -- and its CUDA imports -- never runs."""
    tree = parse(path)
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in assigns for t in node.targets):
            body.append(node)
    fn = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    assert fn, f"no function {name} in {path}"
    mod = ast.Module(body=[*body, fn[0]], type_ignores=[])
    exec(compile(mod, str(path), "exec"), namespace)  # noqa: S102 - upstream's own source
    return namespace[name]


def sglang_init_custom_process_group() -> Any:
    """SGLang's `init_custom_process_group` (srt/utils/common.py), from the released source."""
    import torch
    from packaging import version as pkg_version

    return load_function(source("sglang", "srt/utils/common.py"), "init_custom_process_group",
                         {"torch": torch, "pkg_version": pkg_version},
                         assigns=("torch_release",))

"""Fetch the METADATA of the wheels that decide each image's NCCL (run by
scripts/fetch-upstream.sh, target `nccl`; read by tests/test_nccl_parity.py).

NCCL forms a communicator only when every rank runs the same NCCL version (NCCL's
`initTransportsRank`, src/init.cc: "Mismatched NCCL version detected", ncclInvalidUsage).
Each torch build pins its NCCL (`Requires-Dist: nvidia-nccl-cu12|cu13==X`), so an image's NCCL
follows from its torch:
  trainer  torch==ARG TORCH_VERSION of deploy/docker/trainer.Dockerfile, from its
           TORCH_INDEX_URL (PyPI: the plain version; a PyTorch index such as .../whl/cu128:
           its local version, 2.13.0+cu128)
  rollout  the torch that sglang==<SGLANG_IMAGE tag> requires (the SGLang image's)
  teacher  the torch that vllm==<VLLM_IMAGE tag> requires (the vLLM image's)
Only the small METADATA files are fetched, never a wheel: the index's PEP 658 `<wheel>.metadata`
where it serves one, else the METADATA member read out of the remote wheel with HTTP range
requests (a zip's directory sits at its end). Written to DEST/<dist>-<version>.METADATA, plus
DEST/images.json: {image: {"torch": version, "metadata": file} | {"error": why}}.

Usage: python scripts/fetch_wheel_metadata.py DEST
Knobs: RLRT_PYPI_SIMPLE (default https://pypi.org/simple/).
"""

from __future__ import annotations

import html.parser
import io
import json
import os
import re
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPI = os.environ.get("RLRT_PYPI_SIMPLE", "https://pypi.org/simple/")
TIMEOUT_S = 60


def _get(url: str, headers: dict[str, str] | None = None) -> bytes:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
        return r.read()


class _Links(html.parser.HTMLParser):
    """The <a href> of a PEP 503 simple page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.links.append(href)


def wheel_urls(index: str, dist: str) -> list[str]:
    """Every wheel URL of `dist` on a PEP 503 simple index."""
    base = index.rstrip("/") + f"/{dist}/"
    p = _Links()
    p.feed(_get(base).decode())
    return [urllib.request.urljoin(base, h.split("#")[0]) for h in p.links
            if h.split("#")[0].endswith(".whl")]


def pick_wheel(urls: list[str], dist: str, version: str) -> str:
    """A Linux x86-64 wheel of exactly `version` (its dependencies are the same for every
    Python of one release)."""
    want = f"{dist}-{version}-".lower()
    for u in urls:
        name = urllib.request.unquote(u.rsplit("/", 1)[1]).lower()
        if name.startswith(want) and "x86_64" in name and "linux" in name:
            return u
    raise LookupError(f"no Linux x86-64 wheel of {dist}=={version}")


class _RemoteFile(io.RawIOBase):
    """A remote file read by HTTP range requests (enough of it for zipfile)."""

    def __init__(self, url: str) -> None:
        self.url = url
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                    timeout=TIMEOUT_S) as r:
            self.size = int(r.headers["Content-Length"])
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = {0: off, 1: self.pos + off, 2: self.size + off}[whence]
        return self.pos

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        data = _get(self.url, {"Range": f"bytes={self.pos}-{self.pos + n - 1}"})[:n]
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def wheel_metadata(url: str) -> str:
    try:
        return _get(url + ".metadata").decode()  # PEP 658
    except urllib.error.HTTPError:
        pass
    with zipfile.ZipFile(io.BufferedReader(_RemoteFile(url), buffer_size=1 << 16)) as z:
        (name,) = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        return z.read(name).decode()


def torch_pin(metadata: str) -> str:
    m = re.search(r"^Requires-Dist: torch\s*==\s*([\w.+]+)", metadata, re.M)
    if not m:
        raise LookupError("no exact torch pin in its METADATA")
    return m.group(1)


def _arg(dockerfile: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "deploy/docker" / dockerfile).read_text(), re.M)
    if not m:
        raise LookupError(f"no ARG {name} in deploy/docker/{dockerfile}")
    return m.group(1)


def images() -> dict[str, tuple[str, str, str]]:
    """{image: (index, dist, version)} of the wheel whose METADATA pins the image's NCCL;
    for the engine images, first the engine's own wheel (which pins torch)."""
    index = _arg("trainer.Dockerfile", "TORCH_INDEX_URL")
    version = _arg("trainer.Dockerfile", "TORCH_VERSION")
    last = index.rstrip("/").rsplit("/", 1)[1]  # .../whl/cu128 -> +cu128; PyPI's .../simple: none
    local = "" if last == "simple" else f"+{last}"
    return {"trainer": (index, "torch", f"{version}{local}"),
            "rollout": (PYPI, "sglang", _arg("rollout.Dockerfile", "SGLANG_IMAGE").split(":v")[1]),
            "teacher": (PYPI, "vllm", _arg("teacher.Dockerfile", "VLLM_IMAGE").split(":v")[1])}


def fetch(dest: Path, index: str, dist: str, version: str) -> str:
    out = dest / f"{dist}-{version}.METADATA"
    if not out.exists():
        text = wheel_metadata(pick_wheel(wheel_urls(index, dist), dist, version))
        out.write_text(text)
    return out.read_text()


def main(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    result: dict[str, dict[str, str]] = {}
    for image, (index, dist, version) in images().items():
        try:
            meta = fetch(dest, index, dist, version)
            torch_version = version if dist == "torch" else torch_pin(meta)
            if dist != "torch":
                fetch(dest, PYPI, "torch", torch_version)
            result[image] = {"torch": torch_version, "metadata": f"torch-{torch_version}.METADATA"}
            print(f"{image}: torch {torch_version}")
        except (OSError, LookupError, ValueError, zipfile.BadZipFile) as e:
            result[image] = {"error": f"{dist}=={version} from {index}: {type(e).__name__}: {e}"}
            print(f"{image}: not fetched ({result[image]['error']})", file=sys.stderr)
    (dest / "images.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

"""Weight directories: the one on-disk format the trainer writes and the services load.

A weight directory holds `model*.safetensors` (sharded when large), optional extra files
(config.json, tokenizer files, ...) and `manifest.json`, which lists every other file with its
BLAKE3 digest and every tensor with its shape and dtype. The digest of a directory is the
sha256 of its manifest.json bytes: it pins every file's hash, so checking the manifest digest
plus each file against the manifest checks everything.

Why BLAKE3 for the files: every service hashes every pushed file before it may use it, so the
file hash is on the path of each weight push. BLAKE3 (a cryptographic hash, like sha256) runs
at about 4x sha256's speed on one core here (0.009 s against 0.040 s for 43 MiB) and spreads
over the cores of a large file (a 7B model's 15 GB). Format 1 directories (sha256 per file,
written by earlier versions: checkpoints, exports) still verify and load.

Writes are atomic: the directory is built under a temporary name beside the target and renamed
into place, so a reader sees the complete old directory, the complete new one, or (for an
instant while an existing directory is replaced) none at all -- never a half-written one.

Only safetensors is ever read: no pickle, so a weight directory cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path

import blake3
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open

from protocol.safetensors_stream import background, write_safetensors

MANIFEST_NAME = "manifest.json"
FORMAT = "rlrt-weights/2"  # what save_weights_dir writes: a BLAKE3 digest per file
FORMATS = ("rlrt-weights/1", FORMAT)  # what is read: /1 lists a sha256 per file
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_CHUNK = 1 << 20
_PARALLEL_BYTES = 256 << 20  # files from this size are hashed on all cores


class WeightsError(Exception):
    """A weight directory is unusable (the message says why)."""


class WeightsMissing(WeightsError):
    """The directory, its manifest or a file the manifest lists is not there."""


class WeightsHashMismatch(WeightsError):
    """The manifest digest or a file's content differs from what was expected."""


class WeightsCorrupt(WeightsError):
    """The files are there and hash correctly but do not hold what the manifest says."""


class FileEntry(BaseModel):
    blake3: str | None = None  # rlrt-weights/2
    sha256: str | None = None  # rlrt-weights/1
    bytes: int = Field(ge=0)

    @model_validator(mode="after")
    def _a_digest(self) -> FileEntry:
        if not (self.blake3 or self.sha256):
            raise ValueError("a file entry needs its digest (blake3; sha256 in format 1)")
        return self


class TensorEntry(BaseModel):
    file: str
    shape: list[int]
    dtype: str = Field(description="torch dtype name without the 'torch.' prefix")


def _plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


class Manifest(BaseModel):
    format: str = FORMAT
    version: int = Field(ge=0)
    created_at: float
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def blake3_file(path: str | os.PathLike) -> str:
    """The BLAKE3 digest of a file, memory-mapped; a large file is hashed on every core."""
    threads = blake3.blake3.AUTO if os.path.getsize(path) >= _PARALLEL_BYTES else 1
    return blake3.blake3(max_threads=threads).update_mmap(path).hexdigest()


def file_digest(path: str | os.PathLike, entry: FileEntry) -> str:
    """The digest of `path` in the algorithm its manifest entry uses."""
    return blake3_file(path) if entry.blake3 else sha256_file(path)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _plan_shards(
    state_dict: dict[str, torch.Tensor], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _detach_for_save(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing memory: safetensors refuses shared storage
    (tied embeddings are the usual case), so later aliases are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel():
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _write_bytes(path: Path, data: bytes, durable: bool) -> str:
    """Write a small file (manifest, config) to `path`, fsync'd when `durable`; its BLAKE3."""
    with open(path, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return blake3.blake3(data).hexdigest()


def save_weights_dir(
    state_dict: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    version: int,
    extra_files: dict[str, bytes | str] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    durable: bool = True,
) -> str:
    """Write `state_dict` (+ `extra_files`, name -> content) as a weight directory at `out_dir`,
    atomically replacing any existing one. Returns the directory digest (manifest sha256, hex).

    `durable=True` fsyncs every file and the parent directory, so the directory survives a
    power loss (checkpoints, the final export). `durable=False` keeps the atomic rename --
    readers still never see a partial directory -- but leaves flushing to the OS: right for
    the weights pushed to services after every step, which are transient (a crashed run
    re-pushes from its checkpoint) and where fsync would dominate the push time."""
    if not state_dict:
        raise ValueError("refusing to save an empty state_dict")
    out = Path(out_dir)
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name == MANIFEST_NAME or "/" in name or name.startswith(".") or name.endswith(".safetensors"):
            raise ValueError(f"extra file name {name!r} is reserved or not a plain file name")
    tensors = _detach_for_save(state_dict)
    shards = _plan_shards(tensors, max_shard_bytes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files: dict[str, FileEntry] = {}
        entries: dict[str, TensorEntry] = {}
        for i, shard in enumerate(shards):
            fname = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            # Streamed from the tensors' memory and hashed on the way: no copy, no re-read.
            digest, size = write_safetensors(tmp / fname, shard, {"format": "pt"},
                                             durable=durable)
            files[fname] = FileEntry(blake3=digest, bytes=size)
            for name, t in shard.items():
                entries[name] = TensorEntry(file=fname, shape=list(t.shape), dtype=_dtype_name(t.dtype))
        for name, content in extra_files.items():
            data = content.encode() if isinstance(content, str) else content
            files[name] = FileEntry(blake3=_write_bytes(tmp / name, data, durable), bytes=len(data))
        files = dict(sorted(files.items()))
        manifest = Manifest(version=version, created_at=time.time(), files=files, tensors=entries)
        raw = json.dumps(manifest.model_dump(), indent=1, sort_keys=True).encode()
        _write_bytes(tmp / MANIFEST_NAME, raw, durable)
        _atomic_replace_dir(tmp, out, durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return hashlib.sha256(raw).hexdigest()


def _atomic_replace_dir(src: Path, dst: Path, durable: bool = True) -> None:
    # rename(2) cannot replace a non-empty directory, so an existing one is first moved aside
    # (a reader then briefly sees no directory -- a clear "missing" error, never a mix).
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if durable:
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(weights_dir: str | os.PathLike, sha256: str | None = None) -> Manifest:
    """Parse manifest.json, checking its digest first when `sha256` is given."""
    d = Path(weights_dir)
    path = d / MANIFEST_NAME
    if not d.is_dir():
        raise WeightsMissing(f"weight directory {d} does not exist")
    if not path.is_file():
        raise WeightsMissing(f"{path} is missing: not a weight directory written by save_weights_dir")
    raw = path.read_bytes()
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256.lower():
            raise WeightsHashMismatch(f"{path}: digest {got} != expected {sha256}")
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValueError as e:
        raise WeightsCorrupt(f"{path} is not a valid manifest: {e}") from e
    # Every listed file is a plain name inside the directory: a manifest naming
    # "../../etc/shadow" would otherwise have the loader stat and hash files anywhere (and its
    # error would say how big they are).
    names = {*manifest.files, *(t.file for t in manifest.tensors.values())}
    outside = [n for n in names if not _plain_name(n)]
    if outside:
        raise WeightsCorrupt(f"{path}: {len(outside)} listed file(s) are not plain names inside "
                             "the directory")
    return manifest


def _check_structure(d: Path, sha256: str | None) -> Manifest:
    """Everything but the file hashes: manifest digest and format, every listed file present
    with its listed size, every tensor in a listed file."""
    manifest = read_manifest(d, sha256)
    if manifest.format not in FORMATS:
        raise WeightsCorrupt(f"{d}: unknown format {manifest.format!r} (expected one of "
                             f"{', '.join(FORMATS)})")
    links = [n for n in manifest.files if (d / n).is_symlink()]
    if links:  # save_weights_dir writes regular files only; a link may point anywhere
        raise WeightsCorrupt(f"{d}: {len(links)} listed file(s) are symbolic links")
    missing = [n for n in manifest.files if not (d / n).is_file()]
    if missing:
        raise WeightsMissing(f"{d}: files listed in the manifest are missing: {sorted(missing)}")
    for name, entry in manifest.files.items():
        size = (d / name).stat().st_size
        if size != entry.bytes:
            raise WeightsHashMismatch(f"{d / name}: {size} bytes, manifest says {entry.bytes}")
    unlisted = {e.file for e in manifest.tensors.values()} - set(manifest.files)
    if unlisted:
        raise WeightsCorrupt(f"{d}: tensors point at files not in the manifest: {sorted(unlisted)}")
    return manifest


def _check_digest(path: Path, got: str, entry: FileEntry) -> None:
    algo, want = ("blake3", entry.blake3) if entry.blake3 else ("sha256", entry.sha256)
    if got != want:
        raise WeightsHashMismatch(f"{path}: {algo} {got} != manifest {want}")


def verify_weights_dir(weights_dir: str | os.PathLike, sha256: str | None) -> Manifest:
    """Check the manifest digest (when given) and every listed file's size and digest.
    Raises WeightsMissing / WeightsHashMismatch / WeightsCorrupt; returns the manifest."""
    d = Path(weights_dir)
    manifest = _check_structure(d, sha256)
    for name, entry in manifest.files.items():
        _check_digest(d / name, file_digest(d / name, entry), entry)
    return manifest


def load_weights_dir(
    weights_dir: str | os.PathLike, sha256: str | None = None, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Verify (unless `verify=False`) and load all tensors, checking each against the manifest."""
    d = Path(weights_dir)
    digests: dict[str, Future] = {}
    if verify:
        manifest = _check_structure(d, sha256)
        # Hash on the helper thread while this one maps the tensors below (zero-copy: both
        # read the same page-cache pages). Nothing is returned -- and no parse error
        # reported -- before every digest has been checked. Written files are never modified
        # in place (a new version is a new directory), so both reads see the same bytes.
        digests = {fname: background(file_digest, d / fname, entry)
                   for fname, entry in manifest.files.items()}
    else:
        manifest = read_manifest(d, sha256)

    def check_digests() -> None:
        for fname, digest in digests.items():
            _check_digest(d / fname, digest.result(), manifest.files[fname])

    by_file: dict[str, list[str]] = {}
    for name, entry in manifest.tensors.items():
        by_file.setdefault(entry.file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        try:
            with safe_open(str(d / fname), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise WeightsCorrupt(f"{d / fname}: tensor {name!r} listed in manifest is absent")
                    out[name] = f.get_tensor(name)
        except WeightsError:
            check_digests()  # a damaged file is a hash mismatch first
            raise
        except Exception as e:  # safetensors raises its own error types on a bad header
            check_digests()
            raise WeightsCorrupt(f"{d / fname}: cannot read safetensors: {e}") from e
    check_digests()
    for name, entry in manifest.tensors.items():
        t = out[name]
        if list(t.shape) != entry.shape or _dtype_name(t.dtype) != entry.dtype:
            raise WeightsCorrupt(
                f"{name}: file has {_dtype_name(t.dtype)}{list(t.shape)}, "
                f"manifest says {entry.dtype}{entry.shape}"
            )
    return out


# --------------------------------------------------------------------------- NCCL updates
# The other way weights reach a service: `WeightUpdate(format="nccl")`, whose
# `meta["nccl"]` is an `NcclSpec`. The trainer (rank 0 of one extra process group per
# service) broadcasts the tensors straight into the engine's GPUs; the service drives its
# engine's HTTP endpoints with each bucket's metadata. Sequence and timing: docs/engines.md.

DEFAULT_NCCL_GROUP = "rlrt_weight_sync"


def dtype_bytes(name: str) -> int:
    """Element size of a torch dtype named without "torch." (ValueError if there is none)."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name")
    return dt.itemsize


class Bucket(BaseModel):
    """One metadata message = the tensors the trainer broadcasts next, in this order."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(min_length=1, description="engine-side (HF) parameter names")
    dtypes: list[str] = Field(description='torch dtype names without "torch.", e.g. "bfloat16"')
    shapes: list[list[int]] = Field(description="full (gathered) shapes")

    @model_validator(mode="after")
    def _aligned(self) -> Bucket:
        if not len(self.names) == len(self.dtypes) == len(self.shapes):
            raise ValueError(f"{len(self.names)} names, {len(self.dtypes)} dtypes, "
                             f"{len(self.shapes)} shapes")
        for d in self.dtypes:
            dtype_bytes(d)
        return self

    def nbytes(self) -> int:
        total = 0
        for d, s in zip(self.dtypes, self.shapes, strict=True):
            n = dtype_bytes(d)
            for x in s:
                n *= x
            total += n
        return total


class NcclSpec(BaseModel):
    """`WeightUpdate.meta["nccl"]`: the group to (re)use and the buckets, in broadcast order."""

    model_config = ConfigDict(extra="forbid")

    world_size: int = Field(ge=2, description="1 (trainer) + the engine's GPU count")
    rank_offset: int = Field(1, ge=1, description="rank of the engine's first GPU")
    group_name: str = Field(
        DEFAULT_NCCL_GROUP, min_length=1,
        description="name of the update group; distinct per service (torch refuses a second "
        "group of one name in the trainer's process)")
    backend: str = Field("nccl", description="SGLang only: torch backend of the update group")
    init_group: bool = Field(
        True,
        description="(re)create the group before this update (the trainer initialises its side "
        "concurrently). False: reuse the group made by an earlier update with the same "
        "location/world_size/group_name; refused if the service has none.",
    )
    packed: bool = Field(False, description="vLLM only: packed broadcast (vLLM's packed_tensor); "
                         "sent to vLLM in init_info")
    buckets: list[Bucket] = Field(min_length=1)


def plan_buckets(params: Iterable[tuple[str, str, Sequence[int]]],
                 bucket_bytes: int) -> list[Bucket]:
    """Greedy, order-keeping buckets of about `bucket_bytes` (slime's default is 512 MB); a
    tensor larger than a bucket gets its own. `params` = (name, dtype name, full shape)."""
    buckets: list[Bucket] = []
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    size = 0
    for name, dtype, shape in params:
        n = dtype_bytes(dtype)
        for x in shape:
            n *= int(x)
        if names and size + n > bucket_bytes:
            buckets.append(Bucket(names=names, dtypes=dtypes, shapes=shapes))
            names, dtypes, shapes, size = [], [], [], 0
        names.append(name)
        dtypes.append(dtype)
        shapes.append([int(x) for x in shape])
        size += n
    if names:
        buckets.append(Bucket(names=names, dtypes=dtypes, shapes=shapes))
    return buckets

"""protocol.weights: round trip, digests, refusal of tampered/missing files, atomic writes."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

import protocol.weights as W


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(50, 8, generator=g)
    return {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: shares storage, which safetensors alone would refuse
        "layer.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layer.b": torch.arange(8, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
    }


def test_round_trip_and_digest(tmp_path):
    sd = _state()
    digest = W.save_weights_dir(sd, tmp_path / "w", version=7, extra_files={"config.json": '{"a": 1}'})
    d = tmp_path / "w"
    assert digest == hashlib.sha256((d / W.MANIFEST_NAME).read_bytes()).hexdigest()
    m = W.verify_weights_dir(d, digest)
    assert m.version == 7
    assert set(m.files) == {"model.safetensors", "config.json"}
    assert m.tensors["layer.w"].dtype == "bfloat16" and m.tensors["layer.w"].shape == [8, 8]
    loaded = W.load_weights_dir(d, digest)
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == v.dtype
        assert torch.equal(loaded[k], v)
    assert (d / "config.json").read_text() == '{"a": 1}'


def test_sharding(tmp_path):
    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    digest = W.save_weights_dir(sd, tmp_path / "w", version=0, max_shard_bytes=2048)
    m = W.verify_weights_dir(tmp_path / "w", digest)
    shards = sorted(f for f in m.files if f.endswith(".safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = W.load_weights_dir(tmp_path / "w", digest)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_wrong_digest_refused(tmp_path):
    W.save_weights_dir(_state(), tmp_path / "w", version=1)
    with pytest.raises(W.WeightsHashMismatch, match="digest"):
        W.verify_weights_dir(tmp_path / "w", "0" * 64)
    with pytest.raises(W.WeightsHashMismatch):
        W.load_weights_dir(tmp_path / "w", "0" * 64)


def test_tampered_file_refused_even_with_right_digest(tmp_path):
    digest = W.save_weights_dir(_state(), tmp_path / "w", version=1)
    p = tmp_path / "w" / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # flip bits inside tensor data: same size, different content
    p.write_bytes(bytes(raw))
    with pytest.raises(W.WeightsHashMismatch, match="model.safetensors"):
        W.load_weights_dir(tmp_path / "w", digest)


def test_edited_manifest_changes_digest(tmp_path):
    digest = W.save_weights_dir(_state(), tmp_path / "w", version=1)
    mp = tmp_path / "w" / W.MANIFEST_NAME
    m = json.loads(mp.read_text())
    m["version"] = 2
    mp.write_text(json.dumps(m))
    with pytest.raises(W.WeightsHashMismatch):
        W.verify_weights_dir(tmp_path / "w", digest)


def test_missing_file_refused(tmp_path):
    digest = W.save_weights_dir(_state(), tmp_path / "w", version=1, extra_files={"config.json": "{}"})
    (tmp_path / "w" / "config.json").unlink()
    with pytest.raises(W.WeightsMissing, match="config.json"):
        W.verify_weights_dir(tmp_path / "w", digest)
    with pytest.raises(W.WeightsMissing):
        W.load_weights_dir(tmp_path / "nope")
    (tmp_path / "w" / W.MANIFEST_NAME).unlink()
    with pytest.raises(W.WeightsMissing, match="manifest"):
        W.load_weights_dir(tmp_path / "w")


def test_manifest_tensor_mismatch_is_corrupt(tmp_path):
    # A manifest that hashes fine (no digest pinned) but lies about a shape must not load.
    W.save_weights_dir(_state(), tmp_path / "w", version=1)
    mp = tmp_path / "w" / W.MANIFEST_NAME
    m = json.loads(mp.read_text())
    m["tensors"]["layer.w"]["shape"] = [4, 16]
    mp.write_text(json.dumps(m))
    with pytest.raises(W.WeightsCorrupt, match="layer.w"):
        W.load_weights_dir(tmp_path / "w")


def test_overwrite_is_atomic_and_failed_write_keeps_old(tmp_path):
    out = tmp_path / "w"
    d1 = W.save_weights_dir(_state(1), out, version=1)
    d2 = W.save_weights_dir(_state(2), out, version=2)
    assert d1 != d2
    assert W.verify_weights_dir(out, d2).version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]  # no temp or old dirs left

    # A write that fails half-way (here: the model file is written, then an extra file's
    # content cannot be encoded -- a real failure, nothing patched).
    with pytest.raises(TypeError):
        W.save_weights_dir(_state(3), out, version=3, extra_files={"config.json": 123})  # type: ignore[dict-item]
    # The previous directory is untouched and still verifies; the partial one is cleaned up.
    assert W.verify_weights_dir(out, d2).version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError):
        W.save_weights_dir({}, tmp_path / "w", version=0)
    with pytest.raises(ValueError, match="reserved"):
        W.save_weights_dir(_state(), tmp_path / "w", version=0, extra_files={"manifest.json": "{}"})
    with pytest.raises(TypeError):
        W.save_weights_dir({"a": [1, 2]}, tmp_path / "w", version=0)  # type: ignore[dict-item]


def test_files_carry_blake3_and_format_1_sha256_directories_still_load(tmp_path):
    sd = _state()
    W.save_weights_dir(sd, tmp_path / "w", version=3, extra_files={"config.json": "{}"})
    d = tmp_path / "w"
    m = json.loads((d / W.MANIFEST_NAME).read_text())
    assert m["format"] == "rlrt-weights/2"
    assert all(e["blake3"] and e["sha256"] is None for e in m["files"].values())
    assert W.blake3_file(d / "model.safetensors") == m["files"]["model.safetensors"]["blake3"]
    # What an earlier version wrote (checkpoints, exports): sha256 per file, format 1.
    m["format"] = "rlrt-weights/1"
    m["files"] = {n: {"sha256": W.sha256_file(d / n), "bytes": e["bytes"]}
                  for n, e in m["files"].items()}
    raw = json.dumps(m).encode()
    (d / W.MANIFEST_NAME).write_bytes(raw)
    digest = hashlib.sha256(raw).hexdigest()
    loaded = W.load_weights_dir(d, digest)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    p = d / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(W.WeightsHashMismatch, match="sha256"):
        W.verify_weights_dir(d, digest)
    m["files"]["config.json"] = {"bytes": 2}  # an entry without any digest
    with pytest.raises(W.WeightsCorrupt, match="digest"):
        (d / W.MANIFEST_NAME).write_text(json.dumps(m))
        W.verify_weights_dir(d, None)

"""The one client of the services' weight control API (protocol/weights_client.py): how it
reads answers, and the newest directory it hands a restarted service."""

from __future__ import annotations

import httpx
import pytest
import torch

from protocol.messages import WeightUpdate, WeightUpdateRequest
from protocol.weights import save_weights_dir
from protocol.weights_client import UpdateRefused, check_reply, newest_weights


def _reply(status: int, body: dict) -> httpx.Response:
    return httpx.Response(status, json=body)


def test_answers_are_read_as_done_retryable_or_refused() -> None:
    check_reply("s", _reply(200, {"version": 3}))
    for status, retryable in ((503, True), (502, True), (429, True), (409, False), (422, False)):
        with pytest.raises(UpdateRefused) as e:
            check_reply("s", _reply(status, {"detail": "x"}))
        assert e.value.retryable is retryable and str(e.value).startswith(f"s: HTTP {status}")
    with pytest.raises(UpdateRefused) as e:
        check_reply("s", _reply(409, {"detail": "canary", "canary": {"max_diff": 0.5}, "version": 2}))
    assert e.value.canary == {"max_diff": 0.5, "consistent": True, "version": 2}
    with pytest.raises(UpdateRefused, match="refused"):
        check_reply("s", _reply(200, {"ok": False}))


def test_newest_weights_names_the_highest_version_with_its_digest(tmp_path) -> None:  # noqa: ANN001
    digests = {v: save_weights_dir({"w": torch.full((2,), float(v))}, tmp_path / f"v{v:08d}",
                                   version=v) for v in (3, 12, 7)}
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    update = newest_weights(tmp_path, "launcher")
    assert update is not None and (update.version, update.sha256) == (12, digests[12])
    assert update.location == str(tmp_path / "v00000012") and update.run_id == "launcher"
    # what the launcher sends is what a service accepts
    WeightUpdateRequest.model_validate_json(update.model_dump_json())
    assert newest_weights(tmp_path / "none", "launcher") is None


def test_a_service_refuses_what_the_sender_schema_allows_only_loosely() -> None:
    """One schema: the service's request model is the sender's, stricter on the wire."""
    loose = WeightUpdate(version=1, location="/w")  # no digest: fine to build
    with pytest.raises(ValueError, match="sha256"):
        WeightUpdateRequest.model_validate(loose.model_dump(mode="json"))
    with pytest.raises(ValueError, match="extra"):
        WeightUpdateRequest.model_validate({**loose.model_dump(mode="json"), "sha256": "0" * 64,
                                            "surprise": 1})
    with pytest.raises(ValueError):
        WeightUpdate(version=1, location="/w", sha256="abc")  # not a digest, on either side

"""Property-based API fuzzing from the OpenAPI schema (schemathesis): valid and invalid
requests to every operation of a live server; none may produce a 5xx."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")  # in the dev extra

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from support.verifier_live import Live, live_verifier  # noqa: E402

from services.verifier.config import VerifierConfig  # noqa: E402
from services.verifier.pool import VerifyPool  # noqa: E402

MAX_EXAMPLES = 20  # per operation and mode: bounded, so CI stays quick


@pytest.fixture(scope="module")
def live(redis_server) -> Iterator[Live]:
    # Short deadlines: fuzzed text is checked for real, and must not stall the run.
    cfg = VerifierConfig(workers=2, default_timeout_s=1.0, max_timeout_s=2.0, kill_grace_s=0.3,
                         max_batch=16, max_job_items=16, consumer=f"fuzz-{uuid.uuid4().hex[:6]}")
    with VerifyPool(2, kill_grace_s=0.3) as pool, \
            live_verifier(cfg, pool, redis_url=redis_server.url, prefix=f"fz{uuid.uuid4().hex[:8]}") as lv:
        yield lv


def operations(live: Live) -> list:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(live: Live, mode: GenerationMode) -> None:
    ops = operations(live)
    paths = {op.path for op in ops}
    assert {"/v1/verify", "/v1/verify/batch", "/v1/jobs", "/v1/jobs/{job_id}"} <= paths
    for op in ops:
        if mode is GenerationMode.NEGATIVE and not op.path.startswith("/v1/"):
            continue  # health and metrics take no input: there is nothing to make invalid
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:  # noqa: ANN001
            case.call_and_validate(base_url=live.url, checks=[not_a_server_error], timeout=30)

        check()

"""How the pipeline is wired: one row per stage, the only place these facts are stated.

    trainer --PromptTask--> prompts --> rollout --RolloutGroup--> rollouts --> verifier
      --VerifiedGroup--> verified --> teacher --ScoredGroup--> scored --> trainer

Each stage consumes one message type from one stream, in one consumer group shared by all its
replicas, and publishes the next message type to the next stage's stream. The service configs
(services/*/config.py: port, consumer group), the services' workers, the trainer, the launcher
(rlrt/plan.py, rlrt/supervisor.py, rlrt/engine_servers.py) and the deployment drift tests all
read this table.

Stream names here are *logical*: the Redis key of each is `bus.stream(name)`, and the run's
`bus.streams` mapping (protocol/config.py) may rename any of them -- the one place a stream
name is configured, read by every process of the run.

The trainer also publishes VerifiedGroups to the teacher's input when a group must be scored
again by a newer teacher (trainer/driver.py, `rescore_stream`). A run whose preset never
scores (grpo, dr_grpo) may run without a teacher (`trainer.teacher_service: false`, which
`rlrt train` sets): the trainer then reads the verifier's output (`trainer_input`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import model_validator

from protocol.messages import (
    Message,
    PromptTask,
    RolloutGroup,
    ScoredGroup,
    VerifiedGroup,
)

# The logical streams, in pipeline order.
PROMPTS, ROLLOUTS, VERIFIED, SCORED = "prompts", "rollouts", "verified", "scored"
STREAMS: tuple[str, ...] = (PROMPTS, ROLLOUTS, VERIFIED, SCORED)

# What every HTTP service serves without a token: liveness, readiness (the probes of compose
# and Kubernetes), and Prometheus metrics.
HEALTH_ROUTES = ("/healthz", "/readyz")
METRICS_ROUTE = "/metrics"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline."""

    name: str  # also its config section and its `rlrt serve` / deployment name
    consumes: type[Message]
    produces: type[Message]
    in_stream: str  # logical stream it consumes (see STREAMS)
    out_stream: str  # logical stream it publishes to
    group: str  # consumer group shared by all its replicas
    port: int | None  # default HTTP port; None: no HTTP service (the trainer)
    runs_engine: bool  # serves an inference engine and takes POST /v1/weights
    health: tuple[str, ...]  # unauthenticated health routes of its HTTP service


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("rollout", PromptTask, RolloutGroup, PROMPTS, ROLLOUTS, "rollout", 8310, True,
          HEALTH_ROUTES),
    Stage("verifier", RolloutGroup, VerifiedGroup, ROLLOUTS, VERIFIED, "verifier", 8300, False,
          HEALTH_ROUTES),
    Stage("teacher", VerifiedGroup, ScoredGroup, VERIFIED, SCORED, "teacher", 8320, True,
          HEALTH_ROUTES),
    # The trainer's metrics server is optional (trainer.metrics.prometheus_port): no default port.
    Stage("trainer", ScoredGroup, PromptTask, SCORED, PROMPTS, "trainer", None, False, ()),
)}

# The stages `rlrt serve` runs (each an HTTP service), in the order the launcher starts them:
# the verifier first, so the rollout's groups find it up.
SERVICES: tuple[str, ...] = ("verifier", "rollout", "teacher")
# The stages that run an inference engine: the trainer pushes its weights to these.
ENGINE_STAGES: tuple[str, ...] = tuple(n for n in SERVICES if STAGES[n].runs_engine)


def trainer_input(teacher_service: bool) -> tuple[str, type[Message]]:
    """The logical stream the trainer consumes and the message type on it: the teacher's
    ScoredGroups, or the verifier's VerifiedGroups when no teacher service runs."""
    src = STAGES["trainer"] if teacher_service else STAGES["teacher"]
    return src.in_stream, src.consumes


def stage(name: str) -> Stage:
    """The row of `name`; a KeyError names the known stages."""
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"no pipeline stage {name!r}; known: {sorted(STAGES)}") from None


def default_port(name: str) -> int:
    """The default HTTP port of service `name` (its config's `port` default, the deployments')."""
    port = stage(name).port
    if port is None:
        raise KeyError(f"stage {name!r} serves no HTTP")
    return port


class StageStreams:
    """Mixin of a service's config model (its `section` is its stage's name): the streams its
    bus worker reads and writes, from the table. A config that still sets the per-service
    `in_stream` / `out_stream` of earlier versions is refused, naming the one place stream
    names live now: silently ignoring a rename would leave the other processes on the old
    stream."""

    section: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _streams_moved(cls, values: Any) -> Any:
        # The environment too: pydantic-settings reads only the variables of known fields, so
        # an old RLRT_<SECTION>__IN_STREAM would otherwise be dropped without a word.
        prefix = str(getattr(cls, "model_config", {}).get("env_prefix", ""))
        for key in ("in_stream", "out_stream"):
            given = values.get(key) if isinstance(values, dict) else None
            given = given or os.environ.get(f"{prefix}{key}".upper())
            if given:
                logical = getattr(stage(cls.section), key)
                raise ValueError(
                    f"{cls.section}.{key} is no longer a service setting: stream names are set "
                    f"once, for every process of the run, in the bus section -- e.g. bus: "
                    f"{{streams: {{{logical}: {given}}}}} (protocol/topology.py)")
        return values

    @property
    def in_stream(self) -> str:
        """The logical stream this service consumes (`bus.stream()` gives its Redis key)."""
        return stage(self.section).in_stream

    @property
    def out_stream(self) -> str:
        """The logical stream this service publishes to."""
        return stage(self.section).out_stream


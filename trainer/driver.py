"""The driver: decides which prompts go out and which scored groups a step trains on.

Versions. The trainer's policy version is the number of optimizer steps taken; step t trains
at version t and produces version t+1. A group sampled by weights of version v is usable at
step t only if 0 <= t - v <= max_staleness (S). Older groups are dropped and counted
("stale") and replaced by a new prompt. A group *newer* than the trainer can only come from
a run killed after its last checkpoint and resumed: it is held back ("deferred") until the
trainer reaches its version, so its prompt is not skipped. Too many unusable groups in one
step (services stuck at another version) stop the run with an error instead of spinning.

Admission control. Task k (the k-th admitted prompt) is meant for step k // P (P prompts per
step); at version t the driver admits tasks up to step t + S, i.e. keeps the number admitted
at (t + S + 1) * P plus one replacement per dropped group that must be replaced. So never
more is in flight than can still be used fresh, and with S = 0 the run is synchronous. The
caller may defer a step's admission (`collect(before_admit=...)`): a step whose groups are all
at hand takes them without publishing, so its update starts while the services still load the
last push, and the caller admits (`top_up`) once they have; a step that must wait for groups,
or a resumed one with a previous process's groups still queued, awaits `before_admit` and
admits first.

Zero-variance groups (every advantage 0 by the estimator's own test, protocol/estimators.py:
equal rewards for GRPO; never for opsd, which ignores rewards): `keep` trains on them (verl's
GRPO, the default), `drop` spends the step's slot on them (a smaller step), `backfill` drops
them and admits a replacement, at most `backfill_max` per step (then it falls back to `drop`).

Teacher version. Every group records three versions: the sampling one (`engine_version`), the
teacher's (`teacher_version`) and that of s_t, which is the step's version t (s is recomputed
with the weights that begin the step). With `teacher_version="match_s"` (the paper's
current-policy teacher; the default of the teacher presets) a group scored by an older teacher
is not trained as is: its VerifiedGroup goes back to the teacher service (`rescore_stream`),
which by then serves version t (the trainer waits for the push to load before collecting), and
the rescored group takes its slot; no sample is wasted. A teacher newer than t (a resumed run)
is held back like a group sampled by newer weights.

Services behind. A stale group, or one scored by an older teacher, may also mean a service
serves older weights than it was pushed: restarted on its base weights, or down for longer than
a push's retries. Rescoring or replacing would then repeat until the run stops, since the next
push comes only after a step; so at every P-th such group of a step the driver tells the
trainer (`on_lagging`), which asks each service its version and pushes the current weights to
those behind (trainer/main.py).

Teacher context from the data. When the preset's context comes from a dataset field
(reference_solution / reference_answer: opsd, rlsd), `max_without_context` consecutive prompts
without that field stop the run with the reason at admission, before anything is sampled:
such a run would otherwise train on all-zero advantages (opsd) or never re-weight.

Dead letters. A service that cannot process a message (a user's reward function raised, a
prompt the engine refuses) dead-letters it to `<stream>:dead` and keeps going; the group never
arrives. While it waits, the driver reads the dead-letter streams every `dead_check_s` for
groups of this run (its run id and nonce, a task still in flight) and stops the run at once with
the first failure's message and where its traceback is, unless `dead_tolerance` allows that
share of the admitted groups: then the group is counted (`dead_lettered`) and replaced.
Without this the trainer waited `wait_timeout_s` (15 minutes) on a bug that repeats.

Ids. Task k's msg_id derives from (run_id, nonce, k): a resumed run that re-admits task k
publishes the same msg_id, which the bus drops as a duplicate, so no prompt goes out twice.
The nonce is new for each fresh run (kept in checkpoints), so a fresh run on the same Redis
never collides with an old one; groups of other runs are dropped ("foreign"). The group_id
derives from (run_id, k) only, so reruns with the same run id and seed are reproducible.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack

from protocol.bus import Bus
from protocol.estimators import get_adv_est
from protocol.messages import (
    PromptTask,
    SamplingParams,
    ScoredGroup,
    TeacherRequest,
    VerifiedGroup,
    derive_id,
)
from protocol.topology import STAGES, STREAMS
from trainer.data import PromptSource
from trainer.inbox import Inbox, InboxTimeout

log = logging.getLogger("rlrt.trainer.driver")


class DriverError(RuntimeError):
    """The data flow is stuck or broken (the message says what was waited for)."""


@dataclass
class DriverState:
    """Everything the driver needs to continue after a restart (saved in checkpoints)."""

    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    admitted: int = 0  # tasks published so far = the next task index
    data_cursor: int = 0  # stream position of the next row (skipped rows advance it too)
    replacements: int = 0  # extra admissions earned by dropped groups
    inflight: dict[int, int] = field(default_factory=dict)  # task index -> admission version
    deferred: list[int] = field(default_factory=list)  # task indices held for a newer version
    totals: dict[str, int] = field(default_factory=dict)  # drop / keep counters, whole run

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inflight"] = {str(k): v for k, v in self.inflight.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriverState:
        d = dict(d)
        d["inflight"] = {int(k): int(v) for k, v in d.get("inflight", {}).items()}
        return cls(**d)


@dataclass
class Collected:
    """What one step trains on, and what happened while collecting it."""

    groups: list[ScoredGroup]  # sorted by task index
    consumed: list[str]  # msg_ids of every group taken off the inbox (used or dropped)
    counts: Counter[str]  # stale, future, foreign, zero_var_kept/dropped, backfilled
    wait_s: float
    admitted: bool = True  # False: the step's admission is left to the caller (before_admit)


def task_index(g: ScoredGroup) -> int:
    return int(g.task.meta.get("task_index", -1))


def zero_variance(g: ScoredGroup) -> bool:
    """The group carries no signal: every advantage is 0 by its estimator's test."""
    return get_adv_est(g.task.teacher.estimator).carries_no_signal(
        [v.reward for v in g.verifications])


def scored_version(g: ScoredGroup) -> int | None:
    """The teacher version of a group that has teacher scores, else None."""
    return g.teacher_version if any(t is not None for t in g.teacher) else None


def newest_version(g: ScoredGroup) -> int:
    """The newest policy version that produced any part of the group."""
    return max(g.engine_version, scored_version(g) or 0)


class Driver:
    def __init__(self, *, bus: Bus, prompts_stream: str, inbox: Inbox, source: PromptSource,
                 run_id: str, prompts_per_step: int, group_size: int, max_staleness: int,
                 zero_variance: str, backfill_max: int, sampling: SamplingParams,
                 teacher: TeacherRequest, wait_timeout_s: float, publish_timeout_s: float,
                 max_dropped: int | None = None, state: DriverState | None = None,
                 teacher_version: str = "any", rescore_stream: str | None = None,
                 max_without_context: int = 32, dead_tolerance: float = 0.0,
                 dead_streams: Sequence[str] | None = None, dead_check_s: float = 2.0,
                 on_lagging: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.bus = bus
        self.stream = prompts_stream
        self.inbox = inbox
        self.source = source
        self.run_id = run_id
        self.P = prompts_per_step
        self.G = group_size
        self.S = max_staleness
        self.zero_variance = zero_variance
        self.backfill_max = backfill_max
        self.sampling = sampling
        # The teacher renders its context the way the student's prompt was rendered.
        chat_template = getattr(source.cfg, "chat_template", None)
        self.teacher = (teacher if teacher.chat_template or chat_template is None
                        else teacher.model_copy(update={"chat_template": chat_template}))
        self.wait_timeout_s = wait_timeout_s
        self.publish_timeout_s = publish_timeout_s
        self.state = state or DriverState()
        # Unusable groups tolerated in one step before the run stops with an error (a service
        # stuck at another version would otherwise make the driver drop and replace forever).
        self.max_dropped = (max_dropped if max_dropped is not None
                            else 8 * (max_staleness + 1) * prompts_per_step)
        self.deferred: list[ScoredGroup] = []
        self._seen_versions: set[int] = set()
        if teacher_version == "match_s" and rescore_stream is None:
            raise ValueError("teacher_version='match_s' needs the teacher's input stream")
        self.teacher_version = teacher_version
        self.rescore_stream = rescore_stream
        self.max_without_context = max_without_context
        self._without_context = 0  # consecutive admitted rows lacking the context field
        self.dead_tolerance = dead_tolerance
        # logical name -> Redis key of each dead-letter stream watched (the pipeline's streams)
        self.dead_streams = ({k: k for k in dead_streams} if dead_streams is not None
                             else {n: bus.cfg.stream(n) + ":dead" for n in STREAMS})
        self.dead_check_s = dead_check_s
        self._dead_seen: dict[str, str] = {}  # dead stream -> last entry id read
        self._dead_tasks: set[int] = set()  # task indices lost to a dead letter
        self._dead_checked = float("-inf")
        # Called with the step's version when a group is stale or scored by an older teacher:
        # a service may serve older weights than it was pushed (the trainer catches it up).
        self.on_lagging = on_lagging

    # ------------------------------------------------------------------ admission
    def allowance(self, version: int) -> int:
        return (version + self.S + 1) * self.P + self.state.replacements

    def make_task(self, k: int, version: int) -> PromptTask:
        drawn = self.source.draw(self.state.data_cursor)
        self.state.data_cursor = drawn.cursor + 1
        self._check_context(drawn.row.solution, drawn.row.answer)
        sampling = self.sampling
        if sampling.seed is not None:  # reproducible, yet different for every task
            sampling = sampling.model_copy(update={"seed": sampling.seed + k})
        base = f"{self.run_id}/{self.state.nonce}"
        return PromptTask(
            run_id=self.run_id, msg_id=derive_id(base, f"task/{k}"),
            # Without the nonce: downstream seeds hang off the group id (the teacher's choice
            # of sibling), so a rerun of the same run id and seed reproduces the same groups.
            prompt_id=drawn.row.prompt_id, group_id=derive_id(self.run_id, f"group/{k}"),
            prompt_text=drawn.row.prompt, prompt_ids=drawn.prompt_ids, answer=drawn.row.answer,
            prompt_history=[dict(m) for m in drawn.row.messages[:-1]] if drawn.row.messages
            else None,
            solution=drawn.row.solution, task=drawn.row.task, group_size=self.G,
            sampling=sampling, policy_version=version, teacher=self.teacher,
            meta={"task_index": k, "nonce": self.state.nonce, "row": drawn.index,
                  "epoch": drawn.epoch,
                  # the row's other columns, for reward functions (tasks.rewards.prompt_row)
                  **({"fields": dict(drawn.row.fields)} if drawn.row.fields else {})},
        )

    def _check_context(self, solution: str | None, answer: str | None) -> None:
        """Stop when the data cannot give the preset's teacher its context (see module doc)."""
        mode = self.teacher.context_mode
        if self.teacher.scope == "none" or mode == "sibling":
            return  # siblings come from the samples; a missing solution is only a fallback
        field_ = "solution" if mode == "reference_solution" else "answer"
        if (solution if mode == "reference_solution" else answer):
            self._without_context = 0
            return
        self._without_context += 1
        if self._without_context >= self.max_without_context:
            raise DriverError(
                f"{self._without_context} consecutive prompts have no reference {field_}, but "
                f"the teacher's context_mode is {mode!r}: the teacher cannot score them (for "
                f"opsd every advantage would be 0). Map the data's {field_} column "
                f"(data.{field_}_field) or choose a preset whose context is a sibling")

    async def top_up(self, version: int) -> int:
        """Publish tasks until the admission allowance at `version` is reached."""
        n = 0
        while self.state.admitted < self.allowance(version):
            k = self.state.admitted
            task = self.make_task(k, version)
            await self.bus.publish(self.stream, task, timeout_s=self.publish_timeout_s)
            self.state.inflight[k] = version
            self.state.admitted += 1
            n += 1
        return n

    def drained(self) -> bool:
        """Every task in flight has arrived (in the inbox, or held back): nothing upstream
        works for this run until more tasks are admitted."""
        return self.inbox.pending() + len(self.deferred) >= len(self.state.inflight)

    # ------------------------------------------------------------------ consumption
    def _count(self, counts: Counter[str], key: str) -> None:
        counts[key] += 1
        self.state.totals[key] = self.state.totals.get(key, 0) + 1

    async def _next(self, version: int, stop: Any, used: int) -> ScoredGroup | None:
        """A deferred group whose version has come, else the next arrival."""
        for i, g in enumerate(self.deferred):
            if newest_version(g) <= version:
                del self.deferred[i]
                return g
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            if await self.check_dead_letters():
                await self.top_up(version)  # the replacements of groups lost within tolerance
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise InboxTimeout
                return await self.inbox.get(min(left, self.dead_check_s), stop)
            except InboxTimeout:
                if time.monotonic() < deadline:
                    continue
            raise DriverError(
                f"waited {self.wait_timeout_s:.0f} s for a ScoredGroup for step {version} "
                f"({used}/{self.P} received; {len(self.state.inflight)} tasks in flight on "
                f"'{self.stream}'; {len(self.deferred)} held back as sampled by newer weights): "
                f"is every service (rollout, verifier, teacher) running? Check the "
                f"dead-letter streams '<stream>:dead'."
            ) from None

    # ------------------------------------------------------------------ dead letters
    async def check_dead_letters(self, *, force: bool = False) -> int:
        """Read the dead-letter streams (at most every dead_check_s); for each new entry that
        is one of this run's tasks in flight: stop (DriverError) beyond the tolerance, else
        count it and admit a replacement. Returns how many were found."""
        now = time.monotonic()
        if not force and now - self._dead_checked < self.dead_check_s:
            return 0
        self._dead_checked = now
        found = 0
        for logical, key in self.dead_streams.items():
            start = f"({self._dead_seen[key]}" if key in self._dead_seen else "-"
            for entry_id, fields in await self.bus.r.xrange(key, min=start, max="+", count=1000):
                self._dead_seen[key] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                k = self._our_task(fields)
                if k is None:
                    continue
                found += 1
                self._lost(k, logical, key, fields)
        return found

    def _our_task(self, fields: dict) -> int | None:
        """The task index of a dead-lettered message of this run still in flight, else None
        (another run's, an evaluation's, a claim-checked payload already expired)."""
        raw = fields.get(b"d")
        if raw is None:
            return None
        try:
            obj = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 - not ours to judge: the bus names undecodable ones
            return None
        if not isinstance(obj, dict):
            return None
        # A group carries its PromptTask under "task"; a PromptTask's own "task" is its name.
        task = obj["task"] if isinstance(obj.get("task"), dict) else obj
        meta = task.get("meta")
        if not isinstance(meta, dict) or task.get("run_id") != self.run_id \
                or meta.get("nonce") != self.state.nonce:
            return None
        k = meta.get("task_index")
        if not isinstance(k, int) or k not in self.state.inflight or k in self._dead_tasks:
            return None
        return k

    def _lost(self, k: int, logical: str, key: str, fields: dict) -> None:
        self._dead_tasks.add(k)
        del self.state.inflight[k]
        self.state.totals["dead_lettered"] = self.state.totals.get("dead_lettered", 0) + 1
        error = fields.get(b"error", b"").decode(errors="replace").strip()
        lines = [ln for ln in error.splitlines() if ln.strip()]
        summary = lines[0] if lines else "(no error text)"
        if len(lines) > 1 and lines[-1] not in summary:
            summary += f" ... {lines[-1].strip()}"
        reader = next((st.name for st in STAGES.values() if st.in_stream == logical), logical)
        lost = len(self._dead_tasks)
        if lost > self.dead_tolerance * max(self.state.admitted, 1):
            raise DriverError(
                f"the {reader} dead-lettered a group of this run (task {k}): {summary} -- "
                f"traceback: the {reader}'s log (logs/{reader}.log in the run directory) and "
                f"the 'error' field of `redis-cli XRANGE {key} - +`. {lost} of "
                f"{self.state.admitted} groups lost; trainer.dead_letter_tolerance "
                f"({self.dead_tolerance:g}) is the share allowed")
        log.warning("the %s dead-lettered task %d (%d of %d groups lost, within the tolerance "
                    "%g); a replacement is admitted: %s", reader, k, lost, self.state.admitted,
                    self.dead_tolerance, summary)
        self.state.replacements += 1

    def _defer(self, g: ScoredGroup) -> None:
        """Hold a group sampled by weights newer than the trainer's (a run resumed from an
        earlier checkpoint than the services' weights) until the trainer reaches that
        version, instead of skipping its prompt; admit a replacement for now."""
        self.deferred.append(g)
        k = task_index(g)
        if k not in self.state.deferred:  # held before a restart: replaced already
            self.state.deferred.append(k)
            self.state.replacements += 1

    async def _lagging(self, version: int, counts: Counter[str]) -> None:
        """Tell the trainer once per P groups of this step that came back too old: a step's
        worth can be normal (a step's groups sampled before the last push, rescored), more
        than that is a service behind."""
        if self.on_lagging is not None and (counts["stale"] + counts["teacher_rescored"]) % self.P == 0:
            await self.on_lagging(version)

    async def _rescore(self, g: ScoredGroup, version: int) -> None:
        """Send a group scored by an older teacher back to the teacher service. The msg_id
        derives from (group, version): a resumed trainer that rescores it again publishes the
        same id, which the bus drops as a duplicate."""
        fields = {k: getattr(g, k) for k in VerifiedGroup.model_fields}
        fields["msg_id"] = derive_id(g.msg_id, f"rescore/{version}")
        assert self.rescore_stream is not None
        await self.bus.publish(self.rescore_stream, VerifiedGroup.model_validate(fields),
                               timeout_s=self.publish_timeout_s)

    async def collect(self, version: int, stop: Any = None,
                      before_admit: Callable[[], Awaitable[Any]] | None = None
                      ) -> Collected | None:
        """The groups step `version` trains on (None if `stop` was set while waiting).
        Raises DriverError when no group arrives within wait_timeout_s, or when too many are
        unusable (the services are not at the trainer's version).

        before_admit: admission may wait. A step whose groups are all at hand takes them
        without publishing prompts (unless some turn out unusable: then it awaits
        `before_admit()` -- the services loading the last push -- and admits); `admitted` is
        then False and the caller admits later (`top_up(version)`): the update starts at once
        while the services load the push (trainer/main.py). A step that has to wait for groups
        awaits `before_admit()` and admits first, as the rollout then still samples (its batch
        stays full)."""
        t0 = time.perf_counter()
        # Not while a previous process's groups are queued: a task it admitted after this
        # process's checkpoint is not in flight here until admitted again, and its group, taken
        # first, would be dropped as foreign while the re-admission is dropped as a duplicate.
        deferred_admission = (before_admit is not None and self.inbox.restored == 0
                              and self._at_hand(version) >= self.P)
        if before_admit is not None and not deferred_admission:
            await before_admit()
        used: list[ScoredGroup] = []
        consumed: list[str] = []
        counts: Counter[str] = Counter()
        slots = self.P
        backfilled = 0
        while slots > 0:
            unusable = counts["stale"] + counts["deferred"] + counts["teacher_rescored"]
            if unusable > self.max_dropped:
                raise DriverError(
                    f"step {version}: {counts['stale']} groups too stale, "
                    f"{counts['teacher_rescored']} sent back to an older teacher and "
                    f"{counts['deferred']} from newer weights (engine versions "
                    f"{sorted(self._seen_versions)}): the services do not serve the trainer's "
                    f"version {version}; check the weight pushes (push_failed in the metrics)")
            if deferred_admission and not self._at_hand(version):
                await before_admit()  # type: ignore[misc]  # set with deferred_admission
                deferred_admission = False
            if not deferred_admission:
                await self.top_up(version)
            g = await self._next(version, stop, len(used))
            if g is None:
                return None
            k = task_index(g)
            if g.task.meta.get("nonce") != self.state.nonce or k not in self.state.inflight:
                consumed.append(g.msg_id)
                self._count(counts, "foreign")  # another run's group, or one already used
                continue
            staleness = version - g.engine_version
            self._seen_versions.add(g.engine_version)
            if newest_version(g) > version:
                self._count(counts, "deferred")
                self._defer(g)  # not consumed: it stays in the inbox until used
                continue
            tv = scored_version(g)
            if self.teacher_version == "match_s" and tv is not None and tv < version \
                    and staleness <= self.S:
                consumed.append(g.msg_id)
                self._count(counts, "teacher_rescored")
                await self._rescore(g, version)  # the task stays in flight
                await self._lagging(version, counts)
                continue
            consumed.append(g.msg_id)
            del self.state.inflight[k]
            if k in self.state.deferred:  # held earlier (maybe by a previous process)
                self.state.deferred.remove(k)
                self.state.replacements -= 1  # it takes the slot its replacement was for
            if staleness > self.S:
                self._count(counts, "stale")
                self.state.replacements += 1
                await self._lagging(version, counts)
                continue
            if zero_variance(g):
                if self.zero_variance == "keep":
                    self._count(counts, "zero_var_kept")
                    used.append(g)
                elif self.zero_variance == "backfill" and backfilled < self.backfill_max:
                    self._count(counts, "backfilled")
                    backfilled += 1
                    self.state.replacements += 1
                    continue
                else:
                    self._count(counts, "zero_var_dropped")
                    if slots == 1 and not used:
                        # Never an empty step (it would have no update, yet a version):
                        # the last slot waits for a group with signal, on a replacement.
                        self.state.replacements += 1
                        continue
                slots -= 1
                continue
            used.append(g)
            slots -= 1
        self._seen_versions.clear()
        used.sort(key=task_index)  # arrival order varies; the batch must not
        return Collected(groups=used, consumed=consumed, counts=counts,
                         wait_s=time.perf_counter() - t0, admitted=not deferred_admission)

    def _at_hand(self, version: int) -> int:
        """The groups that can be taken without waiting (arrived, or held back and now due)."""
        return self.inbox.pending() + sum(newest_version(g) <= version for g in self.deferred)

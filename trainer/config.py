"""TrainerConfig: every knob of the trainer process. Section `trainer` of the run's config,
resolved with the rest (protocol/config.py: `--set trainer.push.every=2`, or its environment
form `RLRT_TRAINER__PUSH__EVERY=2`; the top-level `model` and `data` fill model_path and data).

    trainer:
      model_path: runs/boot/model
      algorithm: {preset: rlrt, eps_w: 0.5}
      prompts_per_step: 16
      group_size: 8
      sampling: {max_new_tokens: 64, temperature: 1.0}
      lr: 1.0e-6
      push: {services: [{name: rollout, url: "http://127.0.0.1:8101"}]}
      checkpoint: {every: 10}
      total_steps: 200

Sub-sections are plain pydantic models; their fields are documented where declared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from pydantic_settings import SettingsConfigDict

from protocol.config import DEFAULT_RUN_DIR, RLRTSettings, Secret, trainer_output_dir
from protocol.messages import SamplingParams
from tasks.data import DataConfig
from trainer.algorithm import AlgorithmConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceEndpoint(_Section):
    """One service the trainer pushes weights to (POST {url}/v1/weights)."""

    name: str = Field(description="for logs and metrics, e.g. 'rollout' or 'teacher'")
    url: str = Field(description="base URL of the service's control API, e.g. http://127.0.0.1:8101")
    engine: Literal["sglang", "vllm"] | None = Field(
        None,
        description="nccl mode only: the kind of inference server behind the service, which "
        "decides how the trainer joins the update group (torch group for SGLang, vLLM's "
        "PyNccl helper for vLLM); docs/engines.md",
    )
    engine_world_size: int | None = Field(
        None,
        ge=1,
        description="nccl mode only: GPUs of that server in its update group; None = ask the "
        "service (GET /v1/version -> engine.engine_world_size). When the server reports its own "
        "(vLLM, SGLang), a value here that disagrees is a config error, raised before any "
        "rendezvous",
    )


class DiskPush(_Section):
    """`push.mode: disk` (the default), and what every push mode shares: new weights reach the
    services after an optimizer step as an atomic safetensors directory (sha256 manifest)
    whose path is POSTed to each service's /v1/weights (trainer/transports/disk.py)."""

    mode: Literal["disk"] = Field(
        "disk",
        description="how weights travel, each mode with its own knobs: disk (CPU and GPU; this "
        "one) or nccl (GPU: broadcast into the services' SGLang / vLLM servers, NcclPush; "
        "docs/trainer.md, docs/engines.md)",
    )
    every: int = Field(1, ge=1, description="push after every `every` optimizer steps")
    services: list[ServiceEndpoint] = Field(
        default_factory=list, description="services to update; empty = none (offline training)"
    )
    control_token: Secret | None = Field(
        None, description="bearer token of the services' control API (the run's control_token); "
        "saved configs show it as '**********'"
    )
    weights_dir: str | None = Field(
        None, description="where pushed weight directories go; None = <output_dir>/weights"
    )
    keep: int = Field(
        2, ge=1, description="pushed weight directories kept on disk (a service may still be loading the previous one)"
    )
    overlap: bool = Field(
        True,
        description="disk pushes: write the directory before the next optimizer step, then let "
        "the services load it in the background (the trainer waits for it at the start of "
        "the next step, before publishing that step's prompts, and at the end). A service drains its "
        "in-flight generations before swapping weights, so a synchronous push waits for them. "
        "With overlap the step's push_notify_s / push_ok / push_failed describe the previous "
        "push; push_wait_s is what waiting for it cost. Off: every push completes in its step",
    )
    fsync: bool = Field(
        False,
        description="fsync pushed weight directories. Off by default: they are transient (a "
        "crashed run re-pushes from its checkpoint) and the rename stays atomic, so readers "
        "never see a partial directory; fsync would otherwise dominate the push on a CPU run. "
        "Checkpoints and the final export are always fsync'd",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="dtype of pushed weights; auto = the training dtype"
    )
    on_start: bool = Field(
        True,
        description="push the current weights once before the first step (brings a restarted "
        "service, or one left at a newer version by a killed run, to the trainer's version)",
    )
    timeout_s: float = Field(
        300.0, gt=0, description="per-request HTTP timeout of one /v1/weights call"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="HTTP connect timeout")
    retries: int = Field(3, ge=1, description="attempts per service before the push is reported failed")
    retry_backoff_s: float = Field(1.0, ge=0, description="first retry delay (doubles, capped at 30 s)")
    deadline_s: float = Field(
        900.0, gt=0, description="hard bound on one push to all services, retries included"
    )
    on_failure: Literal["warn", "raise"] = Field(
        "warn",
        description="a service still failing after its retries: warn = report (log + metrics) "
        "and keep training (its samples turn stale and are dropped); raise = stop the run",
    )
    catch_up: bool = Field(
        True,
        description="groups that come back stale or scored by an older teacher (one step's "
        "worth, prompts_per_step, at a time) may mean a service serves older weights than it "
        "was pushed: restarted on its base weights, or down for longer than a push's retries. "
        "The trainer then asks every service which version it serves (GET /v1/version) and "
        "pushes the current weights to those behind, by disk. Off: such a service stalls the "
        "run until the driver stops it (max_dropped_per_step)",
    )
    canary: bool = Field(
        True,
        description="send a weight canary with every push: the policy's log-probs of a few fixed "
        "token sequences under the pushed weights (one small forward). Each service scores them "
        "after loading and refuses the version (409, reported in the push result) when they "
        "differ: it catches a load that reported success but serves other weights",
    )
    canary_sequences: int = Field(4, ge=1, le=64, description="canary: number of sequences")
    canary_tokens: int = Field(32, ge=2, le=1024, description="canary: tokens per sequence")
    bucket_mb: float = Field(
        512, gt=0, description="size of one bucket of gathered weights, in MiB (sized by "
        "ds_numel): a ZeRO-3 gather holds one bucket at a time; nccl mode broadcasts per bucket"
    )
    # The rendezvous address is a fact of the deployment, not of the mode: compose and the
    # Kubernetes manifests set it for either mode, so that switching to nccl is one line.
    master_address: str = Field(
        "127.0.0.1", description="nccl mode: address the trainer's rendezvous store listens on "
        "(accepted in disk mode, unused)"
    )
    master_port: int = Field(
        29600, ge=1, le=65535, description="nccl mode: first port (one per engine: port + index; "
        "accepted in disk mode, unused)"
    )

    @model_validator(mode="before")
    @classmethod
    def _other_modes_knobs(cls, values: Any) -> Any:
        """A knob of another mode: say which mode it belongs to (pydantic would say only
        'extra inputs are not permitted')."""
        if isinstance(values, dict):
            mode = values.get("mode", "disk")
            for other in _PUSH_MODES.values():
                wrong = sorted(set(values) & (set(other.model_fields) - set(cls.model_fields)))
                if wrong:
                    raise ValueError(
                        f"push.{', push.'.join(wrong)}: knob(s) of push.mode "
                        f"{other.model_fields['mode'].default}, and this push is mode {mode}: "
                        "remove them, or set that mode")
        return values


class NcclPush(DiskPush):
    """`push.mode: nccl` (GPU only): broadcast the buckets into the services' SGLang / vLLM
    servers over an NCCL group per service, after POSTing the bucket list (format nccl) to
    each service's /v1/weights; the first push, every `disk_every`-th, and a retry for any
    service an NCCL push failed go by disk (trainer/transports/fallback.py)."""

    mode: Literal["nccl"] = Field(  # type: ignore[assignment]
        "nccl", description="nccl: the NCCL broadcast with its disk fallback (see DiskPush.mode)"
    )
    disk_every: int = Field(
        10,
        ge=0,
        description="every n-th push goes by disk instead (and the first one, and a retry for "
        "any service an NCCL push failed): the directory a failed NCCL update rolls back to "
        "(docs/engines.md); 0 = only the first and the fallbacks",
    )
    nccl_timeout_s: float = Field(600.0, gt=0, description="group init / broadcast timeout")
    nccl_backend: Literal["nccl", "gloo"] = Field(
        "nccl",
        description="SGLang-kind services: torch backend of the update group; gloo only to "
        "exercise the same sequence on CPU (tests)",
    )

    @model_validator(mode="after")
    def _engines_named(self) -> NcclPush:
        for s in self.services:
            if s.engine is None:
                raise ValueError(f"push.mode=nccl needs engine (sglang|vllm) for service {s.name!r}")
        return self


_PUSH_MODES: dict[str, type[DiskPush]] = {"disk": DiskPush, "nccl": NcclPush}


def _push_mode(value: Any) -> str:
    """The mode of a push section (a mapping from YAML/env, or a model); unset = disk."""
    mode = value.get("mode", "disk") if isinstance(value, dict) else getattr(value, "mode", "disk")
    return mode if mode in _PUSH_MODES else str(mode)


# The `push` section: one model per mode, chosen by `mode` (a pydantic discriminated union);
# trainer/transports/__init__.py (make_transport) builds the matching WeightTransport.
PushConfig = Annotated[
    Annotated[DiskPush, Tag("disk")] | Annotated[NcclPush, Tag("nccl")],
    Discriminator(_push_mode),
]


class CheckpointConfig(_Section):
    """Resumable checkpoints: model, optimizer, scheduler, RNG, data cursor, in-flight state."""

    dir: str | None = Field(None, description="None = <output_dir>/checkpoints")
    every: int = Field(
        50, ge=0, description="checkpoint every `every` steps (0 = only at SIGTERM and at the end)"
    )
    keep: int = Field(2, ge=1, description="completed checkpoints kept on disk")
    on_sigterm: bool = Field(True, description="write a checkpoint when SIGTERM/SIGINT arrives")


class WandbConfig(_Section):
    """Weights & Biases logging (optional extra: `pip install 'rlrt[wandb]'`). Off unless
    `project` is set. The run's id is kept in <output_dir>/wandb-run-id, so a resumed run
    continues the same W&B run."""

    project: str | None = Field(
        None, description="W&B project; None = $WANDB_PROJECT, and without it no W&B logging")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online: stream to the server (WANDB_API_KEY or `wandb login`); "
        "offline: write <output_dir>/wandb only, no key needed (upload later with `wandb "
        "sync`); disabled: no-op. None = $WANDB_MODE, else online",
    )
    entity: str | None = Field(
        None, description="W&B team or user; None = $WANDB_ENTITY, else your default entity")
    name: str | None = Field(None, description="run name; None = the trainer's run_id")
    group: str | None = Field(None, description="W&B group (e.g. one per study)")
    tags: list[str] = Field(default_factory=list, description="W&B tags")


class MetricsConfig(_Section):
    tensorboard: bool = Field(True, description="write TensorBoard events to <output_dir>/tb")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases (off by default)")
    prometheus_port: int | None = Field(
        None, ge=0, le=65535, description="serve Prometheus /metrics on this port (0 = any free port); None = off"
    )
    prometheus_host: str = Field(
        "127.0.0.1", description="bind address of that server (loopback by default; a "
        "Kubernetes scrape needs 0.0.0.0, which the manifests set)")
    progress: bool = Field(True, description="rich progress bar with ETA on stderr")
    log_every: int = Field(1, ge=1, description="print a one-line summary every n steps")


class TrainerConfig(RLRTSettings):
    """The trainer process: model, data, batch, optimizer, staleness, pushes, checkpoints."""

    section: ClassVar[str] = "trainer"
    model_config = SettingsConfigDict(env_prefix="RLRT_TRAINER__")

    run_id: str = Field("rlrt", description="run id stamped on every PromptTask (and its ids)")
    model_path: str = Field(description="local HF causal LM directory (config.json + safetensors)")
    tokenizer_path: str | None = Field(None, description="None = model_path")
    algorithm: AlgorithmConfig = Field(
        default_factory=AlgorithmConfig, description="preset and knobs (trainer/algorithm)"
    )
    data: DataConfig = Field(
        default_factory=DataConfig,
        description="the run's top-level `data` section (put here by protocol/config.py resolve); set "
        "here only to train on other data than the run evaluates and serves",
    )

    # ---- batch -------------------------------------------------------------------------------
    prompts_per_step: int = Field(8, ge=1, description="groups (prompts) per optimizer step")
    group_size: int = Field(8, ge=1, description="G: responses sampled per prompt")
    sampling: SamplingParams = Field(
        default_factory=SamplingParams,
        description="sent with every PromptTask; a set `seed` becomes seed + task index",
    )
    max_seq_len: int | None = Field(
        None, ge=2, description="prompt + response token cap; None = the model's max_position_embeddings"
    )
    micro_batch_size: int = Field(
        4, ge=1, description="sequences per forward/backward (gradient accumulation over them)"
    )
    ppo_mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="prompts (whole groups) per optimizer update, verl's ppo_mini_batch_size: "
        "a step of prompts_per_step prompts makes ceil(prompts_per_step / this) updates per "
        "epoch, all against the same pi_old (s_t recomputed once, with the weights that begin "
        "the step), so the PPO clip binds from the second update on; None = one update per "
        "step (the ratio is then exactly 1)",
    )
    ppo_epochs: int = Field(
        1, ge=1, description="passes over the step's mini-batches (verl's ppo_epochs)"
    )
    logprob_chunk_size: int = Field(
        1024, ge=1, description="rows of hidden states per lm_head chunk (bounds the [N,V] logits)"
    )
    old_logprobs: Literal["reuse", "recompute"] = Field(
        "reuse",
        description="how s_t (the behaviour policy's log-probs) is obtained: recompute = a "
        "separate no-grad pass over the batch before the update; reuse = from the update's "
        "own forward, detached, before each micro-batch's loss: identical values when the "
        "step is ONE optimizer update (the weights do not move in between), one pass fewer. "
        "With several updates per step (ppo_mini_batch_size, ppo_epochs) s_t is always "
        "recomputed, whatever this says",
    )
    ref_model_path: str | None = Field(
        None,
        description="the frozen reference policy of the KL term (algorithm.kl_coef > 0), a "
        "local HF directory; None = model_path (the initial weights, as verl and TRL)",
    )
    logprob_temperature: float | None = Field(
        None,
        gt=0,
        description="temperature the trainer's log-probs divide logits by; None = "
        "sampling.temperature (1.0 when greedy). Must match how the engine reports log-probs",
    )
    gradient_checkpointing: bool = Field(False, description="HF activation checkpointing")
    share_prompts: bool = Field(
        True,
        description="rows of a micro-batch that share a prompt (a GRPO group) run it once: the "
        "decoder keeps the prompt's keys/values and runs only the response tokens per row "
        "(trainer/algorithm/shared_prompt.py); the same log-probs and gradients up to float "
        "rounding, (G-1)/G of the prompt tokens' work saved. Checked against the plain forward "
        "on the first shared micro-batch (off, with a warning, if they differ). One trainer "
        "process only (ranks deciding apart would ready gradients in different orders for "
        "ZeRO's reductions) and not with activation checkpointing",
    )

    # ---- optimizer ---------------------------------------------------------------------------
    lr: float = Field(1e-6, gt=0, description="AdamW peak learning rate (paper: 1e-6)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up from 0 (paper: 10)")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after warm-up: constant, or decay to min_lr_ratio * lr by total_steps"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="floor of cosine / linear decay")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay (paper: 0.01); not on biases/norms")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW eps")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping by global norm; 0 = off")

    # ---- engine ------------------------------------------------------------------------------
    zero_stage: Literal[0, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 0 (replicated), 2 (sharded optimizer + grads), 3 (+ params)"
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="training dtype; auto = bf16 on GPU, fp32 on CPU"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available (nccl), else cpu (gloo)"
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU: torch intra-op threads; None = torch's default. On a CPU shared with "
        "the services, 1-2 avoids OpenMP oversubscription (tiny models run 10-50x slower "
        "oversubscribed)",
    )
    idle_threads: int | None = Field(
        None,
        ge=1,
        description="CPU, one trainer process: torch threads of the update once every admitted "
        "group has arrived (the rollout, verifier and teacher then idle until the next push); "
        "torch_threads until then. On one machine shared with the services (rlrt train) the "
        "update takes the cores sampling left idle (trainer/threads.py). None = torch_threads "
        "throughout; ignored with deterministic or more than one rank",
    )
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms: bitwise-reproducible CPU runs"
    )

    # ---- data flow ---------------------------------------------------------------------------
    max_staleness: int = Field(
        1,
        ge=0,
        description="a group sampled at policy version v is trained at version t only if "
        "t - v <= max_staleness; tasks are admitted at most this many versions ahead",
    )
    zero_variance: Literal["keep", "drop", "backfill"] = Field(
        "keep",
        description="groups that carry no signal (every advantage 0: equal rewards, for the "
        "reward-based estimators): keep them in the batch with A = 0 (verl's GRPO; they count "
        "in the token-mean denominator), drop them (smaller step), or drop and admit a "
        "replacement prompt (DAPO's dynamic sampling, bounded by backfill_max)",
    )
    backfill_max: int = Field(
        8, ge=0, description="backfill: at most this many replacement prompts per step"
    )
    max_dropped_per_step: int | None = Field(
        None,
        ge=1,
        description="unusable groups (too stale, or from weights newer than the trainer's) "
        "tolerated while collecting one step before the run stops with an error naming the "
        "versions seen; None = 8 * (max_staleness + 1) * prompts_per_step",
    )
    dead_letter_tolerance: float = Field(
        0.0, ge=0.0, le=1.0,
        description="share of the admitted groups a service may dead-letter (e.g. a reward "
        "function that raises on some responses) before the run stops; 0 = the first one stops "
        "it within seconds, with its error and where its traceback is (trainer/driver.py). "
        "Groups lost within the tolerance are replaced",
    )
    max_groups_without_context: int = Field(
        32,
        ge=1,
        description="a teacher preset whose context comes from the data (context_mode "
        "reference_solution / reference_answer, e.g. opsd): this many consecutive prompts "
        "without that field stop the run with the reason, instead of training on advantages "
        "that are all 0 (opsd) or never re-weighted",
    )
    wait_timeout_s: float = Field(
        900.0,
        gt=0,
        description="longest wait for the next ScoredGroup before the run fails with an error "
        "naming the stream and the tasks in flight (never hang)",
    )
    publish_timeout_s: float = Field(60.0, gt=0, description="longest wait to publish one PromptTask")

    # ---- run ---------------------------------------------------------------------------------
    total_steps: int = Field(100, ge=1, description="optimizer steps of the run")
    seed: int = Field(0, description="seeds data order, sampling seeds and torch")
    output_dir: str = Field(
        trainer_output_dir(DEFAULT_RUN_DIR),
        description="metrics, weights, checkpoints, final model; a resolved config defaults it "
        "to <run.dir>/trainer (protocol/config.py), so a run's outputs share its one folder",
    )
    export_final: bool = Field(True, description="save_pretrained the final model to <output_dir>/final")
    push: PushConfig = Field(
        default_factory=DiskPush, description="how new weights reach the services: push.mode "
        "disk (default) or nccl, each with its own knobs (DiskPush, NcclPush)")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    teacher_service: bool = Field(
        True, description="a teacher service scores this run's groups: the trainer reads its "
        "ScoredGroups. false: no teacher runs and the trainer reads the verifier's groups "
        "directly (protocol/topology.py trainer_input); only for presets that never score "
        "(algorithm teacher scope none: grpo, dr_grpo), for which `rlrt train` sets it")

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        alg = self.algorithm
        if not self.teacher_service and alg.scope != "none":
            raise ValueError(
                f"trainer.teacher_service: false, but preset {alg.preset!r} needs teacher scores "
                f"(teacher scope {alg.scope!r}): run a teacher service")
        if not self.teacher_service and alg.teacher_version_rule == "match_s":
            raise ValueError(
                "trainer.teacher_service: false, but algorithm.teacher_version is match_s: its "
                "re-score requests need a teacher service to answer them (use teacher_version: "
                "any, or run a teacher)")
        if (alg.uses_teacher and alg.teacher_temperature is None
                and self.sampling.temperature not in (0.0, 1.0)):
            raise ValueError(
                f"preset {alg.preset!r} compares s_t (at the sampling temperature "
                f"{self.sampling.temperature}) with the teacher's q_t, which the engines score "
                "at temperature 1: set algorithm.teacher_temperature: 1.0 to accept that "
                "mismatch explicitly, or sample at temperature 1")
        if alg.teacher_version_rule == "match_s" and self.push.every != 1:
            raise ValueError(
                f"algorithm.teacher_version=match_s (the default of preset {alg.preset!r}) needs "
                f"push.every: 1 -- with push.every={self.push.every} the teacher never serves "
                "the version of s_t; set algorithm.teacher_version: any to accept a lagging "
                "teacher (reported as teacher_version_lag)")
        return self

    # ---- derived paths -------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def weights_root(self) -> Path:
        return Path(self.push.weights_dir) if self.push.weights_dir else self.out / "weights"

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.out / "checkpoints"

    @property
    def temperature(self) -> float:
        if self.logprob_temperature is not None:
            return self.logprob_temperature
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0

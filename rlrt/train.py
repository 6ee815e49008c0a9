"""`rlrt train` and `rlrt eval`: a prepared run (rlrt/launch.py), its processes kept by the
supervisor (rlrt/supervisor.py), the evaluation before, during and after training, the report.

    run-dir lock, Redis directory  ->  preflight  ->  embedded Redis  ->  services
      ->  held-out eval  ->  trainer (evaluations as its steps come)  ->  held-out eval  ->  report

Where the run cannot go on, the last line says why and gives the `--resume` command. Ctrl-C
stops everything in order and leaves no process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from protocol.config import redact_url
from rlrt.disk_space import disk_full_at, disk_full_line, disk_paths
from rlrt.eval_runner import EvalRunner
from rlrt.evaluate import EvalError
from rlrt.launch import LaunchError, LocalRun
from rlrt.plan import RunPlan
from rlrt.run_config import EvalSet
from rlrt.supervisor import STALLED, Supervisor, claim_redis_dir, own_redis
from tasks.data import DataError
from trainer.disk import EXIT_DISK_FULL, is_disk_full
from trainer.output_lock import DirBusy, take_lock

RUN_LOCK = "run.lock"  # in the run directory, held by the launcher for the whole run


def lock_run_dir(run_dir: Path) -> int:
    """One `rlrt train` per run directory: two would share ports' fallbacks, one Redis, one
    trainer folder. The descriptor holds the lock until the launcher exits (however it exits:
    the kernel drops a flock with its holder)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return take_lock(run_dir / RUN_LOCK)
    except DirBusy as e:
        raise LaunchError(f"another `rlrt train` (pid {e.holder}) is running in {run_dir}: one "
                          "run per run directory. Stop it first, or give this run its own "
                          "run.dir") from None


def stop_reason(code: int, plan: RunPlan, *, redis_problem: str | None, own_redis: bool) -> str:
    """The last line of a run whose trainer exited with `code` != 0: what stopped it and the
    command that continues it."""
    again = plan.resume_command
    if code == EXIT_DISK_FULL:
        return f"the trainer stopped: {disk_full_line(plan, plan.trainer_out)}"
    if redis_problem is not None and own_redis:  # ours: the next run restarts it
        return (f"lost Redis ({redis_problem}); the run stopped at its last checkpoint. "
                f"Continue with: {again}")
    if redis_problem is not None:
        return (f"lost Redis at {redact_url(plan.cfg['bus'].redis_url)} ({redis_problem}); the "
                f"run stopped at its last checkpoint. Once Redis is back: {again}")
    if code == STALLED:
        return (f"the run stalled: no training step for {plan.cfg['run'].stall_stop_s:.0f} s "
                f"(run.stall_stop_s; the diagnosis is above). Continue with: {again}")
    return f"the trainer exited with code {code}; see the messages above. Continue with: {again}"


def eval_runner(run: LocalRun, sup: Supervisor, sets: list[EvalSet] | None = None,
                out: str = "eval.jsonl") -> EvalRunner:
    """The evaluation sets against this run's rollout and verifier services; results are
    appended to <run dir>/<out>."""
    from transformers import AutoTokenizer

    from protocol.bus import Bus
    from rlrt.evaluate import evaluate

    plan = sup.plan
    tok = AutoTokenizer.from_pretrained(str(run.model_path))
    stream = plan.cfg["bus"].stream(plan.cfg["rollout"].in_stream)

    def one(rows: list, **kw: Any) -> dict:
        async def go() -> dict:
            bus = Bus.from_url(sup.redis_url, plan.cfg["bus"])
            try:
                return await evaluate(rows, tokenizer=tok, bus=bus, prompts_stream=stream,
                                      verifier_url=plan.url("verifier"), token=plan.token,
                                      seed=run.run.seed, reward=plan.cfg["reward"].enabled, **kw)
            finally:
                await bus.close()
        return asyncio.run(go())

    trainer = plan.cfg["trainer"]
    return EvalRunner(run.eval_sets if sets is None else sets, run_data=trainer.data,
                      sampling=trainer.sampling, seed=run.run.seed, evaluate=one,
                      out=run.run_dir / out, log=run.console.print,
                      # The training run's evaluations go beside the trainer's curves.
                      tb_dir=Path(trainer.output_dir) / "tb"
                      if out == "eval.jsonl" and trainer.metrics.tensorboard else None)


def evaluate_once(run: LocalRun, sets: list[EvalSet]) -> dict[str, dict]:
    """`rlrt eval`: start Redis + rollout + verifier, evaluate `sets`, stop."""
    if not sets:
        raise LaunchError("nothing to evaluate: the config has no eval sets and no --data was given")
    run.run_dir.mkdir(parents=True, exist_ok=True)
    plan = run.preflight()
    if not run.model_path.exists():
        raise LaunchError(f"model directory {run.model_path} does not exist")
    redis = own_redis(plan.cfg["bus"].redis_url, plan.run_dir, plan.cfg["run"])
    sup = Supervisor(plan, console=run.console, redis=redis,
                     engine_servers=run.engine_servers)
    runner = eval_runner(run, sup, sets, out="eval-cli.jsonl")  # not the training run's log
    for es in sets:  # a bad data set fails before anything starts
        try:
            runner.rows(es)
        except (DataError, ValueError) as e:
            raise LaunchError(f"eval set {es.name!r}: {e}") from None
    try:
        sup.start_redis()
        sup.start_services()
        with run.console.status("evaluating ..."):
            return runner.run_all("eval", 0)
    finally:
        sup.stop_all()


def _before(run: LocalRun, evals: EvalRunner, shared: dict | None) -> dict:
    """The before-training evaluation: `shared` (measured by another run on this very model,
    prompts and sampling seed: `rlrt experiment` measures it once), a resumed run's own, or
    measured now."""
    path = run.run_dir / "eval_before.json"
    if shared is not None:
        path.write_text(json.dumps(shared, indent=2))
        evals.record(shared, "shared: same model, prompts and sampling seed as the run that measured it")
        run.console.print("before-training evaluation: reused (same model, prompts and sampling "
                          "seed as the run that measured it)")
        return shared
    if run.resume and path.exists():
        return json.loads(path.read_text())
    result = evals.run_all("before training", 0)
    if result:
        path.write_text(json.dumps(result, indent=2))
    return result


def train(run: LocalRun, evals_before: dict | None = None) -> dict:
    """The whole training run (see the module docstring); returns the report's dict."""
    lock = lock_run_dir(run.run_dir)  # first: a second launcher must not touch anything
    try:
        # Liveness before the checks: a run whose Redis is still up is named as such, not as
        # whatever its half-written state makes the preflight say.
        redis = own_redis(run.cfg["bus"].redis_url, run.run_dir, run.cfg["run"])
        if redis is not None:
            claim_redis_dir(redis)
        try:
            # A resume on a disk still full: named now, before a part dies of it unheard.
            before = run.make_plan()
            full = disk_full_at(disk_paths(before))
            if full is not None:
                raise LaunchError(disk_full_line(before, full))
            plan = run.preflight()
            run.bootstrap_if_needed()
        except BaseException:
            if redis is not None:
                redis.stop()  # frees the directory's lock
            raise
        sup = Supervisor(plan, console=run.console, redis=redis, engine_servers=run.engine_servers)
        return _train(run, sup, evals_before)
    except OSError as e:  # the launcher's own writes (resolved config, logs, report)
        if not is_disk_full(e):
            raise
        raise LaunchError(disk_full_line(run.make_plan(), e.filename or run.run_dir)) from None
    finally:
        os.close(lock)


def _train(run: LocalRun, sup: Supervisor, shared_before: dict | None) -> dict:
    plan = sup.plan
    # SIGTERM behaves like Ctrl-C: stop in order.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report: dict[str, Any] = {"config": str(run.config_path), "run_dir": str(run.run_dir)}
    total = plan.cfg["trainer"].total_steps
    try:
        sup.start_redis()
        sup.start_services()
        evals = eval_runner(run, sup)
        if not run.resume:  # a fresh run in an old run directory starts a fresh log
            evals.out.unlink(missing_ok=True)
        report["evals_before"] = _before(run, evals, shared_before)
        t0 = time.perf_counter()
        sup.start_trainer()
        code = sup.supervise(lambda step: evals.poll(step, total))
        evals.wait()
        report["train_seconds"] = time.perf_counter() - t0
        report["trainer_exit_code"] = code
        if code != 0:
            raise LaunchError(stop_reason(code, plan, redis_problem=sup.redis_problem(),
                                          own_redis=sup.redis is not None))
        report["evals_after"] = evals.run_all("after training", total)
        # The first set's results, under the names the experiment table reads.
        first = run.eval_sets[0].name if run.eval_sets else None
        report["eval_before"] = report["evals_before"].get(first)
        report["eval_after"] = report["evals_after"].get(first)
    except EvalError as e:  # a user's bug met by the evaluation: one line, not a traceback
        raise LaunchError(f"evaluation: {e}") from None
    except KeyboardInterrupt:
        run.console.print("[yellow]interrupted: stopping the trainer, the services and Redis[/]")
        raise
    finally:
        sup.stop_all()
    from rlrt.report import write_report

    write_report(run.run_dir, plan.cfg["trainer"], report, console=run.console)
    return report

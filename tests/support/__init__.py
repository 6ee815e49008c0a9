"""The tests' one support package, imported as `support.` (pyproject's pytest `pythonpath` puts
tests/ on the path; subprocesses get tests/ on PYTHONPATH). Shared fixtures are in
tests/conftest.py, not here.

- Models and data: tokenizer.py (the char-level tokenizer), tiny_model.py (the one tiny-model
  factory, on trainer/bootstrap), groups.py (hand-made groups), update_case.py, tiny_tasks.py,
  inspect_task.py.
- Fake engines, each checked against the released upstream sources (upstream.py): fake_sglang.py,
  fake_vllm.py, fake_controls.py (what both share), fake_engines.py (handles on them), tiny_lm.py
  (the model behind them), reference_logprobs.py (independent numbers to compare with).
- Real servers and processes: serve.py (uvicorn on 127.0.0.1), services.py, verifier_live.py,
  vllm_server.py, trainer_standin.py, and the subprocess entry points bus_consumer.py,
  demo_service.py, nccl_receiver.py, rendezvous_roles.py, zero_worker.py.
- Waiting: polling.py (`wait_until`; no sleep races).
"""

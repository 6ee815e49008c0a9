"""The fixed training case shared by the update tests and the multi-process ZeRO worker:
a tiny batch (two mixed groups with teacher scores, one all-correct group) and the config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from support.groups import scored_group

from trainer.batch import TrainBatch, build_batch
from trainer.config import TrainerConfig

STEPS = 2


def case_batch() -> TrainBatch:
    rng = np.random.default_rng(0)
    groups = [scored_group([1, 0, 1, 0], rng=rng, teacher_rows=[0, 2], task_index=0),
              scored_group([0, 0, 1, 0], rng=rng, teacher_rows=[2], task_index=1),
              scored_group([1, 1, 1, 1], rng=rng, task_index=2)]
    return build_batch(groups, version=0, pad_id=0)


def case_config(model_dir: str | Path, **kw: object) -> TrainerConfig:
    base: dict[str, object] = dict(model_path=str(model_dir), lr=5e-3, warmup_steps=0,
                                   max_grad_norm=0.5, micro_batch_size=3,
                                   algorithm={"preset": "rlrt"}, zero_stage=0)
    return TrainerConfig(**{**base, **kw})

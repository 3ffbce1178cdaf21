"""A tiny training run for tests of the loop itself: a linear model on fixed batches."""

import time
from pathlib import Path

import torch
from torch import nn

from evlm_cli.core.config import OptimConfig
from evlm_cli.training.loop import Optim, Run, adamw

FEATURES, BATCH = 4, 8


class FixedBatches:
    """`count` batches per epoch, the same every epoch; each takes `delay` seconds to arrive."""

    def __init__(self, count: int, delay: float = 0.0):
        g = torch.Generator().manual_seed(0)
        self.batches = [{"x": torch.randn(BATCH, FEATURES, generator=g),
                         "y": torch.randn(BATCH, 1, generator=g)} for _ in range(count)]
        self.delay = delay

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, epoch: int, start: int = 0):
        for batch in self.batches[start:]:
            if self.delay:
                time.sleep(self.delay)
            yield batch


def linear_run(work_dir: Path, *, steps: int, checkpoint_every: int = 100,
               batches: FixedBatches | None = None, step_time: float = 0.0) -> Run:
    """Least squares with one linear layer for `steps` steps; each step's loss takes
    `step_time` seconds more to compute. The log goes to work_dir / "log.csv"."""
    torch.manual_seed(0)
    model = nn.Linear(FEATURES, 1)
    optim_cfg = OptimConfig(epochs=1, batch_size=BATCH, lr=1e-2, weight_decay=0.0,
                            warmup_ratio=0.0, grad_clip=1.0, checkpoint_every=checkpoint_every,
                            max_steps=steps, answer_balance=0.0)

    def loss(batch, step, total):
        if step_time:
            time.sleep(step_time)
        value = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return value, {}

    return Run(modules={"model": model}, optims=[Optim(adamw(model.parameters(), optim_cfg))],
               loss=loss, batches=batches or FixedBatches(4), optim_cfg=optim_cfg,
               work_dir=work_dir / "work", log_path=work_dir / "log.csv", desc="linear")

"""The training loop's pieces that stages configure: optimiser settings and run setup."""

from dataclasses import replace

import torch

from evlm_cli.core.config import OptimConfig
from evlm_cli.training.loop import adamw, setup, total_steps

BASE = OptimConfig(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.01, warmup_ratio=0.1,
                   grad_clip=1.0, checkpoint_every=100, max_steps=None, answer_balance=0.0)


def optim(**changes) -> OptimConfig:
    return replace(BASE, **changes)


def test_adamw_takes_the_configured_lr_even_zero():
    params = [torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))]
    assert adamw(params, optim(lr=0.0)).param_groups[0]["lr"] == 0.0
    assert adamw(params, optim(lr=0.5), lr=0.0).param_groups[0]["lr"] == 0.0
    groups = adamw(params, optim(lr=0.5, weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # no decay on 1-D tensors


def test_total_steps_from_epochs_or_max_steps():
    assert total_steps(optim(epochs=1.5), 10) == 15
    assert total_steps(optim(epochs=3, max_steps=4), 10) == 4
    assert total_steps(optim(epochs=0), 10) == 0


def test_setup_seeds_and_picks_the_device():
    assert setup(5, None, "cpu").type == "cpu"
    first = torch.rand(3)
    setup(5, None, "auto")
    assert torch.equal(first, torch.rand(3))

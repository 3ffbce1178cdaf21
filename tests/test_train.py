"""The training loop's pieces that stages configure: optimiser settings and run setup."""

from dataclasses import replace

import torch

from evlm_cli.core.config import OptimConfig
from evlm_cli.training.loop import (
    CHECKPOINT,
    Callback,
    adamw,
    callbacks_installed,
    fit,
    setup,
    total_steps,
)
from tests.helpers.training import linear_run

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


def test_setup_seeds_the_generator():
    setup(5, None, "cpu")
    first = torch.rand(3)
    setup(5, None, "cpu")
    assert torch.equal(first, torch.rand(3))
    setup(6, None, "cpu")
    assert not torch.equal(first, torch.rand(3))


def test_setup_switches_torch_to_its_deterministic_kernels_warning_where_it_has_none():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        setup(0, None, "cpu")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_auto_picks_cuda_when_there_is_one_and_the_cpu_otherwise(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup(5, None, "auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup(5, None, "auto") == torch.device("cpu")
    # a device named in the spec is taken as it is
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert setup(5, None, "cpu") == torch.device("cpu")


class Recorder(Callback):
    """What the loop shows its callbacks, and when."""

    def __init__(self):
        self.calls = []

    def after_backward(self, step, run):
        grad = run.modules["model"].weight.grad
        self.calls.append(("backward", step, None if grad is None else grad.clone()))

    def after_checkpoint(self, step, run):
        state = torch.load(run.work_dir / CHECKPOINT, weights_only=True)
        self.calls.append(("checkpoint", step, state["step"]))


def test_callbacks_see_each_steps_gradients_and_each_checkpoint_once_written(tmp_path):
    run = linear_run(tmp_path, steps=6, checkpoint_every=2)
    recorder = Recorder()
    fit(run, callbacks=[recorder])
    order = [(what, step) for what, step, _ in recorder.calls]
    # a checkpoint after steps 2 and 4 (the last step writes the outputs instead)
    assert order == [("backward", 0), ("backward", 1), ("checkpoint", 2), ("backward", 2),
                     ("backward", 3), ("checkpoint", 4), ("backward", 4), ("backward", 5)]
    assert all(saved == step for what, step, saved in recorder.calls if what == "checkpoint")
    # the gradient of step 0 is that of the loss on the first batch at the initial weights
    first = linear_run(tmp_path / "reference", steps=1)
    batch = first.batches.batches[0]
    first.loss(batch, 0, 1)[0].backward()
    torch.testing.assert_close(recorder.calls[0][2], first.modules["model"].weight.grad)


def test_installed_callbacks_reach_every_fit_inside_the_block_only(tmp_path):
    inside, outside = Recorder(), Recorder()
    with callbacks_installed(inside):
        fit(linear_run(tmp_path / "a", steps=2))
    fit(linear_run(tmp_path / "b", steps=2), callbacks=[outside])
    assert [step for _, step, _ in inside.calls] == [0, 1]
    assert [step for _, step, _ in outside.calls] == [0, 1]

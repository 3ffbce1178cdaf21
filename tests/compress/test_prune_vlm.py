"""Pruning a real (tiny) VLM the way the prune stage does: the Lagrangian meets its target, and
the deterministic masks slice into a smaller model that computes exactly what the gated one did."""

import pytest
import torch

from evlm_cli.compress.l0 import L0Gates, SparsityConstraint
from evlm_cli.compress.objective import TASK_ONLY, Objective
from evlm_cli.compress.slice import slice_model
from evlm_cli.core.config import OptimConfig
from evlm_cli.models.config import make_config
from evlm_cli.models.vlm import VLM, param_breakdown
from evlm_cli.training.loop import Optim, Run, adamw, fit, setup

NUM_ANSWERS, VOCAB, TEXT_LEN, BATCH = 4, 30, 6, 8
STEPS = 300
OPTIM = OptimConfig(epochs=1, max_steps=STEPS, batch_size=BATCH, lr=1e-3, weight_decay=0.01,
                    warmup_ratio=0.1, grad_clip=1.0, checkpoint_every=10 * STEPS,
                    answer_balance=0.0)
# Half the steps ramp the target up and half hold it, so the multipliers have time to settle.
WARMUP_FRACTION = 0.5
GATE_LR, LAGRANGIAN_LR = 0.1, 0.3


def tiny_vlm() -> VLM:
    cfg = make_config(vision=dict(layers=2, width=32, heads=4, ffn=64),
                      text=dict(layers=1, width=24, heads=3, ffn=48),
                      fusion=dict(layers=2, width=24, heads=3, ffn=48), image_size=16, patch_size=8,
                      vocab_size=VOCAB, max_positions=TEXT_LEN, heads=["vqa"],
                      num_answers=NUM_ANSWERS)
    return VLM(cfg)


class FixedBatches:
    """A few random VQA batches, the same every epoch (ragged text so masks matter)."""

    def __init__(self, count: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.batches = []
        for _ in range(count):
            mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
            lengths = torch.randint(2, TEXT_LEN + 1, (BATCH,), generator=g)
            mask[torch.arange(TEXT_LEN)[None] >= lengths[:, None]] = 0
            answers = torch.randint(0, NUM_ANSWERS, (BATCH,), generator=g)
            self.batches.append({
                "images": torch.randn(BATCH, 3, 16, 16, generator=g),
                "input_ids": torch.randint(1, VOCAB, (BATCH, TEXT_LEN), generator=g) * mask,
                "attention_mask": mask,
                "targets": torch.nn.functional.one_hot(answers, NUM_ANSWERS).float()})

    def __len__(self) -> int:
        return len(self.batches)

    def __call__(self, epoch: int, start: int = 0):
        yield from self.batches[start:]


def prune(target: float, work_dir, seed: int = 0):
    """Gates over heads and FFN, modal-adaptive constraint, three optimisers, driven by `fit`."""
    torch.manual_seed(seed)
    model = tiny_vlm()
    gates = L0Gates(model.prunable_groups(("heads", "ffn")))
    constraint = SparsityConstraint(gates, "modal-adaptive", target, WARMUP_FRACTION)
    objective = Objective(model, "vqa", TASK_ONLY, temperature=2.0, gates=gates,
                          constraint=constraint)
    optims = [Optim(adamw(model.parameters(), OPTIM)),
              Optim(torch.optim.AdamW(gates.parameters(), lr=GATE_LR, weight_decay=0.0),
                    after_step=gates.clamp_),
              Optim(constraint.ascent_optimizer(LAGRANGIAN_LR))]
    last = fit(Run(modules={"student": model, "gates": gates, "constraint": constraint},
                   optims=optims, loss=objective, batches=FixedBatches(seed=seed), optim_cfg=OPTIM,
                   work_dir=work_dir, desc="prune-test", seed=seed))
    return model, gates, last


@pytest.fixture(scope="module", params=[0.3, 0.5, 0.7], ids=lambda t: f"target{t}")
def pruned(request, tmp_path_factory):
    target = request.param
    model, gates, last = prune(target, tmp_path_factory.mktemp(f"prune{target}"))
    return target, model, gates, last


def test_lagrangian_brings_expected_sparsity_to_target(pruned):
    target, _, gates, last = pruned
    assert last["step"] == STEPS and last["target_sparsity"] == pytest.approx(target)
    with torch.no_grad():
        assert gates.expected_sparsity().item() == pytest.approx(target, abs=0.02)
    masks = gates.deterministic_masks()
    reached = 1 - gates.kept_params_from_masks(masks) / gates.total_params()
    assert reached == pytest.approx(target, abs=0.05)


def test_deterministic_masks_slice_exactly(pruned):
    _, model, gates, _ = pruned
    model.eval()
    gates.eval()
    values = gates.deterministic_values()
    sliced = slice_model(model, values).eval()
    batch = FixedBatches(count=1, seed=7).batches[0]
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        gated_logits = model.logits("vqa", model(*inputs, gates=gates()))
        sliced_logits = sliced.logits("vqa", sliced(*inputs))
    assert (gated_logits - sliced_logits).abs().max().item() < 1e-5
    removed = gates.total_params() - gates.kept_params_from_masks(gates.deterministic_masks())
    assert removed > 0
    assert param_breakdown(sliced)["total"] == param_breakdown(model)["total"] - removed


def test_stage_setup_makes_the_gates_initial_noise_reproducible():
    groups = tiny_vlm().prunable_groups()

    def initial_log_alpha(seed_first: bool) -> torch.Tensor:
        torch.seed()  # a stage process starts from an entropy-seeded generator
        if seed_first:
            setup(3, None, "cpu")
        return torch.cat([p.detach() for p in L0Gates(groups).log_alpha.values()])

    state = torch.get_rng_state()
    try:
        assert torch.equal(initial_log_alpha(True), initial_log_alpha(True))
        assert not torch.equal(initial_log_alpha(False), initial_log_alpha(False))
    finally:
        torch.set_rng_state(state)  # leave the other tests' generator as it was

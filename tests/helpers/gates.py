"""L0 gates in training for the tests: setting log_alpha, one optimisation step, and a toy
two-modality problem whose label depends on one modality only."""

import torch
from torch import nn

from evlm_cli.compress.l0 import L0Gates, SparsityConstraint
from evlm_cli.models.groups import PrunableGroup


def set_log_alpha(gates: L0Gates, name: str, values) -> None:
    with torch.no_grad():
        gates.log_alpha_of(name).copy_(torch.tensor(values))


def step_all(optimizers, loss, gates: L0Gates) -> None:
    """One step of every optimiser on `loss`, then the gates' log_alpha clamped."""
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    gates.clamp_()


class TwoModalityNet(nn.Module):
    """y = head(concat(gate_v * relu(W_v x_v), gate_t * relu(W_t x_t))), one gated layer each."""

    def __init__(self, inputs, hidden):
        super().__init__()
        self.vision, self.text = nn.Linear(inputs, hidden), nn.Linear(inputs, hidden)
        self.head = nn.Linear(2 * hidden, 1)

    def forward(self, x_vision, x_text, gates):
        return self.head(torch.cat([gates["vision.0.ffn"] * torch.relu(self.vision(x_vision)),
                                    gates["text.0.ffn"] * torch.relu(self.text(x_text))], -1))


def train_two_modalities(mode, steps=600, inputs=6, hidden=16, target=0.5, min_keep=0.0):
    """The label depends on the vision input only; returns the trained gates and constraint."""
    torch.manual_seed(0)
    true_weights = torch.randn(inputs, 1)
    net = TwoModalityNet(inputs, hidden)
    per_neuron = inputs + 2  # its row of W, its bias, its column of the head
    gates = L0Gates([PrunableGroup("vision.0.ffn", "vision", "ffn", 0, hidden, per_neuron),
                     PrunableGroup("text.0.ffn", "text", "ffn", 0, hidden, per_neuron)])
    constraint = SparsityConstraint(gates, mode, target=target, warmup_fraction=0.5,
                                    min_keep=min_keep)
    optimizers = [torch.optim.Adam(net.parameters(), lr=3e-2),
                  torch.optim.Adam(gates.parameters(), lr=0.1), constraint.ascent_optimizer(0.1)]
    for step in range(steps):
        x_vision, x_text = torch.randn(64, inputs), torch.randn(64, inputs)
        task = ((net(x_vision, x_text, gates()) - x_vision @ true_weights) ** 2).mean()
        step_all(optimizers, task + constraint.loss(step, steps), gates)
    return gates, constraint

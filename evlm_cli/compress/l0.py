"""Hard-concrete L0 gates over prunable groups, and the Lagrangian that holds them to a sparsity.

The maths follows Louizos et al. 2018 and CoFi (arXiv 2204.00408): a gate is a hard-concrete
variable, a sigmoid of logistic noise shifted by `log_alpha` and divided by a temperature
`beta`, stretched to (LIMIT_LOW, LIMIT_HIGH) and clamped to [0, 1], so exact zeros and ones
have positive probability while `log_alpha` stays differentiable.

One `L0Gates` serves every modality: vision, text and fusion differ only in the groups they
register. A group's units count towards the parameter budget with P(unit kept), times P(layer
kept) when a sublayer gate ("*_layer") covers them.

Gates start as CoFi and EfficientVLM start them: heads and sublayers almost surely kept, FFN
neurons undecided (`initial_log_alpha`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from evlm_cli.models.groups import LAYER_GATE_COVERS, PrunableGroup

BETA = 2.0 / 3.0  # temperature of the concrete distribution
LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1  # stretch interval, so that 0 and 1 get probability mass
# log_alpha is clamped here after each step. CoFi uses [log 1e-2, log 1e2] = [-4.6, 4.6], which
# floors P(unit kept) at 0.05 and so caps the reachable sparsity near 0.95; [-10, 10] lets gates
# settle to P(kept) ~ 2e-4 or ~ 1 - 1e-5 while a unit can still come back (~100 Adam steps at lr 0.1).
LOG_ALPHA_RANGE = (-10.0, 10.0)
# log(-LIMIT_LOW / LIMIT_HIGH): P(gate > 0) = sigmoid(log_alpha - BETA * this).
_LOG_RATIO = math.log(-LIMIT_LOW / LIMIT_HIGH)
_UNIFORM_EPS = 1e-6
# A unit the top-k keeps always gets a positive value, even when its test-time estimator is 0
# (log_alpha < log(1/11)), so "kept" and "value > 0" mean the same thing to the slicer.
MIN_KEPT_VALUE = 1e-2

MODES = ("modal-adaptive", "uniform", "none")

# How gates start: "heads_kept" as CoFi and EfficientVLM (every head and sublayer gate at
# KEPT_LOG_ALPHA, FFN neurons from droprate_init); "droprate" as evlm did before (every unit
# gate from droprate_init, sublayer gates from layer_droprate_init).
GATE_INITS = ("heads_kept", "droprate")
# The references' initial log_alpha of the gates they start kept (CoFi's and EfficientVLM's
# `reset_loga(..., mean=10)`): removing a head is then a decision the sparsity loss drives,
# never a coin flipped at step 0.
KEPT_LOG_ALPHA = 10.0
STARTS_KEPT = frozenset({"heads", "cross_heads", *LAYER_GATE_COVERS})
# Both references draw the initial log_alpha around its mean with this spread.
INIT_NOISE = 1e-2


def log_odds(drop_rate: float) -> float:
    """log_alpha whose gate keeps with odds (1 - rate) / rate, as Louizos et al. initialise."""
    return math.log(1 - drop_rate) - math.log(drop_rate)


def initial_log_alpha(group: PrunableGroup, init: str, droprate_init: float,
                      layer_droprate_init: float) -> float:
    """The mean initial log_alpha of `group`'s gates under `init` (one of GATE_INITS)."""
    if init == "heads_kept" and group.unit in STARTS_KEPT:
        return KEPT_LOG_ALPHA
    return log_odds(layer_droprate_init if group.is_layer_gate else droprate_init)


def prob_nonzero_from_log_alpha(log_alpha: Tensor) -> Tensor:
    """P(gate != 0) = 1 - CDF(0) of the stretched hard-concrete; differentiable."""
    return torch.sigmoid(log_alpha - BETA * _LOG_RATIO)


def sample_hard_concrete(log_alpha: Tensor) -> Tensor:
    """One reparameterised sample per entry, in [0, 1] with exact 0s and 1s."""
    u = torch.rand_like(log_alpha).clamp_(_UNIFORM_EPS, 1 - _UNIFORM_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)


def test_time_value(log_alpha: Tensor) -> Tensor:
    """Louizos et al.'s deterministic estimator: min(1, max(0, sigmoid(log_alpha)(high-low)+low))."""
    return (torch.sigmoid(log_alpha) * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW).clamp(0.0, 1.0)


def _parameter_key(name: str) -> str:
    return name.replace(".", "_")


def _validate(groups: Sequence[PrunableGroup]) -> None:
    """Group lists come from model code, so a bad one is a programming error (ValueError)."""
    if not groups:
        raise ValueError("L0Gates needs at least one prunable group")
    names = [g.name for g in groups]
    keys = [_parameter_key(n) for n in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"prunable group names collide once '.' becomes '_': {names}")
    for g in groups:
        if g.size < 1 or g.unit_params < 0:
            raise ValueError(f"group {g.name}: size must be >= 1 and unit_params >= 0")
        if g.is_layer_gate and g.size != 1:
            raise ValueError(f"layer gate {g.name} must have size 1, got {g.size}")


class L0Gates(nn.Module):
    """One hard-concrete gate vector (`log_alpha`) per prunable group.

    `forward()` in training mode draws a fresh sample per call. In eval mode it returns the
    deterministic gates: per group the top-k units by log_alpha, k = round(expected number
    kept), valued by the test-time estimator (at least MIN_KEPT_VALUE), exact 0 elsewhere, and
    all 0 under a dropped sublayer gate. Those values are what the slicer folds into weights.
    The initial log_alpha follows `init` (see GATE_INITS and `initial_log_alpha`).
    """

    def __init__(self, groups: Iterable[PrunableGroup], droprate_init: float = 0.5,
                 layer_droprate_init: float = 0.01, init: str = "heads_kept"):
        super().__init__()
        groups = tuple(groups)
        _validate(groups)
        if not 0.0 < droprate_init < 1.0:
            raise ValueError(f"droprate_init must be in (0, 1), got {droprate_init}")
        self.groups = groups
        self.by_name = {g.name: g for g in groups}
        self.encoders = list(dict.fromkeys(g.encoder for g in groups))
        # A sublayer gate is only a parent when it is registered too.
        self.parent = {g.name: g.parent_name for g in groups if g.parent_name in self.by_name}
        if not 0.0 < layer_droprate_init < 1.0:
            raise ValueError(f"layer_droprate_init must be in (0, 1), got {layer_droprate_init}")
        if init not in GATE_INITS:
            raise ValueError(f"gate init: expected one of {', '.join(GATE_INITS)}, got {init!r}")
        self.log_alpha = nn.ParameterDict()
        for g in groups:
            mean = initial_log_alpha(g, init, droprate_init, layer_droprate_init)
            # A little noise breaks ties so the top-k is not decided by unit index at first.
            self.log_alpha[_parameter_key(g.name)] = nn.Parameter(
                torch.full((g.size,), mean) + INIT_NOISE * torch.randn(g.size))

    # --- per-group quantities -------------------------------------------------------------

    def log_alpha_of(self, name: str) -> Tensor:
        return self.log_alpha[_parameter_key(name)]

    def prob_nonzero(self, name: str) -> Tensor:
        """P(gate != 0) of each unit of group `name`, ignoring any sublayer gate above it."""
        return prob_nonzero_from_log_alpha(self.log_alpha_of(name))

    def expected_kept(self, name: str) -> Tensor:
        """Expected number of units kept in group `name` (its own gates only)."""
        return self.prob_nonzero(name).sum()

    # --- gates for the model ----------------------------------------------------------------

    def forward(self) -> dict[str, Tensor]:
        if self.training:
            return {g.name: sample_hard_concrete(self.log_alpha_of(g.name)) for g in self.groups}
        return self.deterministic_values()

    def sample(self) -> dict[str, Tensor]:
        return self()

    @torch.no_grad()
    def deterministic_values(self, masks: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Eval-time gate values: the test-time estimator (at least MIN_KEPT_VALUE) on the kept
        units, exact 0 elsewhere. The kept units are `masks`, by default `deterministic_masks`."""
        masks = self.deterministic_masks() if masks is None else masks
        out = {}
        for g in self.groups:
            value = test_time_value(self.log_alpha_of(g.name)).clamp(min=MIN_KEPT_VALUE)
            out[g.name] = torch.where(masks[g.name], value, torch.zeros_like(value))
        return out

    @torch.no_grad()
    def deterministic_masks(self) -> dict[str, Tensor]:
        """Boolean keep-masks: top round(expected kept) units per group, and'ed with the layer."""
        own = {}
        for g in self.groups:
            log_alpha = self.log_alpha_of(g.name)
            k = round(float(self.expected_kept(g.name)))
            # A stable sort makes ties (equal log_alpha) resolve the same way on every call.
            order = torch.argsort(log_alpha, descending=True, stable=True)
            mask = torch.zeros(g.size, dtype=torch.bool, device=log_alpha.device)
            mask[order[:k]] = True
            own[g.name] = mask
        return {name: (mask & own[self.parent[name]] if name in self.parent else mask)
                for name, mask in own.items()}

    @torch.no_grad()
    def masks_within(self, budgets: dict[str | None, int],
                     floors: dict[str, int] | None = None) -> dict[str, Tensor]:
        """Keep-masks that keep as many prunable parameters as each budget allows, no more.

        `budgets` maps a scope to the parameters it may keep: None is every encoder together,
        an encoder name that encoder alone; the scopes must not overlap. `floors` maps an
        encoder to the parameters it keeps at least, whatever its scores: its best units are
        taken first, until the floor is reached or passed by part of a unit. Then every scope
        takes units in order of `log_alpha`, best first; a unit that would overrun the budget
        is skipped for smaller ones after it, so a budget is missed, from below, by less than
        the smallest unit left out, and is never overrun (not even by a floor). A unit under a
        sublayer gate that `deterministic_masks` drops comes after every other unit; if one is
        still taken, the sublayer is kept. Units with equal scores are ordered by
        `selection_order`, so the choice does not depend on the order the encoders are listed in.
        """
        floors = floors or {}
        scopes = {enc: (None if None in budgets else enc) for enc in self.encoders}
        if set(budgets) != set(scopes.values()):
            raise ValueError(f"budgets must cover every encoder once: got scopes {list(budgets)}")
        decided = self.deterministic_masks()
        layer_on = {g.name: bool(decided[g.name][0]) for g in self.groups if g.is_layer_gate}
        units = self.selection_order(layer_on)
        taken: set[tuple[str, int]] = set()
        used = dict.fromkeys(budgets, 0)

        def take(g: PrunableGroup, i: int) -> bool:
            scope = scopes[g.encoder]
            if (g.name, i) in taken or used[scope] + g.unit_params > budgets[scope]:
                return False
            taken.add((g.name, i))
            used[scope] += g.unit_params
            return True

        for enc, floor in floors.items():
            have = 0
            for g, i in units:
                if have >= floor:
                    break
                if g.encoder == enc and take(g, i):
                    have += g.unit_params
        for g, i in units:
            take(g, i)
        device = self.log_alpha_of(self.groups[0].name).device
        masks = {}
        for g in self.groups:
            if not g.is_layer_gate:
                masks[g.name] = torch.tensor([(g.name, i) in taken for i in range(g.size)],
                                             dtype=torch.bool, device=device)
        for name, on in layer_on.items():
            children = [m for child, m in masks.items() if self.parent.get(child) == name]
            masks[name] = torch.tensor([on or any(bool(m.any()) for m in children)],
                                       device=device)
        return masks

    def selection_order(self, layer_on: dict[str, bool]) -> list[tuple[PrunableGroup, int]]:
        """Every unit (sublayer gates aside) as (group, index), best first for the final selection.

        Units under a kept sublayer (`layer_on`) come first, then higher log_alpha first. Units
        with equal standing form a tie the gates cannot decide, so the selection must not
        favour an encoder: each tied unit is placed at the midpoint of its share of its own
        encoder's tied parameters (its encoder's tied units in model order), and the tie is
        taken in that order. Wherever the budget cuts the tie, every encoder has then kept the
        same share of its tied parameters, within a unit, which is what a random tie-break
        gives on average. Units at the same share are ordered by encoder name, never by the
        order the encoders are listed in.
        """
        units = [(g, i, layer_on.get(self.parent.get(g.name), True), float(a))
                 for g in self.groups if not g.is_layer_gate
                 for i, a in enumerate(self.log_alpha_of(g.name).tolist())]
        tied_params: dict[tuple, int] = {}
        for g, _, on, a in units:
            key = (on, a, g.encoder)
            tied_params[key] = tied_params.get(key, 0) + g.unit_params
        before: dict[tuple, int] = {}
        ranked = []
        for g, i, on, a in units:
            key = (on, a, g.encoder)
            # Integers until one division: equal shares of two encoders compare equal.
            done = before.get(key, 0)
            share = (2 * done + g.unit_params) / (2 * tied_params[key]) if tied_params[key] else 0.0
            before[key] = done + g.unit_params
            ranked.append(((not on, -a, share, g.encoder), g, i))
        ranked.sort(key=lambda r: r[0])
        return [(g, i) for _, g, i in ranked]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_alpha in LOG_ALPHA_RANGE; call after every optimiser step on the gates."""
        low, high = LOG_ALPHA_RANGE
        for p in self.log_alpha.values():
            p.clamp_(low, high)

    # --- parameter budget -------------------------------------------------------------------

    def _selected(self, encoder: str | None) -> list[PrunableGroup]:
        if encoder is not None and encoder not in self.encoders:
            raise ValueError(f"no prunable groups in encoder {encoder!r}; have {self.encoders}")
        return [g for g in self.groups if encoder is None or g.encoder == encoder]

    def total_params(self, encoder: str | None = None) -> int:
        """Prunable parameters of all groups (or one encoder's) when every unit is kept."""
        return sum(g.total_params for g in self._selected(encoder))

    def expected_params(self, encoder: str | None = None) -> Tensor:
        """Differentiable expected number of prunable parameters kept."""
        total = self.log_alpha_of(self.groups[0].name).new_zeros(())
        for g in self._selected(encoder):
            if g.unit_params == 0:
                continue
            kept = self.expected_kept(g.name)
            if g.name in self.parent:
                kept = kept * self.prob_nonzero(self.parent[g.name]).squeeze(0)
            total = total + kept * g.unit_params
        return total

    def expected_sparsity(self, encoder: str | None = None) -> Tensor:
        return 1.0 - self.expected_params(encoder) / self.total_params(encoder)

    def kept_params_from_masks(self, masks: dict[str, Tensor], encoder: str | None = None) -> int:
        """Exact prunable parameters kept by 0/1 masks (a unit under a dropped layer is dropped)."""
        kept = 0
        for g in self._selected(encoder):
            kept += int(self._effective(masks, g).sum()) * g.unit_params
        return kept

    @torch.no_grad()
    def overruled(self, masks: dict[str, Tensor]) -> tuple[int, int]:
        """How many units `masks` decide against the gates' own decision
        (`deterministic_masks`), and how many units there are: heads and neurons, each
        taken as dropped when its sublayer is."""
        decided = self.deterministic_masks()
        units = [g for g in self.groups if not g.is_layer_gate]
        differ = sum(int((self._effective(masks, g) != self._effective(decided, g)).sum())
                     for g in units)
        return differ, sum(g.size for g in units)

    def _effective(self, masks: dict[str, Tensor], g: PrunableGroup) -> Tensor:
        """`g`'s keep-mask in `masks`, with every unit dropped whose sublayer is dropped."""
        mask = masks[g.name].bool()
        return mask & masks[self.parent[g.name]].bool() if g.name in self.parent else mask

    def summary(self, masks: dict[str, Tensor] | None = None) -> dict:
        """JSON-ready account of what the masks keep: per encoder, per layer, and overall."""
        masks = self.deterministic_masks() if masks is None else masks
        encoders = {}
        for enc in self.encoders:
            layers: dict[int, dict] = {}
            for g in self._selected(enc):
                indices = torch.nonzero(self._effective(masks, g).cpu()).flatten().tolist()
                layers.setdefault(g.layer, {"layer": g.layer})[g.unit] = {
                    "kept": len(indices), "total": g.size, "kept_indices": indices}
            encoders[enc] = {**self._sparsity_record(masks, enc),
                             "layers": [layers[i] for i in sorted(layers)]}
        return {**self._sparsity_record(masks, None), "encoders": encoders}

    def _sparsity_record(self, masks: dict[str, Tensor], encoder: str | None) -> dict:
        total = self.total_params(encoder)
        kept = self.kept_params_from_masks(masks, encoder)
        with torch.no_grad():
            expected = float(self.expected_sparsity(encoder))
        return {"total_params": total, "kept_params": kept,
                "sparsity": 1.0 - kept / total if total else 0.0, "expected_sparsity": expected}


def target_at(step: int, total_steps: int, target: float, warmup_fraction: float) -> float:
    """Target sparsity at `step`: a linear ramp from 0 over warmup_fraction * total_steps."""
    warmup_steps = warmup_fraction * total_steps
    if warmup_steps <= 0:
        return target
    return target * min(1.0, step / warmup_steps)


class Lagrangian(nn.Module):
    """lambda_1 (s - t) + (lambda_2 + rho) (s - t)^2, the lambdas trained by gradient ASCENT.

    Backpropagate one total loss (task + penalty); step the model and log_alpha optimisers as
    usual (descent) and the lambdas' own optimiser built with `maximize=True` (see
    `ascent_optimizer`), so the lambdas grow while the constraint is violated.

    `rho` is fixed: the pull back towards the target in proportion to the gap, which the
    learned lambda_2 gives only once it has grown. lambda_1 integrates the gap while the gates
    lag the rising target; without that proportional pull the sparsity then runs past the
    target until lambda_1 unwinds (rho 0 is CoFi's penalty).
    """

    def __init__(self, rho: float = 0.0):
        super().__init__()
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        self.rho = rho

    def penalty(self, expected_sparsity: Tensor, target: float) -> Tensor:
        gap = expected_sparsity - target
        return self.lambda_1 * gap + (self.lambda_2 + self.rho) * gap * gap


def ascent_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW that maximises the loss, without weight decay (it would pull lambdas to 0)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, maximize=True)


class SparsityConstraint(nn.Module):
    """The sparsity loss of one pruning run, by mode.

    - "modal-adaptive": one Lagrangian on the global expected sparsity, so the optimiser decides
      how much each encoder keeps;
    - "uniform": one Lagrangian per encoder, each on that encoder's own sparsity (same target);
    - "none": no pruning; `loss` is 0 and `uses_gates` is False (the model runs ungated).

    In modal-adaptive mode `min_keep` is a floor: each encoder keeps at least that share of its
    prunable parameters, so a global budget cannot wipe a modality out (MULTIFLOW, CVPR 2024,
    saw global pruning do so). During training an encoder below its floor pays a one-sided
    penalty with its own ascent lambdas; `final_masks` enforces it exactly.
    Only the lambdas are registered here; the gates belong to whoever trains them.
    """

    def __init__(self, gates: L0Gates, mode: str, target: float, warmup_fraction: float = 0.0,
                 min_keep: float = 0.0, quadratic_penalty: float = 0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"pruning mode: expected one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target sparsity: expected a number in [0, 1), got {target}")
        if mode == "modal-adaptive" and not 0.0 <= min_keep <= 1.0 - target + 1e-9:
            raise ValueError(f"min_keep: expected a share in [0, 1 - target] = [0, "
                             f"{1.0 - target:g}], got {min_keep}")
        # Bypass Module registration: the gates' parameters must stay out of this module's
        # parameters() so that the ascent optimiser sees the lambdas only.
        object.__setattr__(self, "gates", gates)
        self.mode, self.target, self.warmup_fraction = mode, target, warmup_fraction
        self.min_keep = min_keep if mode == "modal-adaptive" else 0.0
        scopes = {"modal-adaptive": ["global"], "uniform": list(gates.encoders), "none": []}[mode]
        self.lagrangians = nn.ModuleDict({scope: Lagrangian(quadratic_penalty)
                                          for scope in scopes})
        self.floors = nn.ModuleDict({enc: Lagrangian(quadratic_penalty) for enc in gates.encoders}
                                    if self.min_keep > 0 else {})

    @property
    def uses_gates(self) -> bool:
        return self.mode != "none"

    def target_at(self, step: int, total_steps: int) -> float:
        return target_at(step, total_steps, self.target, self.warmup_fraction)

    def loss(self, step: int, total_steps: int) -> Tensor:
        if not self.uses_gates:
            return torch.zeros(())
        target = self.target_at(step, total_steps)
        total = self.gates.expected_params().new_zeros(())
        for scope, lagrangian in self.lagrangians.items():
            encoder = None if scope == "global" else scope
            total = total + lagrangian.penalty(self.gates.expected_sparsity(encoder), target)
        for encoder, lagrangian in self.floors.items():
            # Zero while the encoder keeps its floor: the penalty only pushes back up.
            over = torch.relu(self.gates.expected_sparsity(encoder) - (1.0 - self.min_keep))
            total = total + lagrangian.penalty(over, 0.0)
        return total

    def budgets(self) -> tuple[dict[str | None, int], dict[str, int]]:
        """The parameters each scope may keep at the target, and each encoder's floor."""
        def keep(share: float, encoder: str | None) -> int:
            return math.floor(share * self.gates.total_params(encoder) + 1e-9)

        if self.mode == "modal-adaptive":
            budgets = {None: keep(1.0 - self.target, None)}
        else:
            budgets = {enc: keep(1.0 - self.target, enc) for enc in self.gates.encoders}
        floors = {enc: keep(self.min_keep, enc) for enc in self.gates.encoders} if self.min_keep > 0 else {}
        return budgets, floors

    @torch.no_grad()
    def final_masks(self) -> dict[str, Tensor]:
        """The keep-masks the model is sliced with: the target met whether or not training
        converged (`L0Gates.masks_within`), units chosen by their gates within it."""
        if not self.uses_gates:
            raise ValueError("mode 'none' has no gates to choose from")
        return self.gates.masks_within(*self.budgets())

    @torch.no_grad()
    def training_gap(self) -> float:
        """How far training's expected sparsity ended from the target: overall in
        modal-adaptive mode, the largest gap of an encoder in uniform mode."""
        scopes = [None] if self.mode == "modal-adaptive" else list(self.gates.encoders)
        return max(abs(float(self.gates.expected_sparsity(s)) - self.target) for s in scopes)

    def ascent_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """The lambdas' optimiser (gradient ascent); None in mode "none"."""
        params = list(self.parameters())
        return ascent_optimizer(params, lr) if params else None

    @torch.no_grad()
    def expected_sparsities(self) -> dict[str, float]:
        """Expected sparsity overall and per encoder, for logging."""
        out = {"overall": float(self.gates.expected_sparsity())}
        out.update({enc: float(self.gates.expected_sparsity(enc)) for enc in self.gates.encoders})
        return out

    def log_values(self, step: int, total_steps: int) -> dict[str, float]:
        """One row of log.csv: target, expected sparsities and the lambdas."""
        row = {"target_sparsity": self.target_at(step, total_steps)}
        row.update({f"expected_sparsity/{k}": v for k, v in self.expected_sparsities().items()})
        for scope, lagrangian in self.lagrangians.items():
            row[f"lambda_1/{scope}"] = lagrangian.lambda_1.item()
            row[f"lambda_2/{scope}"] = lagrangian.lambda_2.item()
        for encoder, lagrangian in self.floors.items():
            row[f"lambda_1/floor_{encoder}"] = lagrangian.lambda_1.item()
        return row

"""What the model exposes to pruning: named groups of gateable units with their parameter cost."""

from __future__ import annotations

from dataclasses import dataclass

# A sublayer gate scales the whole sublayer, so it covers the units inside that sublayer.
LAYER_GATE_COVERS = {"attn_layer": "heads", "cross_layer": "cross_heads", "ffn_layer": "ffn"}


@dataclass(frozen=True)
class PrunableGroup:
    """One gate vector: `size` units of kind `unit` in layer `layer` of `encoder`.

    `name` is the gate key the model looks up, "{encoder}.{layer}.{unit}". `unit_params` is the
    exact number of parameters removed with each unit; sublayer gates ("*_layer", size 1) cost
    0 themselves because what they remove is counted by the units they cover.
    """

    name: str
    encoder: str
    unit: str
    layer: int
    size: int
    unit_params: int

    @property
    def is_layer_gate(self) -> bool:
        return self.unit in LAYER_GATE_COVERS

    @property
    def parent_name(self) -> str | None:
        """Name of the sublayer gate that would cover this group, if the unit kind has one."""
        for layer_unit, covered in LAYER_GATE_COVERS.items():
            if covered == self.unit:
                return f"{self.encoder}.{self.layer}.{layer_unit}"
        return None

    @property
    def total_params(self) -> int:
        return self.size * self.unit_params

"""Prunable transformer blocks: per-layer head counts and FFN widths, optional gates and maps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlm_cli.models.config import EncoderConfig

Gates = dict[str, Tensor]


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def additive_mask(mask: Tensor | None, dtype: torch.dtype, causal: bool = False,
                  length: int | None = None, device: torch.device | None = None, past: int = 0
                  ) -> Tensor | None:
    """[B, Lk] keep-mask (1 = attend) -> [B, 1, 1, Lk] additive mask, as BERT does.

    `causal` also hides every later position from each query ([B or 1, 1, L, Lk]): a decoder
    (captioning) predicts each token from the ones before it only. With `past` keys cached from
    earlier decoder steps, the L = Lk - past queries are the positions after them.
    """
    additive = None
    if mask is not None:
        additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    if causal:
        keys = mask.shape[1] if mask is not None else past + length
        device = mask.device if mask is not None else device
        later = torch.ones(keys - past, keys, dtype=torch.bool, device=device).triu(past + 1)
        future = torch.zeros(later.shape, dtype=dtype, device=later.device).masked_fill(
            later, torch.finfo(dtype).min)[None, None]
        # Both minima together would overflow to -inf and turn a padded row's softmax to NaN.
        additive = future if additive is None else (additive + future).clamp(
            min=torch.finfo(dtype).min)
    return additive


def linear_with(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias` [out] (inference copies)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@dataclass
class KeyValues:
    """One attention sublayer's keys and values [rows, heads, positions, head_dim] from earlier
    decoder steps (none yet, or none ever when the sublayer has no heads)."""

    key: Tensor | None = None
    value: Tensor | None = None

    def extend(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new positions' keys and values; return all of them."""
        if self.key is not None:
            key, value = torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
        self.key, self.value = key, value
        return key, value


class Attention(nn.Module):
    """Multi-head attention with any number of heads, including none.

    The output bias is a separate parameter so that it survives when every head is pruned.
    A head gate of shape [heads] scales each head's context before the output projection.

    With a `cache`, self-attention (no `kv`) appends the new positions' keys and values to the
    cached ones, and cross-attention projects `kv` once and reuses it at every later step (its
    `kv` is then not read): a decoder's image does not change while it writes.
    """

    def __init__(self, width: int, heads: int, head_dim: int, kv_width: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        kv_width = kv_width or width
        inner = heads * head_dim
        if heads:
            self.q = nn.Linear(width, inner)
            self.k = nn.Linear(kv_width, inner)
            self.v = nn.Linear(kv_width, inner)
            self.out = nn.Linear(inner, width, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(width))
        self.qkv: nn.Linear | None = None  # inference only: see fuse_projections
        self.kv: nn.Linear | None = None

    @torch.no_grad()
    def fuse_projections(self, cross: bool) -> None:
        """Inference only (the model is not trained or saved afterwards): the projections of
        one input in one matmul (q, k and v for self-attention; k and v for `cross`), and the
        output bias inside the output projection. Computes the same with fewer, larger
        operators, which is what a narrow pruned layer's time goes into."""
        if not self.heads or self.qkv is not None or self.kv is not None:
            return
        parts = ("k", "v") if cross else ("q", "k", "v")
        linears = [getattr(self, name) for name in parts]
        fused = linear_with(torch.cat([m.weight for m in linears]),
                            torch.cat([m.bias for m in linears]))
        for name in parts:
            delattr(self, name)
        if cross:
            self.kv = fused
        else:
            self.qkv = fused
        self.out, self.out_bias = linear_with(self.out.weight, self.out_bias), None

    @property
    def output_bias(self) -> Tensor:
        """The bias the sublayer adds last, wherever it is kept."""
        return self.out_bias if self.out_bias is not None else self.out.bias

    @property
    def empty(self) -> bool:
        """Pruned to no heads: it adds its output bias alone, whatever its input."""
        return not self.heads

    def _project(self, x: Tensor, kv: Tensor | None, cache: KeyValues | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values, each [B, heads, positions, head_dim]."""
        B, L, _ = x.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        if kv is not None and cache is not None and cache.key is not None:
            return split(self.q(x)), cache.key, cache.value
        if self.qkv is not None and kv is None:
            q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        elif self.kv is not None and kv is not None:
            q = split(self.q(x))
            k, v = self.kv(kv).view(B, kv.shape[1], 2, self.heads, self.head_dim).permute(
                2, 0, 3, 1, 4)
        else:
            source = x if kv is None else kv
            q, k, v = split(self.q(x)), split(self.k(source)), split(self.v(source))
        if cache is not None:
            k, v = cache.extend(k, v)
        return q, k, v

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None,
                head_gate: Tensor | None = None, need_weights: bool = False,
                cache: KeyValues | None = None):
        if not self.heads:
            return torch.zeros_like(x) + self.out_bias, None  # not a view: see MLP.forward
        B, L, _ = x.shape
        q, k, v = self._project(x, kv, cache)
        probs = None
        if need_weights:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores + mask
            probs = scores.softmax(-1)
            ctx = probs @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if head_gate is not None:
            ctx = ctx * head_gate.view(1, -1, 1, 1).to(ctx.dtype)
        ctx = ctx.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)
        out = self.out(ctx)
        return (out if self.out_bias is None else out + self.out_bias), probs


class MLP(nn.Module):
    """Feed-forward sublayer of any width, including zero (then only the output bias remains)."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.hidden = hidden
        self.act = activation(act)
        if hidden:
            self.fc1 = nn.Linear(width, hidden)
            self.fc2 = nn.Linear(hidden, width, bias=False)
        self.fc2_bias = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Inference only: the output bias inside the second projection (one operator less)."""
        if not self.hidden or self.fc2_bias is None:
            return
        self.fc2, self.fc2_bias = linear_with(self.fc2.weight, self.fc2_bias), None

    @property
    def output_bias(self) -> Tensor:
        """The bias the sublayer adds last, wherever it is kept."""
        return self.fc2_bias if self.fc2_bias is not None else self.fc2.bias

    @property
    def empty(self) -> bool:
        """Pruned to no neurons: it adds its output bias alone, whatever its input."""
        return not self.hidden

    @torch.no_grad()
    def pad_hidden(self, multiple: int) -> None:
        """Inference only: zero neurons up to a multiple of `multiple` (a neuron of zero
        weights and bias outputs act(0) = 0 into zero columns, so the output is unchanged).

        A matmul whose output width is not a multiple of the vector width runs slowly, and
        pruning leaves such widths everywhere, so inference pads them
        (docs/notes/ffn_padding.md)."""
        padded = -(-self.hidden // multiple) * multiple
        if not self.hidden or padded == self.hidden:
            return
        extra = padded - self.hidden
        pad = nn.functional.pad
        self.fc1 = linear_with(pad(self.fc1.weight, (0, 0, 0, extra)), pad(self.fc1.bias, (0, extra)))
        self.fc2 = linear_with(pad(self.fc2.weight, (0, extra)), self.fc2.bias)
        self.hidden = padded

    def forward(self, x: Tensor, neuron_gate: Tensor | None = None) -> Tensor:
        if not self.hidden:
            # A plain sum, not expand_as: a view of a parameter made under no_grad still
            # claims requires_grad, which breaks FlopCounterMode's module tracking.
            return torch.zeros_like(x) + self.fc2_bias
        h = self.act(self.fc1(x))
        if neuron_gate is not None:
            h = h * neuron_gate.to(h.dtype)
        out = self.fc2(h)
        return out if self.fc2_bias is None else out + self.fc2_bias


@dataclass
class LayerCache:
    """A Block's cached keys and values: its self-attention's and its cross-attention's."""

    attn: KeyValues = field(default_factory=KeyValues)
    cross: KeyValues = field(default_factory=KeyValues)


@dataclass
class LayerOutput:
    hidden: Tensor
    attention: Tensor | None = None
    cross_attention: Tensor | None = None


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, FFN; pre- or post-norm."""

    def __init__(self, cfg: EncoderConfig, index: int):
        super().__init__()
        w, eps = cfg.width, cfg.eps
        self.pre_norm = cfg.norm == "pre"
        self.attn = Attention(w, cfg.heads[index], cfg.head_dim)
        self.norm1 = nn.LayerNorm(w, eps=eps)
        self.cross = None
        if cfg.has_cross:
            self.cross = Attention(w, cfg.cross_heads[index], cfg.head_dim, cfg.kv_width)
            self.norm_cross = nn.LayerNorm(w, eps=eps)
        self.mlp = MLP(w, cfg.ffn[index], cfg.act)
        self.norm2 = nn.LayerNorm(w, eps=eps)
        # Empty sublayers ("attn", "cross", "mlp") whose constant output `fold_constants`
        # moved into an earlier bias: skipped altogether (inference only).
        self.folded: frozenset[str] = frozenset()

    def sublayers(self) -> list[tuple[str, Attention | MLP]]:
        """(name, module) of each sublayer in the order they add to the residual stream."""
        named = [("attn", self.attn)] + ([("cross", self.cross)] if self.cross is not None else [])
        return named + [("mlp", self.mlp)]

    def _sublayer(self, x: Tensor, norm: nn.LayerNorm, fn, layer_gate: Tensor | None,
                  empty_bias: Tensor | None = None):
        """Residual wiring shared by all sublayers; a layer gate scales the sublayer's output.

        A sublayer pruned to nothing (`empty_bias`: no heads or no neurons) outputs its bias
        alone, whatever its input: it is added without normalising the input for nothing.
        """
        if empty_bias is not None:
            out = empty_bias.to(x.dtype)
            if layer_gate is not None:
                out = out * layer_gate.to(out.dtype)
            return (x + out if self.pre_norm else norm(x + out)), None
        out, maps = fn(norm(x) if self.pre_norm else x)
        if layer_gate is not None:
            out = out * layer_gate.to(out.dtype)
        return (x + out if self.pre_norm else norm(x + out)), maps

    def forward(self, x: Tensor, mask: Tensor | None = None, kv: Tensor | None = None,
                kv_mask: Tensor | None = None, gates: Gates | None = None, prefix: str = "",
                need_weights: bool = False, cache: LayerCache | None = None) -> LayerOutput:
        g = (lambda unit: gates.get(f"{prefix}.{unit}")) if gates else (lambda unit: None)  # noqa: E731
        attn = cross = None
        if "attn" not in self.folded:
            x, attn = self._sublayer(
                x, self.norm1,
                lambda h: self.attn(h, mask=mask, head_gate=g("heads"), need_weights=need_weights,
                                    cache=cache.attn if cache is not None else None),
                g("attn_layer"), None if self.attn.heads else self.attn.out_bias)
        if self.cross is not None and "cross" not in self.folded:
            x, cross = self._sublayer(
                x, self.norm_cross,
                lambda h: self.cross(h, kv=kv, mask=kv_mask, head_gate=g("cross_heads"),
                                     need_weights=need_weights,
                                     cache=cache.cross if cache is not None else None),
                g("cross_layer"), None if self.cross.heads else self.cross.out_bias)
        if "mlp" not in self.folded:
            x, _ = self._sublayer(x, self.norm2, lambda h: (self.mlp(h, g("ffn")), None),
                                  g("ffn_layer"), None if self.mlp.hidden else self.mlp.fc2_bias)
        return LayerOutput(x, attn, cross)


@dataclass
class EncoderOutput:
    last: Tensor
    hidden_states: list[Tensor] | None = None  # input embeddings first, then every layer's output
    attentions: list[Tensor | None] | None = None
    cross_attentions: list[Tensor | None] | None = None


@dataclass
class DecoderCache:
    """What one Encoder's earlier decoder steps computed, so that a step feeds only its new
    tokens: each layer's keys and values, and how many positions they cover."""

    layers: list[LayerCache] = field(default_factory=list)  # filled by the first step
    length: int = 0

    def reorder(self, rows: Tensor) -> None:
        """Row i continues the hypothesis of row `rows[i]` (beam search re-selecting beams),
        which must be a row of the same image.

        Only the self-attention keys and values move. The cross-attention ones are the image's,
        the same for every row of an image (beam search picks parents among an image's own
        beams), so copying them would move every image token of every layer at each step for
        nothing.
        """
        for layer in self.layers:
            if layer.attn.key is not None:
                layer.attn.key, layer.attn.value = layer.attn.key[rows], layer.attn.value[rows]


class Encoder(nn.Module):
    """A stack of Blocks named `name` (its gates are looked up as "{name}.{layer}.{unit}")."""

    def __init__(self, cfg: EncoderConfig, name: str):
        super().__init__()
        self.name = name
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.layers))

    def forward(self, x: Tensor, mask: Tensor | None = None,
                kv: Tensor | tuple[Tensor, ...] | None = None,
                kv_mask: Tensor | None = None, gates: Gates | None = None,
                output_hidden: bool = False, output_attentions: bool = False,
                causal: bool = False, cache: DecoderCache | None = None) -> EncoderOutput:
        """`x` [B, L, width]. With a `cache` (causal only), `x` holds the positions after the
        cached ones, and `mask`, if given, covers the cached positions and then these. `kv` as
        a tuple (NLVR2's two images): layer i cross-attends to kv[i mod its length], X-VLM's
        rule for a text read against several images."""
        hidden = [x] if output_hidden else None
        attns = [] if output_attentions else None
        crosses = [] if output_attentions else None
        past = 0
        if cache is not None:
            if not causal:
                raise ValueError("a decoder cache needs causal=True: earlier positions cannot "
                                 "see the new ones")
            if not cache.layers:
                cache.layers = [LayerCache() for _ in self.layers]
            past = cache.length
            cache.length += x.shape[1]
        mask = additive_mask(mask, x.dtype, causal, x.shape[1], x.device, past)
        kv_mask = additive_mask(kv_mask, x.dtype)
        for i, layer in enumerate(self.layers):
            layer_kv = kv[i % len(kv)] if isinstance(kv, tuple) else kv
            out = layer(x, mask, layer_kv, kv_mask, gates, f"{self.name}.{i}", output_attentions,
                        cache.layers[i] if cache is not None else None)
            x = out.hidden
            if output_hidden:
                hidden.append(x)
            if output_attentions:
                attns.append(out.attention)
                crosses.append(out.cross_attention)
        return EncoderOutput(x, hidden, attns, crosses)

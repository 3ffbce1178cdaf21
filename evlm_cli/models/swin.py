"""A prunable Swin vision encoder: windowed attention with a relative position bias, shifted
windows and patch merging, built from evlm's own attention and FFN sublayers (Liu et al. 2021;
the vision encoder of X-VLM's released checkpoints)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlm_cli.models.blocks import Attention, Block, EncoderOutput, Gates, LayerOutput
from evlm_cli.models.config import EncoderConfig, VisionConfig

# The score that keeps two patches of a shifted window apart when the shift brought them
# together from opposite edges of the image. Swin uses this finite value rather than -inf,
# and imported weights must see the scores their source saw.
SHIFT_MASK_SCORE = -100.0
# Where the derived (unsaved) buffers are computed, whatever the default device: a model built
# on the meta device and loaded with its saved tensors (`checkpoint.load_model`) still has them.
BUFFER_DEVICE = "cpu"


def relative_position_index(window: int) -> Tensor:
    """[N, N] (N = window**2 patches of a window, row-major): the row of the bias table that
    holds the bias between patch i and patch j, one row per (row offset, column offset)."""
    steps = torch.arange(window, device=BUFFER_DEVICE)
    rows, columns = torch.meshgrid(steps, steps, indexing="ij")
    rows, columns = rows.flatten(), columns.flatten()
    row_offset = rows[:, None] - rows[None, :] + window - 1
    column_offset = columns[:, None] - columns[None, :] + window - 1
    return row_offset * (2 * window - 1) + column_offset


def to_windows(x: Tensor, window: int) -> Tensor:
    """[B, G, G, C] -> [B * windows, window**2, C], each image's windows in row-major order."""
    B, G, _, C = x.shape
    n = G // window
    return x.view(B, n, window, n, window, C).transpose(2, 3).reshape(-1, window * window, C)


def from_windows(windows: Tensor, window: int, grid: int) -> Tensor:
    """The inverse of `to_windows`: [B * windows, window**2, C] -> [B, G, G, C]."""
    n, C = grid // window, windows.shape[-1]
    return windows.view(-1, n, n, window, window, C).transpose(2, 3).reshape(-1, grid, grid, C)


def shift_mask(grid: int, window: int, shift: int) -> Tensor:
    """[windows, N, N] additive scores for a grid rolled back by `shift` patches: a window
    at the far edge then holds patches from both edges of the image, which must not attend
    to each other. Each patch is labelled by the band (0, 1, 2) it came from along each axis;
    patches with different labels are kept apart."""
    bands = torch.zeros(grid, dtype=torch.long, device=BUFFER_DEVICE)
    bands[grid - window:grid - shift] = 1
    bands[grid - shift:] = 2
    labels = (bands[:, None] * 3 + bands[None, :]).to(torch.float32)
    labels = to_windows(labels[None, :, :, None], window).squeeze(-1)  # [windows, N]
    apart = labels[:, :, None] != labels[:, None, :]
    return torch.zeros(apart.shape, device=BUFFER_DEVICE).masked_fill(apart, SHIFT_MASK_SCORE)


def layer_geometry(cfg: VisionConfig) -> list[tuple[int, int, int]]:
    """(grid, window, shift) of each layer, in patches: its stage's grid and window, and half a
    window for a shifted layer, unless the window covers the whole grid and there is nothing to
    shift across (Swin's rule)."""
    out = []
    for stage, shifted in zip(cfg.swin.layer_stages(), cfg.swin.shifted, strict=True):
        grid, window = cfg.stage_grid(stage), cfg.stage_window(stage)
        out.append((grid, window, window // 2 if shifted and window < grid else 0))
    return out


class WindowAttention(Attention):
    """Self-attention within windows, with a learned bias per head for each offset between two
    patches of a window.

    The bias table has one column per head, so pruning a head removes its column with its
    projections (`compress.slice`), and a head gate scales the head's context as in the ViT.
    """

    def __init__(self, width: int, heads: int, head_dim: int, window: int):
        super().__init__(width, heads, head_dim)
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Derived from the window alone, so not saved: a checkpoint's copy is checked on import.
        self.register_buffer("relative_position_index", relative_position_index(window),
                             persistent=False)

    def position_bias(self) -> Tensor:
        """[heads, N, N]: each head's bias between every two patches of a window."""
        n = self.window ** 2
        table = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return table.reshape(n, n, self.heads).permute(2, 0, 1)

    def forward(self, windows: Tensor, mask: Tensor | None = None, head_gate: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """`windows` [B * windows, N, width], each image's windows in turn; `mask`
        [windows, N, N] additive scores (shifted windows) or None."""
        if not self.heads:
            return torch.zeros_like(windows) + self.out_bias, None  # not a view: see MLP.forward
        BW, N, _ = windows.shape
        q, k, v = self._project(windows, None, None)
        bias = self.position_bias().to(q.dtype)[None]
        if mask is not None:
            # Per window and head, repeated for every image: what the fused kernel reads.
            per_window = (bias + mask.to(q.dtype)[:, None]).unsqueeze(0)
            bias = per_window.expand(BW // mask.shape[0], -1, -1, -1, -1).reshape(
                BW, self.heads, N, N)
        probs = None
        if need_weights:
            probs = (q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + bias).softmax(-1)
            ctx = probs @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if head_gate is not None:
            ctx = ctx * head_gate.view(1, -1, 1, 1).to(ctx.dtype)
        out = self.out(ctx.transpose(1, 2).reshape(BW, N, self.heads * self.head_dim))
        return (out if self.out_bias is None else out + self.out_bias), probs


class SwinBlock(Block):
    """A pre-norm layer whose attention runs within windows of its stage's patch grid, shifted
    by half a window when `shift` is set. Otherwise a Block: the same gates, FFN, slicing and
    inference rewriting."""

    def __init__(self, width: int, heads: int, head_dim: int, ffn: int, *, act: str, eps: float,
                 grid: int, window: int, shift: int):
        super().__init__(EncoderConfig(width=width, head_dim=head_dim, heads=[heads], ffn=[ffn],
                                       norm="pre", act=act, eps=eps), 0)
        # Block's norms and FFN as they are; its attention, windowed.
        self.attn = WindowAttention(width, heads, head_dim, window)
        self.grid, self.window, self.shift = grid, window, shift
        self.register_buffer("mask", shift_mask(grid, window, shift) if shift else None,
                             persistent=False)

    def _windowed(self, x: Tensor, head_gate: Tensor | None, need_weights: bool):
        B, L, C = x.shape
        grid = x.view(B, self.grid, self.grid, C)
        if self.shift:
            grid = torch.roll(grid, (-self.shift, -self.shift), dims=(1, 2))
        out, probs = self.attn(to_windows(grid, self.window), self.mask, head_gate, need_weights)
        grid = from_windows(out, self.window, self.grid)
        if self.shift:
            grid = torch.roll(grid, (self.shift, self.shift), dims=(1, 2))
        return grid.reshape(B, L, C), probs

    def forward(self, x: Tensor, gates: Gates | None = None, prefix: str = "",
                need_weights: bool = False) -> LayerOutput:
        g = (lambda unit: gates.get(f"{prefix}.{unit}")) if gates else (lambda unit: None)  # noqa: E731
        attn = None
        if "attn" not in self.folded:
            x, attn = self._sublayer(x, self.norm1,
                                     lambda h: self._windowed(h, g("heads"), need_weights),
                                     g("attn_layer"), None if self.attn.heads else self.attn.out_bias)
        if "mlp" not in self.folded:
            x, _ = self._sublayer(x, self.norm2, lambda h: (self.mlp(h, g("ffn")), None),
                                  g("ffn_layer"), None if self.mlp.hidden else self.mlp.fc2_bias)
        return LayerOutput(x, attn)


class PatchMerging(nn.Module):
    """Each 2x2 group of patches as one patch of twice the width: their features side by side
    (top-left, bottom-left, top-right, bottom-right, Swin's order), normalised, projected."""

    def __init__(self, width: int, grid: int, eps: float):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * width, eps=eps)
        self.reduction = nn.Linear(4 * width, 2 * width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C = x.shape
        half = self.grid // 2
        x = x.view(B, half, 2, half, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, half * half, 4 * C)
        return self.reduction(self.norm(x))


class SwinStages(nn.Module):
    """Every layer of every stage as one list (`layers`, gated as "vision.{i}.{unit}"), with a
    patch merging before each stage after the first (`merges`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        enc, swin = cfg.encoder, cfg.swin
        self.layer_stages = swin.layer_stages()
        self.layers = nn.ModuleList(
            SwinBlock(width, enc.heads[i], enc.head_dim, enc.ffn[i], act=enc.act, eps=enc.eps,
                      grid=grid, window=window, shift=shift)
            for i, (width, (grid, window, shift)) in enumerate(zip(cfg.layer_widths(),
                                                                  layer_geometry(cfg), strict=True)))
        first = enc.width // 2 ** (swin.stages - 1)
        self.merges = nn.ModuleList(PatchMerging(first * 2 ** stage, cfg.stage_grid(stage), enc.eps)
                                    for stage in range(swin.stages - 1))

    def stage_layers(self) -> list[list[SwinBlock]]:
        """The layers of each stage, stage by stage (a stage may have none)."""
        stages = [[] for _ in range(len(self.merges) + 1)]
        for stage, layer in zip(self.layer_stages, self.layers, strict=True):
            stages[stage].append(layer)
        return stages

    def forward(self, x: Tensor, gates: Gates | None = None, output_hidden: bool = False,
                output_attentions: bool = False) -> EncoderOutput:
        hidden = [x] if output_hidden else None
        attns = [] if output_attentions else None
        stage = 0
        for i, layer in enumerate(self.layers):
            while stage < self.layer_stages[i]:
                x, stage = self.merges[stage](x), stage + 1
            out = layer(x, gates, f"vision.{i}", output_attentions)
            x = out.hidden
            if output_hidden:
                hidden.append(x)
            if output_attentions:
                attns.append(out.attention)
        for merge in self.merges[stage:]:
            x = merge(x)
        crosses = [None] * len(self.layers) if output_attentions else None
        return EncoderOutput(x, hidden, attns, crosses)


class SwinEncoder(nn.Module):
    """Swin: patch embedding and its norm, the stages, a final norm; then, as X-VLM feeds the
    fusion encoder and ITC, the average of the last stage's patches as a first ([CLS]) token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        first = cfg.encoder.width // 2 ** (cfg.swin.stages - 1)
        self.stem = nn.Conv2d(cfg.channels, first, cfg.patch_size, cfg.patch_size,
                              bias=cfg.patch_bias)
        self.norm_pre = nn.LayerNorm(first, eps=cfg.encoder.eps)  # Swin's patch_embed.norm
        self.encoder = SwinStages(cfg)
        self.norm = nn.LayerNorm(cfg.encoder.width, eps=cfg.encoder.eps)

    def forward(self, images: Tensor, gates: Gates | None = None, output_hidden: bool = False,
                output_attentions: bool = False) -> EncoderOutput:
        x = self.norm_pre(self.stem(images).flatten(2).transpose(1, 2))
        out = self.encoder(x, gates=gates, output_hidden=output_hidden,
                           output_attentions=output_attentions)
        patches = self.norm(out.last)
        out.last = torch.cat([patches.mean(1, keepdim=True), patches], dim=1)
        return out

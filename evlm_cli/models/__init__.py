"""Prunable transformer blocks, the X-VLM-style VLM, task heads, checkpoints and importers."""

from evlm_cli.models.blocks import Attention, Block, Encoder, EncoderOutput
from evlm_cli.models.config import EncoderConfig, TextConfig, VisionConfig, VLMConfig
from evlm_cli.models.vlm import VLM, VLMOutput, param_breakdown, prunable_groups

__all__ = ["Attention", "Block", "Encoder", "EncoderOutput", "EncoderConfig", "TextConfig",
           "VisionConfig", "VLMConfig", "VLM", "VLMOutput", "param_breakdown", "prunable_groups"]

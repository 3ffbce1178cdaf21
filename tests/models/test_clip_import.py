"""CLIP vision encoders in Hugging Face's naming (transformers', X-VLM's), their activation,
and position resampling as each source's own code does it.

Every source is built here from a config with random weights (no downloads): transformers'
CLIPVisionModel and CLIPModel, X-VLM's `clip_vit.py` names (transformers' renamed as X-VLM's
`build_vision_encoder` renames them) and timm's ViT. Each imports with every tensor accounted
for, and our encoder then computes what the source's module does.
"""

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from transformers import (
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from evlm_cli.core.config import TeacherConfig, build
from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.build import build_teacher
from evlm_cli.models.checkpoint import check_state
from evlm_cli.models.importers import (
    clip_vision_settings,
    import_clip_vit,
    import_timm_vit,
    import_vit,
    import_xvlm,
    load_hf_dir,
)
from evlm_cli.models.vlm import VisionEncoder, with_heads
from evlm_cli.spec.load import load_spec

TINY_SPEC = Path(__file__).parents[1] / "specs/tiny_vqa.yaml"
WIDTH, HEADS, LAYERS, FFN, PATCH, SIZE = 32, 4, 2, 64, 8, 32


def _clip_vision_config(**kw) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{**dict(hidden_size=WIDTH, num_attention_heads=HEADS,
                                      num_hidden_layers=LAYERS, intermediate_size=FFN,
                                      patch_size=PATCH, image_size=SIZE), **kw})


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter redrawn at a scale where the activations reach the range in which
    GELU and QuickGELU differ, and LayerNorm gains and biases are far from 1 and 0, so that
    a wrong activation or a dropped norm cannot pass parity."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module.eval()


@pytest.fixture
def clip_vision():
    return _randomised(CLIPVisionModel(_clip_vision_config()))


def _encoder(state: dict, cfg) -> VisionEncoder:
    vit = VisionEncoder(cfg).eval()
    sub = {k.removeprefix("vision."): v for k, v in state.items()}
    check_state(vit, sub, "test")  # strict: every tensor of ours present, every shape right
    vit.load_state_dict(sub)
    return vit


def _tokens_as_xvlm_feeds_them(ref: CLIPVisionModel, images: torch.Tensor, **kw) -> torch.Tensor:
    """What X-VLM's CLIP encoder hands the fusion: every token through `post_layernorm`
    (transformers' `last_hidden_state` stops before it and normalises only the pooled CLS)."""
    with torch.no_grad():
        return ref.post_layernorm(ref(pixel_values=images, **kw).last_hidden_state)


def _as_xvlm_names(hf_state: dict) -> dict:
    """A transformers CLIP vision state dict under X-VLM's `clip_vit.py` names: the
    `embeddings.` level dropped, the patch convolution and position table renamed, and the
    position index buffer its module registers."""
    renamed = {}
    for key, value in hf_state.items():
        key = key.removeprefix("embeddings.")
        key = {"patch_embedding.weight": "patch_embed.weight",
               "position_embedding.weight": "pos_embed.weight"}.get(key, key)
        renamed[key] = value
    renamed["position_ids"] = torch.arange(renamed["pos_embed.weight"].shape[0])[None]
    return renamed


def _xvlm_interpolate_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """X-VLM's `interpolate_pos_embed` (`models/vit.py`), restated: the class position kept,
    the grid resized by torch's bicubic interpolation, corners not aligned, no antialiasing."""
    old = int((pos.shape[1] - 1) ** 0.5)
    if old == grid:
        return pos
    grid_pos = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


# --- transformers' CLIP ----------------------------------------------------------------------

def test_clip_vision_model_directory_matches_transformers(clip_vision, tmp_path):
    clip_vision.save_pretrained(tmp_path / "clip")
    state, hf_config = load_hf_dir(tmp_path / "clip")
    settings = clip_vision_settings(hf_config)
    assert settings == {"num_heads": HEADS, "eps": 1e-5, "act": "quick_gelu"}
    ours, cfg = import_clip_vit(state, settings["num_heads"], eps=settings["eps"],
                                act=settings["act"])
    assert cfg.pre_norm and not cfg.patch_bias and cfg.pos_resample == "bicubic"
    vit = _encoder(ours, cfg)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = vit(images).last
        pooled = clip_vision(pixel_values=images).pooler_output
    assert (tokens - _tokens_as_xvlm_feeds_them(clip_vision, images)).abs().max() < 1e-4
    assert (tokens[:, 0] - pooled).abs().max() < 1e-4  # transformers' pooled output: our CLS
    # the activation matters at this scale: the same weights under GELU compute otherwise
    gelu = _encoder(ours, replace(cfg, encoder=replace(cfg.encoder, act="gelu")))
    with torch.no_grad():
        assert (gelu(images).last - tokens).abs().max() > 1e-2


def test_the_activation_follows_the_transformers_config(tmp_path):
    ref = _randomised(CLIPVisionModel(_clip_vision_config(hidden_act="gelu", layer_norm_eps=1e-3)))
    ref.save_pretrained(tmp_path / "clip")
    state, hf_config = load_hf_dir(tmp_path / "clip")
    settings = clip_vision_settings(hf_config)
    assert (settings["act"], settings["eps"]) == ("gelu", 1e-3)
    ours, cfg = import_clip_vit(state, HEADS, eps=settings["eps"], act=settings["act"])
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = _encoder(ours, cfg)(images).last
    assert (tokens - _tokens_as_xvlm_feeds_them(ref, images)).abs().max() < 1e-4


def test_a_clip_model_directory_imports_its_vision_tower_and_accounts_for_the_rest(tmp_path):
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=50, max_position_embeddings=10, bos_token_id=0, eos_token_id=1,
                pad_token_id=1)
    ref = _randomised(CLIPModel(CLIPConfig(vision_config=_clip_vision_config().to_dict(),
                                           text_config=text, projection_dim=8)))
    ref.save_pretrained(tmp_path / "clip")
    state, hf_config = load_hf_dir(tmp_path / "clip")
    assert any(k.startswith("text_model.") for k in state) and "logit_scale" in state
    settings = clip_vision_settings(hf_config)
    ours, cfg = import_clip_vit(state, HEADS, eps=settings["eps"], act=settings["act"])
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = _encoder(ours, cfg)(images).last
    assert (tokens - _tokens_as_xvlm_feeds_them(ref.vision_model, images)).abs().max() < 1e-4
    state["vision_model.encoder.layers.0.self_attn.rel_pos"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'vision_model\.encoder\.layers\.0"
                                              r"\.self_attn\.rel_pos'"):
        import_clip_vit(state, HEADS)


def test_clip_settings_refuse_what_is_not_a_clip_vision_tower():
    with pytest.raises(CheckpointError, match="model_type 'siglip_vision_model' is not a "
                                              "transformers CLIP model"):
        clip_vision_settings({"model_type": "siglip_vision_model"})
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        clip_vision_settings({"model_type": "clip", "vision_config": {"hidden_act": "relu"}})
    # a key the file leaves out takes transformers' default, as transformers would read it
    assert clip_vision_settings({"model_type": "clip", "vision_config": {}})["act"] == "quick_gelu"


def test_transformers_clip_at_another_size_matches_its_own_interpolation(clip_vision):
    """Imported for 64 px images, our encoder computes what transformers' CLIP does on them
    when it interpolates its position table itself."""
    ours, cfg = import_clip_vit(clip_vision.state_dict(), HEADS, image_size=2 * SIZE)
    images = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    with torch.no_grad():
        tokens = _encoder(ours, cfg)(images).last
    expected = _tokens_as_xvlm_feeds_them(clip_vision, images, interpolate_pos_encoding=True)
    assert (tokens - expected).abs().max() < 1e-4


# --- X-VLM's CLIP naming -----------------------------------------------------------------------

def test_a_bare_file_in_xvlm_clip_names_takes_quick_gelu(clip_vision):
    state = _as_xvlm_names(clip_vision.state_dict())
    ours, cfg = import_vit(state, HEADS)  # the naming is told from the keys
    assert cfg.encoder.act == "quick_gelu" and cfg.encoder.eps == 1e-5
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = _encoder(ours, cfg)(images).last
    assert (tokens - _tokens_as_xvlm_feeds_them(clip_vision, images)).abs().max() < 1e-4
    _, overridden = import_vit(state, HEADS, act="gelu")
    assert overridden.encoder.act == "gelu"


def _xvlm_checkpoint(vision_state: dict) -> dict:
    """An X-VLM checkpoint: `vision_encoder.*` and a BERT whose layers 2 and 3 cross-attend."""
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=WIDTH, num_hidden_layers=4,
                                num_attention_heads=HEADS, intermediate_size=FFN,
                                max_position_embeddings=40, is_decoder=True,
                                add_cross_attention=True), add_pooling_layer=False)
    state = {f"vision_encoder.{k}": v for k, v in vision_state.items()}
    state.update({f"text_encoder.bert.{k}": v for k, v in bert.state_dict().items()
                  if not any(f"layer.{i}.crossattention." in k for i in (0, 1))})
    return state


XVLM_TEXT = dict(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=FFN,
                 vocab_size=50, max_position_embeddings=40, num_hidden_layers=4)


def test_an_xvlm_checkpoint_with_a_clip_vision_encoder_matches_transformers(clip_vision):
    """EfficientVLM's released teacher has this layout: X-VLM's `clip_vit.py` names, QuickGELU."""
    state = _xvlm_checkpoint(_as_xvlm_names(clip_vision.state_dict()))
    ours, parts = import_xvlm(state, vision_heads=HEADS, text_hf_config=XVLM_TEXT)
    cfg = parts["vision"]
    assert (cfg.encoder.act, cfg.encoder.eps, cfg.pos_resample) == ("quick_gelu", 1e-5, "bicubic")
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        tokens = _encoder({k: v for k, v in ours.items() if k.startswith("vision.")}, cfg)(images).last
    assert (tokens - _tokens_as_xvlm_feeds_them(clip_vision, images)).abs().max() < 1e-4
    _, parts = import_xvlm(state, vision_heads=HEADS, text_hf_config=XVLM_TEXT, vision_act="gelu")
    assert parts["vision"].encoder.act == "gelu"
    state["vision_encoder.patch_embed.bias"] = torch.zeros(WIDTH)  # CLIP's has none: refused
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'vision_encoder\.patch_embed\.bias'"):
        import_xvlm(state, vision_heads=HEADS, text_hf_config=XVLM_TEXT)


@pytest.mark.parametrize("grid", [8, 2])
def test_xvlm_checkpoints_resample_positions_as_xvlm_does(clip_vision, grid):
    """X-VLM resamples both of its ViTs' positions with its own kernel, not timm's."""
    clip_state = _as_xvlm_names(clip_vision.state_dict())
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=SIZE,
                            patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS)
    timm_state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head")}
    for vision, pos_key in ((clip_state, "pos_embed.weight"), (timm_state, "pos_embed")):
        ours, parts = import_xvlm(_xvlm_checkpoint(vision), vision_heads=HEADS,
                                  text_hf_config=XVLM_TEXT, image_size=grid * PATCH)
        pos = vision[pos_key].reshape(1, -1, WIDTH)
        expected = _xvlm_interpolate_pos_embed(pos, grid)
        assert parts["vision"].pos_resample == "bicubic"
        torch.testing.assert_close(ours["vision.pos_embed"], expected, rtol=0, atol=1e-6)
        antialiased = resample_abs_pos_embed(pos, [grid, grid], num_prefix_tokens=1)
        assert (ours["vision.pos_embed"] - antialiased).abs().max() > 100 * 1e-6  # told apart


# --- timm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [8, 2])
def test_timm_vits_resample_positions_as_timm_does(grid):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=SIZE,
                            patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS)
    ours, cfg = import_timm_vit(vit.state_dict(), HEADS, image_size=grid * PATCH)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), [grid, grid], num_prefix_tokens=1)
    assert cfg.pos_resample == "bicubic_antialias"
    torch.testing.assert_close(ours["vision.pos_embed"], expected, rtol=0, atol=1e-6)


def test_a_file_in_no_naming_we_read_is_refused_naming_what_was_expected():
    with pytest.raises(CheckpointError, match="not a ViT in a naming evlm reads"):
        import_vit({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, HEADS, source="clip.pt")


# --- the teacher ---------------------------------------------------------------------------

def _teacher(**changes) -> TeacherConfig:
    teacher = copy.deepcopy(load_spec(str(TINY_SPEC))["teacher"])
    for key, value in changes.items():
        teacher[key] = {**teacher[key], **value} if isinstance(value, dict) else value
    return build(TeacherConfig, teacher)


VISION_SHAPE = dict(layers=LAYERS, width=WIDTH, heads=HEADS, ffn=FFN, patch_size=PATCH, stem="patch")


def test_a_teacher_starts_from_a_transformers_clip_directory(clip_vision, tmp_path):
    clip_vision.save_pretrained(tmp_path / "clip")
    teacher = _teacher(vision=VISION_SHAPE, init=dict(vision=str(tmp_path / "clip")))
    model, pretrained = build_teacher(teacher, heads=["vqa"], seed=0, image_size=2 * SIZE,
                                      vocab_size=60, max_text_len=16, num_answers=3)
    vision = model.config.vision
    assert (vision.encoder.act, vision.encoder.eps, vision.pos_resample) == ("quick_gelu", 1e-5,
                                                                             "bicubic")
    assert {"vision.norm_pre.weight", "vision.pos_embed"} <= pretrained
    images = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    with torch.no_grad():
        tokens = model.vision.eval()(images).last
    expected = _tokens_as_xvlm_feeds_them(clip_vision, images, interpolate_pos_encoding=True)
    assert (tokens - expected).abs().max() < 1e-4
    # the task at yet another size resamples with the same kernel
    smaller = with_heads(model, ["vqa"], num_answers=3, image_size=SIZE)
    torch.testing.assert_close(smaller.vision.pos_embed.detach(),
                               _xvlm_interpolate_pos_embed(model.vision.pos_embed.detach(), 4),
                               rtol=0, atol=1e-6)


def test_the_spec_activation_overrides_the_source_and_heads_must_agree(clip_vision, tmp_path):
    clip_vision.save_pretrained(tmp_path / "clip")
    save_file(_as_xvlm_names(clip_vision.state_dict()), str(tmp_path / "clip.safetensors"))
    for init in (tmp_path / "clip", tmp_path / "clip.safetensors"):
        teacher = _teacher(vision={**VISION_SHAPE, "activation": "gelu"}, init=dict(vision=str(init)))
        model, _ = build_teacher(teacher, heads=["vqa"], seed=0, image_size=SIZE, vocab_size=60,
                                 max_text_len=16, num_answers=3)
        assert model.config.vision.encoder.act == "gelu"
    teacher = _teacher(vision={**VISION_SHAPE, "heads": 2}, init=dict(vision=str(tmp_path / "clip")))
    with pytest.raises(CheckpointError, match="its vision tower has 4 attention heads, "
                                              "teacher.vision.heads 2"):
        build_teacher(teacher, heads=["vqa"], seed=0, image_size=SIZE, vocab_size=60,
                      max_text_len=16, num_answers=3)

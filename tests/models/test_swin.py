"""The Swin vision encoder: parity with timm's SwinTransformer and X-VLM's Swin layout, and
pruning, slicing, students, distillation, FLOPs and ONNX export as for the ViT."""

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer
from transformers import BertConfig, BertModel

from evlm_cli.compress.distill import HiddenDistiller, attention_kd
from evlm_cli.compress.measure import count_flops
from evlm_cli.compress.slice import slice_model
from evlm_cli.core.config import TeacherConfig, build, to_dict
from evlm_cli.core.errors import CheckpointError
from evlm_cli.deploy.onnx import OnnxModel, export_onnx
from evlm_cli.models.build import build_teacher
from evlm_cli.models.checkpoint import check_state, load_model, save_model
from evlm_cli.models.config import VLMConfig, make_config
from evlm_cli.models.importers import import_timm_swin, import_xvlm
from evlm_cli.models.student import student_from_teacher
from evlm_cli.models.swin import SwinEncoder
from evlm_cli.models.vlm import (
    VLM,
    TaskLogits,
    for_inference,
    param_breakdown,
    prunable_groups,
    with_heads,
)
from evlm_cli.spec.load import load_spec

TINY_SPEC = Path(__file__).parents[1] / "specs/tiny_vqa.yaml"

# 64-pixel images in 4-pixel patches, windows of 4: stages on 16, 8 and 4 patches a side, so
# the first two shift their odd layers and the last one's window is its whole grid.
IMAGE, DEPTHS, HEADS, WINDOW, WIDTH = 64, (2, 2, 2), (2, 4, 8), 4, 16


def timm_swin() -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(img_size=IMAGE, patch_size=4, embed_dim=WIDTH, depths=DEPTHS,
                            num_heads=HEADS, window_size=WINDOW, num_classes=10).eval()
    with torch.no_grad():  # large weights, so that a misplaced bias or mask shows
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def encoder_from(state: dict, cfg) -> SwinEncoder:
    encoder = SwinEncoder(cfg).eval()
    own = {k.removeprefix("vision."): v for k, v in state.items() if k.startswith("vision.")}
    check_state(encoder, own, "test")  # strict: every tensor present, every shape right
    encoder.load_state_dict(own)
    return encoder


def xvlm_layout(ref: SwinTransformer) -> dict:
    """timm's tensors named as X-VLM's `models/swin_transformer.py` saves them: patch merging
    at the end of the stage before (`layers.{s-1}.downsample`), no classifier, and each block's
    relative position index and each shifted block's mask saved as buffers."""
    state = {}
    for key, value in ref.state_dict().items():
        if key.startswith("head."):
            continue
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        state[f"vision_encoder.{key}"] = value
    for s, stage in enumerate(ref.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"vision_encoder.layers.{s}.blocks.{j}"
            state[f"{prefix}.attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                state[f"{prefix}.attn_mask"] = block.attn_mask
    return state


def xvlm_text(width: int, vision_width: int) -> dict:
    """X-VLM's BERT (`text_encoder.bert.*`): two text layers, then two with cross-attention."""
    torch.manual_seed(1)
    hf = dict(hidden_size=width, num_attention_heads=2, intermediate_size=2 * width, vocab_size=50,
              max_position_embeddings=16)
    text = BertModel(BertConfig(**hf, num_hidden_layers=2), add_pooling_layer=False)
    fusion = BertModel(BertConfig(**hf, num_hidden_layers=2, is_decoder=True,
                                  add_cross_attention=True), add_pooling_layer=False)
    assert vision_width == width  # BERT's cross-attention reads its own width
    state = {f"text_encoder.bert.{k}": v for k, v in text.state_dict().items()}
    for key, value in fusion.state_dict().items():
        if key.startswith("encoder.layer."):
            i, rest = key.removeprefix("encoder.layer.").split(".", 1)
            state[f"text_encoder.bert.encoder.layer.{int(i) + 2}.{rest}"] = value
    return {k: v for k, v in state.items() if "position_ids" not in k}


def swin_config(**kw) -> VLMConfig:
    base = dict(vision=dict(kind="swin", layers=sum(DEPTHS), depths=list(DEPTHS), width=WIDTH,
                            heads=HEADS[0], ffn=2 * WIDTH, window_size=WINDOW),
                text=dict(layers=1, width=24, heads=3, ffn=48, norm="pre"),
                fusion=dict(layers=1, width=24, heads=3, ffn=48, norm="pre"), image_size=IMAGE,
                patch_size=4, vocab_size=40, max_positions=16, heads=["vqa", "itm", "itc"],
                num_answers=5, embed_dim=8)
    base.update(kw)
    return make_config(**base)


def swin_vlm(**kw) -> VLM:
    torch.manual_seed(0)
    model = VLM(swin_config(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def inputs(batch: int = 2, length: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0
    return (torch.randn(batch, 3, IMAGE, IMAGE, generator=g),
            torch.randint(1, 40, (batch, length), generator=g), mask)


def swin_gates(model: VLM) -> dict:
    """Soft gates with zeros: a vision layer without heads, one without FFN neurons, a shifted
    layer keeping only some heads (so some bias columns go and some stay), and a soft gate on a
    whole attention sublayer."""
    g = torch.Generator().manual_seed(3)
    gates = {}
    for group in prunable_groups(model.config, ("heads", "ffn", "layers")):
        if group.is_layer_gate:
            gates[group.name] = torch.ones(1)
            continue
        values = 0.2 + 0.8 * torch.rand(group.size, generator=g)
        values[torch.randperm(group.size, generator=g)[: group.size // 2]] = 0
        gates[group.name] = values
    gates["vision.0.heads"] = torch.zeros(2)
    gates["vision.4.ffn"] = torch.zeros(4 * 2 * WIDTH)
    gates["vision.3.heads"] = torch.tensor([0.0, 0.9, 0.0, 0.5])
    gates["vision.2.attn_layer"] = torch.tensor([0.7])
    return gates


# --- parity ---------------------------------------------------------------------------------

def test_swin_features_match_timm_and_its_first_token_is_their_average():
    ref = timm_swin()
    state, cfg = import_timm_swin(ref.state_dict(), image_size=IMAGE)
    assert cfg.swin.depths == list(DEPTHS) and cfg.encoder.heads == [2, 2, 4, 4, 8, 8]
    assert cfg.swin.window_size == WINDOW and cfg.encoder.width == 4 * WIDTH
    encoder = encoder_from(state, cfg)
    assert [b.shift for b in encoder.encoder.layers] == [0, 2, 0, 2, 0, 0]
    images = inputs()[0]
    with torch.no_grad():
        want = ref.forward_features(images).flatten(1, 2)
        got = encoder(images).last
    torch.testing.assert_close(got[:, 1:], want, atol=1e-5, rtol=1e-5)
    # X-VLM feeds the fusion encoder and ITC an average-pooled first token
    torch.testing.assert_close(got[:, 0], want.mean(1), atol=1e-5, rtol=1e-5)


def test_attention_maps_come_from_the_same_attention_as_the_fused_kernel():
    encoder = SwinEncoder(swin_config().vision).eval()
    images = inputs()[0]
    with torch.no_grad():
        plain, mapped = encoder(images), encoder(images, output_attentions=True)
    torch.testing.assert_close(plain.last, mapped.last, atol=1e-5, rtol=1e-5)
    assert [tuple(a.shape) for a in mapped.attentions[1:4:2]] == [(2 * 16, 2, 16, 16),
                                                                  (2 * 4, 4, 16, 16)]
    torch.testing.assert_close(mapped.attentions[1].sum(-1), torch.ones(32, 2, 16))


def test_xvlm_swin_checkpoint_imports_every_tensor_as_timms_does():
    """X-VLM's layout (merging at the end of a stage, saved index and mask buffers) gives the
    tensors the timm layout gives, and a full X-VLM checkpoint imports into a VLM."""
    ref = timm_swin()
    from_timm, _ = import_timm_swin(ref.state_dict(), image_size=IMAGE)
    state = {**xvlm_layout(ref), **xvlm_text(4 * WIDTH, 4 * WIDTH)}
    ours, parts = import_xvlm(state, vision_heads=0, text_hf_config=dict(
        hidden_size=4 * WIDTH, num_attention_heads=2, intermediate_size=8 * WIDTH, vocab_size=50,
        max_position_embeddings=16, num_hidden_layers=4), image_size=IMAGE)
    vision = {k: v for k, v in ours.items() if k.startswith("vision.")}
    assert vision.keys() == from_timm.keys()
    assert all(torch.equal(vision[k], from_timm[k]) for k in vision)
    assert parts["vision"].swin.depths == list(DEPTHS) and parts["fusion"].kv_width == 4 * WIDTH
    cfg = make_config(vision=dict(kind="swin", layers=6, depths=list(DEPTHS), width=WIDTH, heads=2,
                                  ffn=4 * WIDTH, window_size=WINDOW),
                      text=dict(layers=2, width=4 * WIDTH, heads=2, ffn=8 * WIDTH),
                      fusion=dict(layers=2, width=4 * WIDTH, heads=2, ffn=8 * WIDTH),
                      image_size=IMAGE, patch_size=4, vocab_size=50, max_positions=16)
    assert check_state(VLM(cfg), ours, "xvlm", strict=False) == [
        k for k in VLM(cfg).state_dict() if k.startswith("heads.")]


@pytest.mark.parametrize("tamper, message", [
    ("mask", r"layers\.0\.blocks\.1\.attn_mask is not the buffer of a Swin block"),
    ("ape", r"absolute position embeddings \(ape\) is not supported"),
    ("extra", r"unexpected tensor 'vision_encoder\.layers\.1\.blocks\.0\.attn\.scale'"),
    ("window", r"relative_position_bias_table has 9 rows; at 64 pixels .* need 49"),
])
def test_an_xvlm_swin_that_our_encoder_would_compute_differently_is_refused(tamper, message):
    state = {**xvlm_layout(timm_swin()), **xvlm_text(4 * WIDTH, 4 * WIDTH)}
    if tamper == "mask":
        state["vision_encoder.layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
    elif tamper == "ape":
        state["vision_encoder.absolute_pos_embed"] = torch.zeros(1, 256, WIDTH)
    elif tamper == "extra":
        state["vision_encoder.layers.1.blocks.0.attn.scale"] = torch.ones(1)
    else:  # one block's table for windows of 2 (resized tables are not resampled)
        state["vision_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(9, 2)
    with pytest.raises(CheckpointError, match=message):
        import_xvlm(state, vision_heads=0, image_size=IMAGE, text_hf_config=dict(
            hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=50,
            max_position_embeddings=16, num_hidden_layers=4))


def test_an_image_size_that_windows_do_not_tile_is_refused():
    with pytest.raises(ValueError, match="tiled by windows of 4"):
        swin_config(image_size=56)  # 14 patches a side
    with pytest.raises(ValueError, match="has 6 layers, not 5"):
        swin_config(vision=dict(kind="swin", layers=5, depths=[2, 2, 2], width=16, heads=2, ffn=32))


def swin_teacher(**changes) -> TeacherConfig:
    """The tiny spec's teacher with the Swin of `timm_swin` as its vision encoder."""
    teacher = copy.deepcopy(load_spec(str(TINY_SPEC))["teacher"])
    teacher["vision"].update(kind="swin", layers=6, depths=list(DEPTHS), width=WIDTH, heads=2,
                             ffn=4 * WIDTH, patch_size=4, window_size=WINDOW)
    teacher.update(changes)
    return build(TeacherConfig, teacher)


@pytest.mark.parametrize("source", ["xvlm", "init"])
def test_a_teacher_spec_with_a_swin_builds_it_from_either_checkpoint(tmp_path, source):
    """teacher.checkpoint (X-VLM's layout) or teacher.init.vision (timm's) with kind swin."""
    ref = timm_swin()
    if source == "xvlm":
        state = {**xvlm_layout(ref), **xvlm_text(4 * WIDTH, 4 * WIDTH)}
        torch.save({"model": state}, tmp_path / "xvlm.pth")
        shape = dict(layers=2, width=4 * WIDTH, heads=2, ffn=8 * WIDTH, norm="post")
        teacher = swin_teacher(checkpoint=str(tmp_path / "xvlm.pth"), checkpoint_format="xvlm",
                               text=shape, fusion=shape)
        vocab = 50
    else:
        save_file(dict(ref.state_dict()), str(tmp_path / "swin.safetensors"))
        teacher = swin_teacher(init={"vision": str(tmp_path / "swin.safetensors"), "text": None,
                                     "fusion_from_text": False, "lr_scale": 0.1})
        vocab = 200
    model, pretrained = build_teacher(teacher, heads=["vqa"], seed=0, image_size=IMAGE,
                                      vocab_size=vocab, max_text_len=16, num_answers=3)
    assert model.config.vision.swin.depths == list(DEPTHS)
    assert "vision.encoder.merges.1.reduction.weight" in pretrained
    vit = build(TeacherConfig, {**to_dict(teacher), "vision": {**to_dict(teacher.vision),
                                                             "kind": "vit"}})
    said = ("its vision encoder is a swin, teacher.vision.kind vit" if source == "xvlm" else
            "a Swin, not a ViT")
    with pytest.raises(CheckpointError, match=said):
        build_teacher(vit, heads=["vqa"], seed=0, image_size=IMAGE, vocab_size=vocab,
                      max_text_len=16, num_answers=3)
    images = inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.vision(images).last[:, 1:],
                                   ref.forward_features(images).flatten(1, 2), atol=1e-5, rtol=1e-5)


# --- pruning --------------------------------------------------------------------------------

def test_sliced_swin_equals_gated_and_its_groups_count_what_slicing_removes():
    model = swin_vlm()
    gates = swin_gates(model)
    images, ids, mask = inputs()
    with torch.no_grad():
        gated = model.logits("vqa", model(images, ids, mask, gates=gates))
        sliced = slice_model(model, gates)
        got = sliced.logits("vqa", sliced(images, ids, mask))
        fast = for_inference(sliced)
        fastest = fast.logits("vqa", fast(images, ids, mask))
    torch.testing.assert_close(got, gated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fastest, gated, atol=1e-5, rtol=1e-5)
    vision = sliced.config.vision.encoder
    assert vision.heads[0] == 0 and vision.ffn[4] == 0 and vision.heads[3] == 2
    # the bias table keeps the columns of the heads kept, in order
    table = model.vision.encoder.layers[3].attn.relative_position_bias_table
    assert torch.equal(sliced.vision.encoder.layers[3].attn.relative_position_bias_table,
                       table[:, [1, 3]])
    removed = sum(g.unit_params * int((gates[g.name] == 0).sum())
                  for g in prunable_groups(model.config))
    assert param_breakdown(model)["total"] - param_breakdown(sliced)["total"] == removed
    assert param_breakdown(sliced)["vision"] < param_breakdown(model)["vision"]
    assert 0 < count_flops(sliced, images, ids, mask) < count_flops(model, images, ids, mask)


def test_a_swin_model_saves_loads_and_changes_heads(tmp_path):
    model = swin_vlm()
    again = VLMConfig.from_dict(model.config.to_dict())
    assert again == model.config and again.vision.kind == "swin"
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()  # built on the meta device: its derived buffers too
    with torch.no_grad():
        assert torch.equal(loaded.logits("vqa", loaded(*inputs())), model.logits("vqa", model(*inputs())))
    retrieval = with_heads(model, ["itm", "itc"])
    assert torch.equal(retrieval.vision.encoder.merges[1].reduction.weight,
                       model.vision.encoder.merges[1].reduction.weight)


# --- students and distillation ----------------------------------------------------------------

def test_a_swin_student_takes_layers_per_stage_and_keeps_their_windows():
    teacher = swin_vlm(vision=dict(kind="swin", layers=10, depths=[2, 2, 6], width=WIDTH, heads=2,
                                   ffn=2 * WIDTH, window_size=WINDOW))
    student, maps = student_from_teacher(teacher, {"vision": 5, "text": 1, "fusion": 1},
                                         {"vision": [0, 3, 4, 7, 9]})
    swin = student.config.vision.swin
    assert swin.depths == [1, 1, 3] and swin.shifted == [False, True, False, True, True]
    assert [b.shift for b in student.vision.encoder.layers] == [0, 2, 0, 0, 0]  # stage 2: 4 a side
    assert torch.equal(student.vision.encoder.layers[1].attn.relative_position_bias_table,
                       teacher.vision.encoder.layers[3].attn.relative_position_bias_table)
    with pytest.raises(ValueError, match="layer map for vision: Swin layers .* stage order"):
        student_from_teacher(teacher, {"vision": 2, "text": 1, "fusion": 1}, {"vision": [5, 1]})


def test_distillation_pairs_swin_layers_of_one_stage():
    """Hidden-state and attention KD compare each student layer with a teacher layer of its
    stage (one width, one window grid): zero for a student that is the teacher's copy."""
    teacher = swin_vlm()
    images, ids, mask = inputs()
    opts = dict(output_hidden=True, output_attentions=True)
    losses = {}
    for layer_map in ([0, 1, 2, 3, 4, 5], [1, 3, 5]):
        student, maps = student_from_teacher(teacher, {"vision": len(layer_map), "text": 1,
                                                       "fusion": 1}, {"vision": layer_map})
        with torch.no_grad():
            mine, theirs = student(images, ids, mask, **opts), teacher(images, ids, mask, **opts)
        distiller = HiddenDistiller({"vision": (student.config.vision.encoder.width,
                                                teacher.config.vision.encoder.width)})
        assert isinstance(distiller.projections["vision"], torch.nn.Identity)
        losses[len(layer_map)] = (
            distiller.loss(mine.vision.hidden_states, theirs.vision.hidden_states,
                           maps["vision"], encoder="vision"),
            attention_kd(mine.vision.attentions, theirs.vision.attentions, maps["vision"]))
    assert losses[6] == (0, 0)
    assert all(0 < loss < float("inf") for loss in losses[3])


# --- deployment -------------------------------------------------------------------------------

def test_a_pruned_swin_exports_to_onnx_and_computes_the_same(tmp_path):
    model = swin_vlm()
    sliced = slice_model(model, swin_gates(model)).eval()
    path = export_onnx(sliced, "vqa", inputs(2, 5), tmp_path / "model.onnx", 17)
    onnx_model = OnnxModel(path)
    for batch, length in ((2, 5), (3, 7)):
        images, ids, mask = inputs(batch, length, seed=batch)
        with torch.no_grad():
            want = TaskLogits(sliced, "vqa")(images, ids, mask)
        torch.testing.assert_close(onnx_model(images, ids, mask), want, atol=1e-4, rtol=1e-4)

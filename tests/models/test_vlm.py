"""The VLM: uneven shapes, save/load round trip, gates, maps, parameter counts."""

import json

import pytest
import torch

from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.config import EncoderConfig, TextConfig, VisionConfig, VLMConfig, make_config
from evlm_cli.models.vlm import VLM, param_breakdown, prunable_groups
from tests.helpers.models import tiny_config


def uneven_config() -> VLMConfig:
    cfg = tiny_config()
    v, t, f = cfg.vision.encoder, cfg.text.encoder, cfg.fusion
    v.heads, v.ffn = [3, 0], [10, 64]  # a fully pruned attention sublayer
    t.heads, t.ffn = [1, 3], [0, 7]  # a fully pruned FFN
    f.heads, f.ffn, f.cross_heads = [2, 3], [5, 0], [0, 1]
    return cfg


def inputs(batch=2, seq=6, image=16, vocab=40):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=g)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return images, ids, mask


def test_uneven_model_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = VLM(uneven_config()).eval()
    for p in model.parameters():  # output biases start at zero; make every tensor matter
        torch.nn.init.normal_(p, std=0.2)
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["vision"]["encoder"]["heads"] == [3, 0] and cfg["fusion"]["cross_heads"] == [0, 1]
    loaded = load_model(tmp_path / "m").eval()
    x = inputs()
    with torch.no_grad():
        a, b = model(*x), loaded(*x)
    assert torch.equal(model.logits("vqa", a), loaded.logits("vqa", b))
    assert torch.equal(a.vision.last, b.vision.last)
    # the fully pruned sublayers hold no weights but keep their output bias
    assert not hasattr(loaded.vision.encoder.layers[1].attn, "q")
    assert loaded.vision.encoder.layers[1].attn.out_bias.abs().sum() > 0
    assert not hasattr(loaded.text.layers[0].mlp, "fc1")


def test_loading_weights_that_disagree_with_config_names_the_tensor(tmp_path):
    model = VLM(tiny_config())
    save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["text"]["encoder"]["ffn"][1] = 40
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'text\.layers\.1\.mlp\.fc1\.weight' has shape \(48, 24\)"):
        load_model(tmp_path / "m")


def test_corrupt_weights_give_a_checkpoint_error(tmp_path):
    save_model(VLM(tiny_config()), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a checkpoint"):
        load_model(tmp_path / "m")


def test_weights_are_read_by_content_and_truncation_is_named(tmp_path):
    from evlm_cli.models.checkpoint import read_weights

    save_model(VLM(tiny_config()), tmp_path / "m")
    data = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "w.pth").write_bytes(data)  # safetensors under a torch-like name
    assert set(read_weights(tmp_path / "w.pth")) == set(VLM(tiny_config()).state_dict())
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: corrupt or unreadable"):
        read_weights(tmp_path / "cut.safetensors")


def test_attention_maps_and_hidden_states_on_request():
    model = VLM(tiny_config()).eval()
    with torch.no_grad():
        fast = model(*inputs())
        full = model(*inputs(), output_hidden=True, output_attentions=True)
    assert fast.text.hidden_states is None and fast.fusion.attentions is None
    assert torch.allclose(fast.fusion.last, full.fusion.last, atol=1e-5)
    assert len(full.vision.hidden_states) == 3  # embeddings + 2 layers
    cross = full.fusion.cross_attentions[0]
    assert cross.shape == (2, 3, 6, 1 + 4)  # [B, heads, text tokens, image tokens]
    assert torch.allclose(cross.sum(-1), torch.ones(()))
    text_attn = full.text.attentions[0]
    assert text_attn[0, :, :, -2:].abs().max() < 1e-6  # padded keys get no attention


def test_zero_gates_equal_removing_the_unit():
    model = VLM(tiny_config()).eval()
    x = inputs()
    gates = {"text.1.heads": torch.tensor([1.0, 0.0, 1.0]), "fusion.0.ffn": torch.ones(48),
             "vision.0.ffn_layer": torch.zeros(1)}
    gates["fusion.0.ffn"][:10] = 0
    with torch.no_grad():
        gated = model(*x, gates=gates).fusion.last
        ungated = model(*x).fusion.last
        # zeroing the head's output-projection columns removes it too
        model.text.layers[1].attn.out.weight[:, 8:16] = 0
        model.fusion.layers[0].mlp.fc2.weight[:, :10] = 0
        layer = model.vision.encoder.layers[0].mlp
        layer.fc2.weight.zero_()
        layer.fc2_bias.zero_()
        removed = model(*x).fusion.last
    assert not torch.allclose(gated, ungated, atol=1e-4)
    assert torch.allclose(gated, removed, atol=1e-5)


def hand_count(cfg: VLMConfig) -> int:
    def layer(w, h, hd, f, cross_h=0, kv=0):
        attn = 3 * (w * h * hd + h * hd) + h * hd * w + w + 2 * w
        cross = (w * cross_h * hd + cross_h * hd + 2 * (kv * cross_h * hd + cross_h * hd)
                 + cross_h * hd * w + w + 2 * w) if cross_h else 0
        return attn + cross + (w * f + f) + (f * w + w) + 2 * w

    v, t, f = cfg.vision, cfg.text, cfg.fusion
    vw, tw = v.encoder.width, t.encoder.width
    n = 3 * vw * v.patch_size ** 2 + vw + vw + (v.num_patches + 1) * vw + 2 * vw  # stem, cls, pos, norm
    n += sum(layer(vw, v.encoder.heads[i], v.encoder.head_dim, v.encoder.ffn[i]) for i in range(2))
    n += (t.vocab_size + t.max_positions + 2) * tw + 2 * tw
    n += sum(layer(tw, t.encoder.heads[i], t.encoder.head_dim, t.encoder.ffn[i]) for i in range(2))
    n += sum(layer(tw, f.heads[i], f.head_dim, f.ffn[i], f.cross_heads[i], vw) for i in range(2))
    n += (tw * 2 * tw + 2 * tw) + 4 * tw + (2 * tw * 5 + 5)  # vqa head
    n += (tw * 2 * tw + 2 * tw) + 4 * tw + (2 * tw * 2 + 2)  # itm: X-VLM's MLP, as vqa's
    n += (vw * 8 + 8) + (tw * 8 + 8) + 1  # itc
    n += (tw * tw + tw) + 2 * tw + (tw * 40 + 40)  # mlm
    return n


def test_parameter_count_matches_a_hand_count():
    cfg = tiny_config()
    parts = param_breakdown(VLM(cfg))
    assert parts["total"] == hand_count(cfg)
    assert parts["heads"] == (24 * 48 + 48 + 96 + 48 * 5 + 5) + (24 * 48 + 48 + 96 + 48 * 2 + 2) + (
        32 * 8 + 8 + 24 * 8 + 8 + 1) + (24 * 24 + 24 + 48 + 24 * 40 + 40)


def test_prunable_groups_cost_what_slicing_removes():
    cfg = tiny_config()
    groups = {g.name: g for g in prunable_groups(cfg, units=("heads", "ffn", "layers"))}
    assert groups["vision.0.heads"].unit_params == 3 * (32 * 8 + 8) + 8 * 32
    assert groups["fusion.1.cross_heads"].unit_params == (24 * 8 + 8) + 2 * (32 * 8 + 8) + 8 * 24
    assert groups["text.0.ffn"].size == 48 and groups["text.0.ffn"].unit_params == 2 * 24 + 1
    assert groups["fusion.0.cross_layer"].size == 1


def paper_config(layers: tuple[int, int, int]) -> VLMConfig:
    """CLIP ViT-B/16 (224 px, width 768) + BERT-base text and fusion, as in EfficientVLM."""
    v, t, f = layers
    venc = EncoderConfig.uniform(768, v, 12, 3072, norm="pre", eps=1e-5)
    tenc = EncoderConfig.uniform(768, t, 12, 3072)
    fenc = EncoderConfig.uniform(768, f, 12, 3072, cross=True, kv_width=768)
    return VLMConfig(vision=VisionConfig(venc, image_size=224, patch_size=16, patch_bias=False,
                                         pre_norm=True),
                     text=TextConfig(tenc, vocab_size=30522, max_positions=512), fusion=fenc,
                     heads=["itm", "itc"], embed_dim=256)


def test_paper_configuration_parameter_count_on_meta_device(capsys):
    counts = {}
    for name, layers in (("teacher 12/6/6", (12, 6, 6)), ("student 6/3/3", (6, 3, 3))):
        with torch.device("meta"):
            model = VLM(paper_config(layers))
        assert next(model.parameters()).is_meta  # nothing allocated
        counts[name] = param_breakdown(model)
        with capsys.disabled():
            print(f"\n{name}: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts[name].items()))
    t, s = counts["teacher 12/6/6"], counts["student 6/3/3"]
    # ViT-B/16 encoder layers ~85.0M; BERT-base layer 7.09M; a fusion layer adds 2.36M of cross-attn
    assert t["vision"] == 12 * 7_087_872 + 2 * 1536
    assert t["text"] == 6 * 7_087_872
    assert t["fusion"] == 6 * (7_087_872 + 4 * 768 * 768 + 4 * 768 + 2 * 768)
    assert s["vision"] == 6 * 7_087_872 + 2 * 1536
    assert 0.55 < s["total"] / t["total"] < 0.65


def test_flops_count_a_model_with_fully_pruned_sublayers():
    from evlm_cli.compress.measure import count_flops

    full, uneven = VLM(tiny_config()).eval(), VLM(uneven_config()).eval()
    assert 0 < count_flops(uneven, *inputs()) < count_flops(full, *inputs())


def test_max_pool_reads_the_real_tokens_only():
    torch.manual_seed(0)
    model = VLM(tiny_config(pool="max")).eval()
    images, ids, mask = inputs()
    with torch.no_grad():
        out = model(images, ids, mask)
        logits = model.logits("vqa", out)
        # example 0 has two padding tokens: its answer equals the unpadded question's
        alone = model.logits("vqa", model(images[:1], ids[:1, :-2], mask[:1, :-2]))
        # pooling differs from CLS, so the comparison is not vacuous
        cls = model.heads["vqa"](out.fusion.last[:, 0])
    assert torch.allclose(logits[:1], alone, atol=1e-5)
    assert torch.equal(model.pooled(out)[1], out.fusion.last[1].amax(0))
    assert (logits - cls).abs().max() > 1e-3
    # the padded tokens would have changed the maximum had they been read
    assert (out.fusion.last[0].amax(0) - model.pooled(out)[0]).abs().max() > 1e-3


def test_norm_and_pool_are_part_of_the_saved_config(tmp_path):
    cfg = tiny_config(text=dict(layers=2, width=24, heads=3, ffn=48, norm="pre"), pool="max")
    assert cfg.text.encoder.norm == "pre" and cfg.fusion.norm == "post"
    model = VLM(cfg)
    assert all(block.pre_norm for block in model.text.layers)
    assert not any(block.pre_norm for block in model.fusion.layers)
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert again.config.pool == "max" and again.config.text.encoder.norm == "pre"
    with pytest.raises(ValueError, match="pool"):
        tiny_config(pool="mean")


def test_with_heads_keeps_the_encoders_and_matching_heads_and_starts_the_rest_fresh():
    from evlm_cli.models.vlm import with_heads

    torch.manual_seed(0)
    pretrained = VLM(tiny_config(heads=["itc", "itm", "mlm"], num_answers=0))
    torch.manual_seed(1)
    vqa = with_heads(pretrained, ["vqa"], num_answers=7, pool="max")
    assert list(vqa.heads) == ["vqa"] and vqa.config.num_answers == 7 and vqa.config.pool == "max"
    x = inputs()
    with torch.no_grad():
        a, b = pretrained(*x), vqa(*x)
    assert torch.equal(a.fusion.last, b.fusion.last)  # the encoders carried over exactly
    retrieval = with_heads(pretrained, ["itc", "itm"])
    assert torch.equal(retrieval.heads["itm"][3].weight, pretrained.heads["itm"][3].weight)
    assert "mlm" not in retrieval.heads
    # a head of the same name but another shape is not carried over: it starts fresh
    again = with_heads(vqa, ["vqa"], num_answers=3)
    assert again.heads["vqa"][-1].weight.shape[0] == 3


def test_resampled_positions_equal_timms_resampling():
    from timm.layers import resample_abs_pos_embed

    from evlm_cli.models.vlm import resample_pos_embed

    pos = torch.randn(1, 1 + 4 * 4, 12, generator=torch.Generator().manual_seed(0))
    up = resample_pos_embed(pos, 8)
    assert up.shape == (1, 1 + 64, 12) and torch.equal(up[:, 0], pos[:, 0])
    torch.testing.assert_close(up, resample_abs_pos_embed(pos, [8, 8], num_prefix_tokens=1),
                               rtol=0, atol=1e-6)
    down = resample_pos_embed(pos, 2)
    torch.testing.assert_close(down, resample_abs_pos_embed(pos, [2, 2], num_prefix_tokens=1),
                               rtol=0, atol=1e-6)
    assert resample_pos_embed(pos, 4) is pos
    # a position embedding that is the same everywhere on the grid stays so
    flat = torch.cat([pos[:, :1], pos[:, 1:2].expand(1, 16, 12)], 1)
    torch.testing.assert_close(resample_pos_embed(flat, 6)[:, 1:],
                               pos[:, 1:2].expand(1, 36, 12), rtol=0, atol=1e-5)


def test_with_heads_at_another_image_size_resamples_only_the_positions():
    from evlm_cli.models.vlm import resample_pos_embed, with_heads

    torch.manual_seed(0)
    pretrained = VLM(tiny_config(heads=["itc", "itm", "mlm"], num_answers=0))  # 16 px, 2x2 grid
    larger = with_heads(pretrained, ["vqa"], num_answers=3, image_size=32)
    assert larger.config.vision.image_size == 32 and larger.config.vision.num_patches == 16
    old, new = pretrained.state_dict(), larger.state_dict()
    torch.testing.assert_close(new["vision.pos_embed"],
                               resample_pos_embed(old["vision.pos_embed"], 4))
    assert all(torch.equal(new[k], v) for k, v in old.items()
               if k in new and k != "vision.pos_embed")
    images, ids, mask = inputs(image=32)
    with torch.no_grad():
        out = larger(images, ids, mask)
    assert out.vision.last.shape == (2, 1 + 16, 32)
    same = with_heads(pretrained, ["vqa"], num_answers=3, image_size=16)
    assert torch.equal(same.vision.pos_embed, pretrained.vision.pos_embed)
    with pytest.raises(ValueError, match="patch size 8 does not divide image size 20"):
        with_heads(pretrained, ["vqa"], num_answers=3, image_size=20)


def test_an_evlm_teacher_imports_its_encoders_and_gains_the_heads_it_lacks(tmp_path):
    from evlm_cli.core.config import TeacherConfig, build
    from evlm_cli.models.build import build_teacher

    shape = dict(layers=2, width=24, heads=3, ffn=48)
    task_model = VLM(tiny_config(vision=dict(layers=2, width=32, heads=4, ffn=64), text=shape,
                                 fusion=shape, heads=["vqa"]))
    save_model(task_model, tmp_path / "teacher")
    spec = {"vision": {**shape, "width": 32, "heads": 4, "ffn": 64, "patch_size": 8,
                       "stem": "patch"},
            "text": {**shape, "norm": "post"}, "fusion": {**shape, "norm": "post"},
            "init": {"text": None, "vision": None, "fusion_from_text": False, "lr_scale": 0.1},
            "checkpoint": str(tmp_path / "teacher"), "checkpoint_format": "evlm", "embed_dim": 8,
            "pool": "cls", "itm_head": "mlp"}
    teacher = build(TeacherConfig, spec)
    model, pretrained = build_teacher(teacher, heads=["itc", "itm", "mlm"], seed=0,
                                      image_size=16, vocab_size=40, max_text_len=16)
    assert list(model.heads) == ["itc", "itm", "mlm"]
    assert "vision.pos_embed" in pretrained and not any(k.startswith("heads.") for k in pretrained)
    assert torch.equal(model.vision.pos_embed, task_model.vision.pos_embed)
    with pytest.raises(CheckpointError, match="vocabulary has 40 tokens, the pairs' tokenizer 99"):
        build_teacher(teacher, heads=["itc"], seed=0, image_size=16, vocab_size=99,
                      max_text_len=16)


def test_nlvr2_reads_one_text_fused_with_the_two_images_in_turn():
    """X-VLM's NLVR2 (`models/model_nlvr.py`): fusion layer 2i cross-attends to the first
    image, 2i + 1 to the second, over one text stream; the head reads its pooled output."""
    from evlm_cli.models.blocks import additive_mask

    torch.manual_seed(0)
    model = VLM(tiny_config(heads=["nlvr2"], num_answers=2, pool="max")).eval()
    images, ids, mask = inputs(batch=3)
    second = torch.randn_like(images)
    pair = torch.stack([images, second], dim=1)  # [B, 2, 3, H, W]
    logits = model.logits("nlvr2", model(pair, ids, mask))
    with torch.no_grad():
        hidden = model.text_to_fusion(model.encode_text(ids, mask).last)
        keep = additive_mask(mask, hidden.dtype)
        for layer, image in zip(model.fusion.layers, (images, second), strict=True):
            hidden = layer(hidden, keep, model.vision(image).last).hidden
        expected = model.heads["nlvr2"](model.pool(hidden, mask))
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    swapped = model.logits("nlvr2", model(pair.flip(1), ids, mask))
    assert not torch.allclose(swapped, logits)  # which image is first matters
    with pytest.raises(ValueError, match="even number of fusion layers"):
        VLM(tiny_config(heads=["nlvr2"], num_answers=2,
                        fusion=dict(layers=3, width=24, heads=3, ffn=48)))


def test_with_heads_pairs_the_fusion_layers_for_nlvr2_as_x_vlm_starts_it():
    from evlm_cli.models.vlm import with_heads

    torch.manual_seed(0)
    pretrained = VLM(tiny_config(heads=["itc", "itm"], num_answers=0))
    nlvr2 = with_heads(pretrained, ["nlvr2"], num_answers=2)
    assert nlvr2.config.fusion.layers == 4 and nlvr2.config.fusion.cross_heads == [3, 3, 3, 3]
    for index, layer in enumerate(nlvr2.fusion.layers):
        source = pretrained.fusion.layers[index // 2].state_dict()
        assert all(torch.equal(v, source[k]) for k, v in layer.state_dict().items())
    again = with_heads(nlvr2, ["nlvr2"], num_answers=2)  # already paired: kept as it is
    assert again.config.fusion.layers == 4


def test_nlvr2_needs_two_images_per_text_and_keeps_its_head_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = VLM(tiny_config(heads=["nlvr2"], num_answers=2)).eval()
    images, ids, mask = inputs(batch=2)
    with pytest.raises(ValueError, match="two images"):
        model.logits("nlvr2", model(images, ids, mask))
    pair = torch.stack([images, images.flip(0)], dim=1)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits("nlvr2", loaded(pair, ids, mask)),
                                   model.logits("nlvr2", model(pair, ids, mask)))


def test_for_inference_folds_the_stems_batchnorm_and_computes_the_same():
    from evlm_cli.models.vlm import for_inference

    torch.manual_seed(0)
    model = VLM(tiny_config(stem="conv", heads=["vqa"]))
    model.train()
    with torch.no_grad():  # running statistics that are not the identity
        model(*inputs())
    model.eval()
    fast = for_inference(model)
    assert model.training is False and any(isinstance(m, torch.nn.BatchNorm2d)
                                            for m in model.modules())  # the original is kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(fast.logits("vqa", fast(*x)), model.logits("vqa", model(*x)),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="eval mode"):
        model.train().vision.stem.fold_batchnorm()


def test_an_empty_sublayer_adds_its_bias_alone_exactly():
    cfg = uneven_config()  # an attention sublayer with no heads, an FFN with no neurons
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    for module in model.modules():  # biases that are not zero, so skipping them would show
        for name in ("out_bias", "fc2_bias"):
            if hasattr(module, name):
                getattr(module, name).data.normal_()
    block = model.vision.encoder.layers[1]
    assert block.attn.heads == 0
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = h + block.attn.out_bias  # what attention's output adds to the residual
        got, _ = block._sublayer(h, block.norm1, lambda x: block.attn(x), None,
                                 block.attn.out_bias)
        computed, _ = block._sublayer(h, block.norm1, lambda x: block.attn(x), None)
    assert torch.equal(got, expected) and torch.equal(got, computed)


def uneven_model(norm: str) -> VLM:
    """`uneven_config` with `norm` in text and fusion, every tensor random (biases included,
    so a constant moved to the wrong place would show), in eval mode."""
    cfg = uneven_config()
    cfg.heads = ["vqa", "itm", "itc", "mlm", "nlvr2"]
    for enc in (cfg.text.encoder, cfg.fusion):
        enc.norm = norm
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_for_inference_fuses_pads_and_folds_and_every_task_computes_the_same(norm):
    from evlm_cli.models.blocks import Attention
    from evlm_cli.models.vlm import for_inference

    model = uneven_model(norm)
    fast = for_inference(for_inference(model))  # preparing a prepared copy changes nothing
    for encoder in (fast.vision.encoder, fast.text, fast.fusion):
        for block in encoder.layers:
            for name, sub in block.sublayers():
                if isinstance(sub, Attention) and sub.heads:  # one matmul per input
                    assert (sub.kv if name == "cross" else sub.qkv) is not None
                    assert sub.out_bias is None and sub.out.bias is not None
                if not isinstance(sub, Attention):
                    assert sub.hidden % 16 == 0 and (sub.hidden == 0) == (sub.fc2_bias is not None)
    # The empty attention of vision layer 1 follows layer 0's FFN; text's empty FFN (layer 0)
    # follows its attention; fusion layer 0's empty cross-attention follows its attention.
    assert fast.vision.encoder.layers[1].folded == {"attn"}
    folded_text = fast.text.layers[0].folded | fast.fusion.layers[0].folded
    assert folded_text == ({"mlp", "cross"} if norm == "pre" else set())
    images, ids, mask = inputs()
    pair = torch.stack([images, images.flip(0)], dim=1)
    with torch.no_grad():
        for task, x in (("vqa", images), ("itm", images), ("nlvr2", pair)):
            torch.testing.assert_close(fast.logits(task, fast(x, ids, mask)),
                                       model.logits(task, model(x, ids, mask)),
                                       rtol=1e-5, atol=1e-5)
        a, b = fast(images, ids, mask), model(images, ids, mask)
        torch.testing.assert_close(fast.similarity(a.vision.last, a.text.last),  # ITC
                                   model.similarity(b.vision.last, b.text.last),
                                   rtol=1e-5, atol=1e-5)
        a, b = (m.logits("captioning", m(images, ids, mask, causal=True)) for m in (fast, model))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())


def test_for_inference_decodes_the_same_captions_with_its_cache():
    from evlm_cli.models.generate import greedy_decode
    from evlm_cli.models.vlm import for_inference

    model = uneven_model("pre")
    images = inputs(batch=4)[0]
    tokens = dict(bos_id=2, eos_id=3, pad_id=0, max_len=8)
    assert torch.equal(greedy_decode(for_inference(model), images, **tokens),
                       greedy_decode(model, images, **tokens))


def test_padded_ffn_neurons_output_nothing():
    from evlm_cli.models.blocks import MLP

    torch.manual_seed(0)
    for act in ("gelu", "gelu_tanh", "quick_gelu"):
        mlp = MLP(8, 5, act).eval()
        x = torch.randn(3, 4, 8)
        with torch.no_grad():
            expected = mlp(x)
            mlp.fuse_projections()
            mlp.pad_hidden(16)
            assert mlp.hidden == 16 and mlp.fc1.weight.shape == (16, 8)
            torch.testing.assert_close(mlp(x), expected, rtol=1e-6, atol=1e-6)


def test_sincos_positions_start_as_large_as_the_patch_features_and_tell_patches_apart():
    from evlm_cli.models.vlm import sincos_positions

    model = VLM(tiny_config(vision=dict(layers=1, width=32, heads=4, ffn=64), image_size=32,
                            pos_init="sincos"))
    pos = model.vision.pos_embed.detach()[0]
    assert pos.shape == (1 + 16, 32) and model.vision.pos_embed.requires_grad
    assert torch.equal(pos[0], torch.zeros(32))  # CLS: no position
    torch.testing.assert_close(pos[1:].norm(dim=1), torch.full((16,), 4.0))  # sqrt(32 / 2)
    assert torch.cdist(pos[1:], pos[1:]).add(torch.eye(16) * 9).min() > 0.5  # all distinct
    # Row-major: patches of one row share the row channels, of one column the column ones.
    table = sincos_positions(4, 32)
    assert torch.equal(table[0, :16], table[3, :16]) and torch.equal(table[0, 16:], table[12, 16:])
    assert not torch.equal(table[0, :16], table[4, :16])
    normal = VLM(tiny_config(image_size=32)).vision.pos_embed.detach()
    assert normal.std() < 0.05  # ViT's start is 30 times smaller
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions(4, 30)
    with pytest.raises(ValueError, match="unknown pos_init"):
        VLM(tiny_config(pos_init="fourier"))


def test_the_itm_head_is_x_vlms_mlp_or_one_linear():
    base = dict(vision=dict(layers=1, width=16, heads=2, ffn=32),
                text=dict(layers=1, width=16, heads=2, ffn=32),
                fusion=dict(layers=1, width=16, heads=2, ffn=32), image_size=16, patch_size=8,
                vocab_size=50, heads=["itm"])
    assert isinstance(VLM(make_config(**base)).heads["itm"], torch.nn.Sequential)
    linear = VLM(make_config(**base, itm_head="linear")).heads["itm"]
    assert isinstance(linear, torch.nn.Linear) and linear.out_features == 2

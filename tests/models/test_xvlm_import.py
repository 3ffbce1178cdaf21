"""X-VLM's fine-tuned models imported whole: each source layout built in the test with random
weights (retrieval, NLVR2, tests/helpers/xvlm.py), every tensor accounted for, and every encoder
and head computing what X-VLM's own definitions compute (restated there)."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.core.config import TeacherConfig, build
from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.build import build_teacher, import_xvlm_task_teacher
from evlm_cli.models.checkpoint import check_state
from evlm_cli.models.config import VLMConfig, make_config
from evlm_cli.models.importers import import_xvlm
from evlm_cli.models.vlm import VLM
from evlm_cli.spec.load import load_spec
from tests.helpers.xvlm import (
    FFN,
    HEADS,
    HF,
    VISION_WIDTH,
    VOCAB,
    WIDTH,
    build_mlp,
    mlp_head,
    nlvr2_checkpoint,
    pretrained_like,
    retrieval_checkpoint,
    text_state,
    vision_tower,
    xvlm_fusion,
    xvlm_text,
)

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def inputs(batch=3):
    g = torch.Generator().manual_seed(4)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    ids = torch.randint(1, VOCAB, (batch, 7), generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, -3:] = 0
    return images, ids, mask


def imported_model(state: dict, heads: list[str], num_answers: int = 0) -> VLM:
    ours, parts = import_xvlm(state, vision_heads=3, text_hf_config=HF)
    model = VLM(VLMConfig(vision=parts["vision"], text=parts["text"], fusion=parts["fusion"],
                          heads=heads, num_answers=num_answers, embed_dim=16, pool="cls"))
    check_state(model, ours, "xvlm")  # strict: every tensor of the model came from the source
    model.load_state_dict(ours)
    return model.eval()


# --- the tests -------------------------------------------------------------------------------

def test_xvlms_retrieval_model_imports_whole_and_scores_as_xvlm():
    state, ref = retrieval_checkpoint()
    model = imported_model(state, ["itc", "itm"])
    images, ids, mask = inputs()
    with torch.no_grad():
        out = model(images, ids, mask)
        image_embeds = ref["vit"].forward_features(images)
        text = xvlm_text(state, ids, mask)
        cross = xvlm_fusion(state, text, mask, [image_embeds], layers=2)
        torch.testing.assert_close(out.vision.last, image_embeds, **TOLERANCE)
        torch.testing.assert_close(out.text.last, text, **TOLERANCE)
        torch.testing.assert_close(out.fusion.last, cross, **TOLERANCE)
        # `get_matching_loss`'s scores: the ITM MLP over the fused [CLS]
        torch.testing.assert_close(model.logits("retrieval", out), ref["itm_head"](cross[:, 0]),
                                   **TOLERANCE)
        # `get_features` and `get_contrastive_loss`'s logits
        image_feat = F.normalize(F.linear(image_embeds[:, 0], state["vision_proj.weight"],
                                          state["vision_proj.bias"]), dim=-1)
        text_feat = F.normalize(F.linear(text[:, 0], state["text_proj.weight"],
                                         state["text_proj.bias"]), dim=-1)
        torch.testing.assert_close(model.similarity(out.vision.last, out.text.last),
                                   image_feat @ text_feat.t() / state["temp"], **TOLERANCE)


def test_xvlms_nlvr2_model_imports_with_its_paired_fusion_layers_and_classifies_as_xvlm():
    state, ref = nlvr2_checkpoint()
    model = imported_model(state, ["nlvr2"], num_answers=2)
    assert model.config.fusion.layers == 4
    images, ids, mask = inputs()
    second = torch.randn_like(images)
    with torch.no_grad():
        out = model(torch.stack([images, second], dim=1), ids, mask)
        firsts, seconds = (ref["vit"].forward_features(x) for x in (images, second))
        text = xvlm_text(state, ids, mask)
        cross = xvlm_fusion(state, text, mask, [firsts, seconds], layers=4)
        torch.testing.assert_close(out.fusion.last, cross, **TOLERANCE)
        torch.testing.assert_close(model.logits("nlvr2", out), ref["cls_head"](cross[:, 0]),
                                   **TOLERANCE)


def test_our_heads_are_xvlms_build_mlp():
    """The ITM, NLVR2 and VQA heads evlm trains have X-VLM's shape, index by index."""
    model = VLM(make_config(vision=dict(layers=1, width=16, heads=2, ffn=32),
                            text=dict(layers=1, width=WIDTH, heads=HEADS, ffn=FFN),
                            fusion=dict(layers=2, width=WIDTH, heads=HEADS, ffn=FFN),
                            image_size=16, patch_size=8, vocab_size=VOCAB,
                            heads=["itm", "nlvr2", "vqa"], num_answers=7))
    for name, outputs in (("itm", 2), ("nlvr2", 2), ("vqa", 7)):
        reference = build_mlp(WIDTH, outputs)
        ours = model.heads[name]
        assert [type(m) for m in ours] == [type(m) for m in reference]
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()}
        assert ours[1].eps == reference[1].eps


@pytest.mark.parametrize("extra, refused", [
    ({"ta_head.weight": torch.randn(3, WIDTH)}, r"unexpected tensor 'ta_head\.weight'"),
    ({"itm_head.weight": torch.randn(2, WIDTH)}, r"unexpected tensor 'itm_head\.weight'"),
    ({"text_decoder.bert.embeddings.word_embeddings.weight": torch.randn(VOCAB, WIDTH)},
     r"text decoder \('text_decoder\.\*'"),
])
def test_a_tensor_the_import_has_no_place_for_is_refused_by_name(extra, refused):
    state, _ = retrieval_checkpoint()
    with pytest.raises(CheckpointError, match=refused):
        import_xvlm({**state, **extra}, vision_heads=3, text_hf_config=HF)


def test_only_the_grounding_box_head_is_left_out_knowingly():
    """The allow-list carries nothing a task of evlm computes with."""
    state, _ = retrieval_checkpoint()
    box, _ = mlp_head("bbox_head", 4)
    ours, _ = import_xvlm({**state, **box}, vision_heads=3, text_hf_config=HF)
    assert not any("bbox" in key for key in ours)
    assert {k.split(".")[1] for k in ours if k.startswith("heads.")} == {"itc", "itm"}
    itm = {k: v for k, v in state.items() if k.startswith("itm_head.")}
    assert len(itm) == 6 and all(torch.equal(ours[f"heads.itm{k[len('itm_head'):]}"], v)
                                 for k, v in itm.items())


def test_a_checkpoints_text_position_table_is_kept_whole():
    """BERT's 512 rows, where the data needs 16: kept, never refused."""
    vit = vision_tower()
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items()
             if not k.startswith("head")}
    state.update(text_state(2, 2, positions=512))
    ours, parts = import_xvlm(state, vision_heads=3, text_hf_config={**HF, "max_position_embeddings": 16})
    assert parts["text"].max_positions == 512
    assert torch.equal(ours["embeddings.position.weight"],
                       state["text_encoder.embeddings.position_embeddings.weight"])


# --- a task teacher imported from X-VLM ------------------------------------------------------

def test_an_xvlm_nlvr2_checkpoint_is_a_finished_task_teacher(tmp_path):
    state, ref = nlvr2_checkpoint()
    torch.save({"model": state}, tmp_path / "nlvr2.th")
    teacher = import_xvlm_task_teacher(str(tmp_path / "nlvr2.th"), pretrained_like(),
                                       heads=["nlvr2"], num_answers=2, image_size=32).eval()
    images, ids, mask = inputs()
    with torch.no_grad():
        logits = teacher.logits("nlvr2", teacher(torch.stack([images, images.flip(0)], 1), ids,
                                                 mask))
        firsts, seconds = (ref["vit"].forward_features(x) for x in (images, images.flip(0)))
        cross = xvlm_fusion(state, xvlm_text(state, ids, mask), mask, [firsts, seconds], 4)
    torch.testing.assert_close(logits, ref["cls_head"](cross[:, 0]), **TOLERANCE)


@pytest.mark.parametrize("checkpoint, heads, like_fusion, refused", [
    (retrieval_checkpoint, ["nlvr2"], 1, "has no nlvr2 head"),
    (nlvr2_checkpoint, ["nlvr2"], 1, "has 4 fusion layers, the pre-trained teacher's layer "
                                     "maps need 2"),
    (retrieval_checkpoint, ["itc", "itm"], 2, None),
])
def test_an_xvlm_task_teacher_must_fit_the_task_and_the_pretrained_teacher(
        tmp_path, checkpoint, heads, like_fusion, refused):
    state, _ = checkpoint()
    torch.save({"model": state}, tmp_path / "task.th")
    load = lambda: import_xvlm_task_teacher(  # noqa: E731
        str(tmp_path / "task.th"), pretrained_like(like_fusion), heads=heads, num_answers=2,
        image_size=32)
    if refused is None:
        assert list(load().heads) == heads
        return
    with pytest.raises(CheckpointError, match=refused):
        load()


def test_the_teacher_keeps_a_checkpoints_512_text_positions_for_16_token_data(tmp_path):
    """The spec path (`teacher.checkpoint`, format xvlm): the table is kept, not refused; only
    data longer than the table is."""
    state, _ = retrieval_checkpoint()
    state.update(text_state(2, 2, positions=512))
    torch.save({"model": state}, tmp_path / "xvlm.pth")
    teacher = copy.deepcopy(load_spec(Path(__file__).parents[1] / "specs/tiny_vqa.yaml")["teacher"])
    shape = dict(layers=2, width=WIDTH, heads=HEADS, ffn=FFN, norm="post")
    teacher.update(checkpoint=str(tmp_path / "xvlm.pth"), checkpoint_format="xvlm",
                   text={**teacher["text"], **shape}, fusion={**teacher["fusion"], **shape},
                   vision={**teacher["vision"], "layers": 2, "width": VISION_WIDTH, "heads": 3,
                           "ffn": 192, "patch_size": 16}, embed_dim=16)
    config = build(TeacherConfig, teacher)
    model, loaded = build_teacher(config, heads=["itc", "itm"], seed=0, image_size=32,
                                  vocab_size=VOCAB, max_text_len=16)
    assert model.config.text.max_positions == 512 and "embeddings.position.weight" in loaded
    assert "heads.itm.3.weight" in loaded
    with pytest.raises(CheckpointError, match="has 512 text positions, the pairs 600"):
        build_teacher(config, heads=["itc"], seed=0, image_size=32, vocab_size=VOCAB,
                      max_text_len=600)

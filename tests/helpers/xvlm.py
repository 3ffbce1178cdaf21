"""X-VLM's fine-tuned models as its checkpoints lay them out, with random weights (tiny
sizes), and X-VLM's computation restated from `models/xvlm.py`, `models/xbert.py`,
`models/model_retrieval.py` and `models/model_nlvr.py`: what the importer's parity tests
compare with."""

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from evlm_cli.models.config import VLMConfig, make_config

WIDTH, HEADS, FFN, VISION_WIDTH, VOCAB = 32, 4, 64, 48, 50
HF = dict(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=FFN, vocab_size=VOCAB,
          max_position_embeddings=24, num_hidden_layers=4)


def build_mlp(input_dim: int, output_dim: int) -> nn.Sequential:
    """X-VLM's `build_mlp`: its ITM, NLVR2 and box heads."""
    return nn.Sequential(nn.Linear(input_dim, input_dim * 2), nn.LayerNorm(input_dim * 2),
                         nn.GELU(), nn.Linear(input_dim * 2, output_dim))


def vision_tower() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32,
                             embed_dim=VISION_WIDTH, num_heads=3).eval()


def text_state(text_layers: int, fusion_layers: int, positions: int = 24) -> dict:
    """X-VLM's `text_encoder` as its fine-tuned models save it (a BertModel: no `bert.`), the
    fusion layers with cross-attention over the vision width."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale  # noqa: E731
    norm = lambda: (1 + r(WIDTH, scale=0.1), r(WIDTH, scale=0.1))  # noqa: E731
    p = "text_encoder."
    state = {f"{p}embeddings.word_embeddings.weight": r(VOCAB, WIDTH, scale=1.0),
             f"{p}embeddings.position_embeddings.weight": r(positions, WIDTH, scale=1.0),
             f"{p}embeddings.token_type_embeddings.weight": r(2, WIDTH, scale=1.0)}
    state[f"{p}embeddings.LayerNorm.weight"], state[f"{p}embeddings.LayerNorm.bias"] = norm()
    for i in range(text_layers + fusion_layers):
        layer = f"{p}encoder.layer.{i}"
        parts = ["attention"] + (["crossattention"] if i >= text_layers else [])
        for part in parts:
            kv = VISION_WIDTH if part == "crossattention" else WIDTH
            for proj, fan_in in (("query", WIDTH), ("key", kv), ("value", kv)):
                state[f"{layer}.{part}.self.{proj}.weight"] = r(WIDTH, fan_in)
                state[f"{layer}.{part}.self.{proj}.bias"] = r(WIDTH)
            state[f"{layer}.{part}.output.dense.weight"] = r(WIDTH, WIDTH)
            state[f"{layer}.{part}.output.dense.bias"] = r(WIDTH)
            norm_w, norm_b = norm()
            state[f"{layer}.{part}.output.LayerNorm.weight"] = norm_w
            state[f"{layer}.{part}.output.LayerNorm.bias"] = norm_b
        state[f"{layer}.intermediate.dense.weight"] = r(FFN, WIDTH)
        state[f"{layer}.intermediate.dense.bias"] = r(FFN)
        state[f"{layer}.output.dense.weight"] = r(WIDTH, FFN)
        state[f"{layer}.output.dense.bias"] = r(WIDTH)
        state[f"{layer}.output.LayerNorm.weight"], state[f"{layer}.output.LayerNorm.bias"] = norm()
    return state


def mlp_head(name: str, outputs: int) -> tuple[dict, nn.Module]:
    torch.manual_seed(2)
    head = build_mlp(WIDTH, outputs).eval()
    with torch.no_grad():  # a LayerNorm that is not the identity
        head[1].weight.normal_(1.0, 0.1)
        head[1].bias.normal_(0.0, 0.1)
    return {f"{name}.{k}": v for k, v in head.state_dict().items()}, head


def retrieval_checkpoint() -> tuple[dict, dict]:
    """X-VLM's retrieval model (`model_retrieval.py`): ITC projections, temperature, ITM MLP."""
    vit = vision_tower()
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items()
             if not k.startswith("head")}
    state.update(text_state(2, 2))
    itm, itm_head = mlp_head("itm_head", 2)
    state.update(itm)
    g = torch.Generator().manual_seed(3)
    state.update({"vision_proj.weight": torch.randn(16, VISION_WIDTH, generator=g) * 0.2,
                  "vision_proj.bias": torch.randn(16, generator=g) * 0.2,
                  "text_proj.weight": torch.randn(16, WIDTH, generator=g) * 0.2,
                  "text_proj.bias": torch.randn(16, generator=g) * 0.2,
                  "temp": torch.tensor(0.05)})
    return state, {"vit": vit, "itm_head": itm_head}


def nlvr2_checkpoint(fusion_pairs: int = 2) -> tuple[dict, dict]:
    """X-VLM's NLVR2 model (`model_nlvr.py`): every fusion layer twice (2i reads the first
    image, 2i + 1 the second), the pair's cross-attention keys and values shared, `cls_head`."""
    vit = vision_tower()
    state = {f"vision_encoder.{k}": v for k, v in vit.state_dict().items()
             if not k.startswith("head")}
    state.update(text_state(2, 2 * fusion_pairs))
    for pair in range(fusion_pairs):
        first, second = (f"text_encoder.encoder.layer.{2 + 2 * pair + s}.crossattention.self"
                         for s in (0, 1))
        for name in ("key.weight", "key.bias", "value.weight", "value.bias"):
            state[f"{first}.{name}"] = state[f"{second}.{name}"]  # share_cross_attention
    cls, cls_head = mlp_head("cls_head", 2)
    state.update(cls)
    return state, {"vit": vit, "cls_head": cls_head}


# --- X-VLM's computation, restated ---------------------------------------------------------

def bert_attention(x, kv, state, prefix, mask=None):
    """xbert's BertAttention: scaled dot-product over HEADS heads, then dense, residual, LayerNorm."""
    g = lambda name: state[f"{prefix}.{name}"]  # noqa: E731
    split = lambda t: t.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # noqa: E731
    q = split(F.linear(x, g("self.query.weight"), g("self.query.bias")))
    k = split(F.linear(kv, g("self.key.weight"), g("self.key.bias")))
    v = split(F.linear(kv, g("self.value.weight"), g("self.value.bias")))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:  # BertModel's extended mask: (1 - mask) * -10000
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    context = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    out = F.linear(context, g("output.dense.weight"), g("output.dense.bias"))
    return F.layer_norm(out + x, (WIDTH,), g("output.LayerNorm.weight"),
                        g("output.LayerNorm.bias"), eps=1e-12)


def bert_layer(x, state, index, mask, image=None):
    """xbert's BertLayer: self-attention, cross-attention to `image` in fusion layers, FFN."""
    p = f"text_encoder.encoder.layer.{index}"
    x = bert_attention(x, x, state, f"{p}.attention", mask)
    if image is not None:
        x = bert_attention(x, image, state, f"{p}.crossattention")
    inner = F.gelu(F.linear(x, state[f"{p}.intermediate.dense.weight"],
                            state[f"{p}.intermediate.dense.bias"]))
    out = F.linear(inner, state[f"{p}.output.dense.weight"], state[f"{p}.output.dense.bias"])
    return F.layer_norm(out + x, (WIDTH,), state[f"{p}.output.LayerNorm.weight"],
                        state[f"{p}.output.LayerNorm.bias"], eps=1e-12)


def xvlm_text(state, ids, mask, text_layers=2):
    """`get_text_embeds`: BERT embeddings (token type 0), then the text layers."""
    e = "text_encoder.embeddings"
    x = (state[f"{e}.word_embeddings.weight"][ids]
         + state[f"{e}.position_embeddings.weight"][: ids.shape[1]]
         + state[f"{e}.token_type_embeddings.weight"][0])
    x = F.layer_norm(x, (WIDTH,), state[f"{e}.LayerNorm.weight"], state[f"{e}.LayerNorm.bias"],
                     eps=1e-12)
    for i in range(text_layers):
        x = bert_layer(x, state, i, mask)
    return x


def xvlm_fusion(state, text, mask, images, layers, text_layers=2):
    """`get_cross_embeds`: BertLayer j of the fusion layers reads images[j mod len(images)]."""
    x = text
    for j in range(layers):
        x = bert_layer(x, state, text_layers + j, mask, images[j % len(images)])
    return x



def pretrained_like(fusion_layers: int = 2) -> VLMConfig:
    """The pre-trained teacher's config an X-VLM task teacher is imported into the shape of."""
    shape = dict(width=WIDTH, heads=HEADS, ffn=FFN)
    return make_config(vision=dict(layers=2, width=VISION_WIDTH, heads=3, ffn=192),
                       text=dict(layers=2, **shape), fusion=dict(layers=fusion_layers, **shape),
                       image_size=32, patch_size=16, vocab_size=VOCAB, max_positions=24,
                       heads=["itc", "itm", "mlm"], embed_dim=16)

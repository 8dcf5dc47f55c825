"""The adapter: `full` equals the untouched HF model, sites act where they say, the model is left unchanged."""

from __future__ import annotations

import pytest
import torch

from methods import Reduced, Site, TokenReducer, Tokens, create_reducer
from methods._ops import gather_tokens
from methods.llava import ReducedLlava
from methods.trace import LlavaLayout
from tests.conftest import eager_image_row, spliced_embeds, tiny_batch, tiny_llava, tokens_seen


def hf_generate(model, ids, mask, pixels, steps):
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                         do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[:, ids.size(1):]


@pytest.mark.parametrize("batch", [1, 4])
def test_full_matches_hf_generate(tiny_model, batch):
    ids, mask, pixels = tiny_batch(tiny_model, batch)
    ours = ReducedLlava(tiny_model, create_reducer("full")).generate(ids, mask, pixels, max_new_tokens=8,
                                                                     eos_token_id=2, pad_token_id=0)
    ref = hf_generate(tiny_model, ids, mask, pixels, 8)
    assert torch.equal(ours.tokens, ref[:, : ours.tokens.size(1)])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits[:, -1]
    torch.testing.assert_close(ours.first_logits, logits.float(), atol=1e-4, rtol=1e-4)
    assert ours.trace.visual_tokens[:, 0].tolist() == [16] * batch
    assert ours.trace.sample(0, 16)["kept_indices"] is None


def test_full_matches_hf_with_gqa_and_eager():
    model = tiny_llava(kv_heads=2, attn="eager", seed=3)
    ids, mask, pixels = tiny_batch(model, 3, seed=1)
    ours = ReducedLlava(model, create_reducer("full")).generate(ids, mask, pixels, 6, eos_token_id=2)
    assert torch.equal(ours.tokens, hf_generate(model, ids, mask, pixels, 6)[:, : ours.tokens.size(1)])


def test_layout_reads_config(tiny_model):
    lay = LlavaLayout.from_config(tiny_model.config)
    assert lay.grid == (4, 4) and lay.num_patches == 16
    assert lay.feature_layers == (2,) and lay.vision_layers_run == 2  # -2 of 3 layers: the last one is skipped


class KeepFirst(TokenReducer):
    """Test-only reducer: keep the first `budget` tokens (per-sample budgets honoured with `valid`)."""

    def forward(self, t: Tokens) -> Reduced:
        k = min(self.budget, t.x.size(1))
        keep = torch.arange(k).expand(t.x.size(0), k)
        valid = None if t.budget is None else keep < t.budget.unsqueeze(1)
        return Reduced(x=t.x[:, :k], keep=keep, valid=valid)


def reference_with_features(model, ids, mask, pixels, keep):
    """Ground truth for a FEATURES reducer: HF forward on hand-built inputs_embeds of the kept tokens."""
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output  # list of (N, D)
        n = feats[0].size(0)
        rows = []
        for i in range(ids.size(0)):
            real = ids[i][mask[i].bool()]
            start = int((real == 5).nonzero()[0])
            emb = model.model.language_model.embed_tokens(real.masked_fill(real == 5, 0))
            rows.append(torch.cat([emb[:start], feats[i][keep[i]], emb[start + n:]]))
        width = max(r.size(0) for r in rows)
        x = torch.zeros(len(rows), width, rows[0].size(1))
        m = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, width - r.size(0):] = r
            m[i, width - r.size(0):] = 1
        pos = (m.cumsum(1) - 1).clamp(min=0)
        return model(inputs_embeds=x, attention_mask=m, position_ids=pos).logits[:, -1]


def test_features_site_per_sample_counts_match_hand_built_inputs(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 4, seed=2)
    budgets = torch.tensor([3, 7, 16, 1])
    out = ReducedLlava(tiny_model, KeepFirst(budget=16)).prefill(ids, mask, pixels, budgets=budgets)
    ref = reference_with_features(tiny_model, ids, mask, pixels, [list(range(int(b))) for b in budgets])
    torch.testing.assert_close(out.logits.float(), ref.float(), atol=1e-4, rtol=1e-4)
    assert out.trace.visual_tokens[:, 0].tolist() == budgets.tolist()
    assert out.trace.sample(0, 16)["kept_indices"] == [0, 1, 2]
    assert out.trace.sample(2, 16)["kept_indices"] is None


def test_batch_invariance_with_reduction(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 4, seed=4)
    red = ReducedLlava(tiny_model, KeepFirst(budget=5))
    batched = red.generate(ids, mask, pixels, 6, eos_token_id=2)
    for i in range(4):
        row = mask[i].bool()
        single = red.generate(ids[i:i + 1, row], mask[i:i + 1, row], pixels[i:i + 1], 6, eos_token_id=2)
        n = int(single.lengths[0])
        assert batched.tokens[i, :n].tolist() == single.tokens[0, :n].tolist()


class VisionKeepLast(TokenReducer):
    site = Site.VISION

    def forward(self, t: Tokens) -> Reduced:
        n = t.x.size(1)
        keep = torch.arange(n - self.budget, n).expand(t.x.size(0), -1)
        return Reduced(x=gather_tokens(t.x, keep), keep=keep)


def test_vision_site_shortens_the_encoder(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 2)
    out = ReducedLlava(tiny_model, VisionKeepLast(budget=4, layer=1)).prefill(ids, mask, pixels)
    assert out.trace.vision_tokens[0].tolist() == [17, 5]  # layer 0 sees CLS + 16, layer 1 sees CLS + 4
    assert out.trace.visual_tokens[:, 0].tolist() == [4, 4]
    assert out.trace.sample(0, 16)["kept_indices"] == [12, 13, 14, 15]


class LlmTopQuery(TokenReducer):
    site = Site.LLM
    needs = frozenset({"query_attn"})

    def forward(self, t: Tokens) -> Reduced:
        keep = t.query_attn.topk(self.budget, dim=1).indices.sort(dim=1).values  # (B, K) in token order
        return Reduced(x=gather_tokens(t.x, keep), keep=keep)


def test_llm_site_query_attention_matches_eager_attention():
    model = tiny_llava(attn="eager", kv_heads=2, seed=5)
    ids, mask, pixels = tiny_batch(model, 3, seed=3)
    reducer = LlmTopQuery(budget=3, layer=2)
    seen = tokens_seen(reducer)
    out = ReducedLlava(model, reducer).prefill(ids, mask, pixels)
    torch.testing.assert_close(seen[0].query_attn, eager_image_row(model, ids, mask, pixels, 1), atol=1e-5, rtol=1e-4)
    llm = out.trace.llm_tokens
    assert (llm[:, 2] == llm[:, 1] - 13).all()  # 16 image tokens -> 3 from layer 2 on
    assert out.trace.visual_tokens[:, :2].eq(16).all() and out.trace.visual_tokens[:, 2:].eq(3).all()


def masked_reference(model, ids, pixels, k, dropped, steps):
    """FastV's "mask mode" written independently: the full sequence runs through every layer, and from layer k on the
    dropped image tokens are masked as keys. No cache: the whole sequence is re-run at every step (batch 1)."""
    lm = model.model.language_model
    emb, img = spliced_embeds(model, ids, pixels)
    with torch.no_grad():
        tokens, logits0 = [], None
        for _ in range(steps):
            t = emb.size(0)
            pos = torch.arange(t).unsqueeze(0)
            causal = torch.ones(t, t).tril().bool()
            drop = torch.zeros(t, dtype=torch.bool)
            drop[img.nonzero()[:, 0][dropped]] = True
            late = causal & ~drop.unsqueeze(0)
            x, cs = emb.unsqueeze(0), lm.rotary_emb(emb.unsqueeze(0), pos)
            for j, layer in enumerate(lm.layers):
                allowed = late if j >= k else causal
                m = torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
                x = layer(x, attention_mask=m, position_ids=pos, position_embeddings=cs)
            logits = model.lm_head(lm.norm(x[:, -1]))[0]
            logits0 = logits if logits0 is None else logits0
            tok = int(logits.argmax())
            tokens.append(tok)
            emb = torch.cat([emb, lm.embed_tokens(torch.tensor([tok]))])
    return tokens, logits0


def test_llm_site_removal_equals_masking_with_original_positions():
    """Removing tokens before layer k (shorter sequence, reduced cache) equals masking them from layer k on."""
    model = tiny_llava(seed=6)
    ids, mask, pixels = tiny_batch(model, 1, seed=7)
    gen = ReducedLlava(model, LlmTopQuery(budget=4, layer=2)).generate(ids, mask, pixels, 6, eos_token_id=None)
    kept = gen.trace.sample(0, 16)["kept_indices"]
    dropped = torch.tensor([i for i in range(16) if i not in kept])
    ref_tokens, ref_logits = masked_reference(model, ids, pixels, 2, dropped, 6)
    assert gen.tokens[0].tolist() == ref_tokens
    torch.testing.assert_close(gen.first_logits[0], ref_logits.float(), atol=1e-4, rtol=1e-4)
    assert gen.trace.llm_tokens[0, 2] == gen.trace.llm_tokens[0, 1] - 12


def test_model_unchanged_after_use(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 2)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        ref = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    for r in (create_reducer("full"), KeepFirst(budget=3), LlmTopQuery(budget=2, layer=1)):
        ReducedLlava(tiny_model, r).generate(ids, mask, pixels, 3, eos_token_id=2)
    with torch.no_grad():
        after = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(ref, after)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())


def test_bad_inputs_say_what_to_do(tiny_model):
    ids, mask, pixels = tiny_batch(tiny_model, 1)
    with pytest.raises(ValueError, match="one contiguous run of 16 image tokens"):
        ReducedLlava(tiny_model, create_reducer("full")).prefill(ids[:, :-12], mask[:, :-12], pixels)
    with pytest.raises(ValueError, match="LLM layer 3 must be in"):
        ReducedLlava(tiny_model, LlmTopQuery(budget=2, layer=3))
    with pytest.raises(ValueError, match="vision layer 2 must be below"):
        ReducedLlava(tiny_model, VisionKeepLast(budget=2, layer=2))


def test_features_site_signals_match_hooked_reference(tiny_model):
    """cls_attn / keys equal what PruMerge's reference reads with hooks on the q/k projections of the layer that
    consumes the features (one fused head, 1/sqrt(width), softmax over CLS + patches)."""
    ids, mask, pixels = tiny_batch(tiny_model, 3, seed=9)
    seen = {}

    class Spy(TokenReducer):
        needs = frozenset({"cls_attn", "keys"})

        def forward(self, t):
            seen.update(cls_attn=t.cls_attn, keys=t.keys)
            return Reduced(x=t.x[:, : self.budget], keep=torch.arange(self.budget).expand(t.x.size(0), -1))

    ReducedLlava(tiny_model, Spy(budget=4)).prefill(ids, mask, pixels)
    captured = {}
    layer = tiny_model.model.vision_tower.encoder.layers[2]  # features = hidden_states[-2] = input of layer 2
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
             layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o))]
    try:
        with torch.no_grad():
            tiny_model.model.vision_tower(pixels)
    finally:
        for h in hooks:
            h.remove()
    q, k = captured["q"], captured["k"]
    attn = (q @ k.transpose(1, 2) / k.size(-1) ** 0.5).softmax(-1)[:, 0, 1:]
    torch.testing.assert_close(seen["cls_attn"], attn, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(seen["keys"], k[:, 1:])

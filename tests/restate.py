"""Shared by the methods' restatement tests (tests/test_pdrop.py, tests/test_sparsevlm.py): the reference code's
decoding step (and a follow-up chunk) written out, and the check that an adapter's prefill, first decoding step and a
follow-up turn on its cache match a restatement."""

from __future__ import annotations

import torch


def restated_decode(model, inputs, next_token):
    """The next logits after `next_token`, each layer attending over its own prompt (`inputs[j]` = (hidden states
    entering layer j, their position ids, the new token's position there)) plus the new token: what a KV-cached
    decoding step computes, written without a cache."""
    return restated_chunk(model, inputs, [next_token])


def restated_chunk(model, inputs, tokens: list[int]):
    """The logits after a chunk of `tokens` fed at once on top of each layer's own prompt (as `restated_decode`, the
    chunk's tokens at consecutive positions from each layer's next one, causal among themselves): what a follow-up
    turn on the cache (`ask_again`) computes, written without a cache."""
    lm = model.model.language_model
    n = len(tokens)
    with torch.no_grad():
        x = lm.embed_tokens(torch.tensor([tokens]))
        for layer, (h, pos, nxt) in zip(lm.layers, inputs, strict=True):
            seq, p = torch.cat([h, x], 1), torch.cat([pos, nxt + torch.arange(n)[None]], 1)
            t = seq.size(1)
            m = torch.zeros(t, t).masked_fill(~torch.ones(t, t).tril().bool(), torch.finfo(torch.float32).min)
            x = layer(seq, attention_mask=m[None, None], position_ids=p, position_embeddings=lm.rotary_emb(seq, p))
            x = x[:, -n:]
        return model.lm_head(lm.norm(x[:, -1]))[0]


def matches_restatement(red, state, n_patches, kept, logits, inputs, tol=1e-4) -> None:
    """The adapter's prefill `state` (of runner `red`) keeps the restatement's tokens, gives its logits, and its first
    decoding step (on the greedy token) gives `restated_decode`'s logits."""
    assert state.trace.sample(0, n_patches)["kept_indices"] == kept
    torch.testing.assert_close(state.logits[0], logits, atol=tol, rtol=tol)
    tok = int(state.logits[0].argmax())
    with torch.no_grad():
        step = red._decode_step(state, torch.tensor([tok]))
    torch.testing.assert_close(step[0], restated_decode(red.model, inputs, tok), atol=tol, rtol=tol)
    chunk = torch.tensor([[7, 8, 9]])  # a follow-up's text after the answer's token, each layer on its own prompt
    got = red.ask_again(state, chunk, torch.ones_like(chunk), 1).first_logits[0]
    torch.testing.assert_close(got, restated_chunk(red.model, inputs, [tok, *chunk[0].tolist()]), atol=tol, rtol=tol)

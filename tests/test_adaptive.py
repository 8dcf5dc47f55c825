"""The adaptive controller: exact-K Gumbel selection, budget conditioning, Option A's budget token, save/load."""

from __future__ import annotations

import pytest
import torch

from methods import Tokens, create_reducer
from methods.adaptive import ControllerConfig, budget_encoding, gumbel_topk
from methods.llava import ReducedLlava
from tests.conftest import tiny_batch


def make(name, budget=4, dim=32, n=16):
    torch.manual_seed(0)
    return create_reducer(name, budget, config=ControllerConfig(method=name, dim=dim, num_patches=n))


def test_gumbel_topk_exact_k_train_and_topk_eval():
    torch.manual_seed(0)
    logits = torch.randn(5, 12, requires_grad=True)
    k = torch.tensor([1, 3, 6, 12, 2])
    mask = gumbel_topk(logits, k, tau=5.0, training=True)
    assert mask.detach().sum(1).tolist() == k.tolist()
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}  # hard going forward
    (mask * torch.randn(5, 12)).sum().backward()
    assert logits.grad.abs().sum() > 0  # straight-through gradient reaches the scores
    ev = gumbel_topk(logits.detach(), k, training=False)
    for row, kk in enumerate(k.tolist()):
        assert set(ev[row].nonzero().flatten().tolist()) == set(logits[row].topk(kk).indices.tolist())


def test_gumbel_samples_without_replacement_follow_the_logits():
    logits = torch.tensor([[3.0, 0.0, 0.0, -3.0]]).expand(4000, 4)
    picks = gumbel_topk(logits, torch.full((4000,), 1), training=True).sum(0) / 4000
    p = logits[0].softmax(0)  # one Gumbel-max draw is a softmax sample
    assert torch.allclose(picks, p, atol=0.03)


def test_budget_encoding_hand_computed():
    enc = budget_encoding(torch.tensor([0.25]), num_freqs=2)  # f = [1, 10000^-0.5], s = pi / 2
    s = torch.pi / 2 * torch.tensor([1.0, 0.01])
    torch.testing.assert_close(enc[0], torch.cat([s.sin(), s.cos()]))


@pytest.mark.parametrize("name", ["adaptive_a", "adaptive_b", "budget_blind"])
def test_exact_budget_per_sample_and_edges_through_the_adapter(tiny_model, name):
    dim = tiny_model.config.vision_config.hidden_size
    r = make(name, budget=5, dim=dim).eval()
    ids, mask, pixels = tiny_batch(tiny_model, 4, seed=2)
    run = ReducedLlava(tiny_model, r)
    out = run.prefill(ids, mask, pixels)
    assert out.trace.visual_tokens[:, 0].tolist() == [5] * 4
    per = run.prefill(ids, mask, pixels, budgets=torch.tensor([0, 3, 16, 40]))  # K <= 0 keeps 1, K >= N keeps all
    assert per.trace.visual_tokens[:, 0].tolist() == [1, 3, 16, 16]
    kept = [per.trace.sample(i, 16)["kept_indices"] for i in range(4)]
    assert len(kept[1]) == 3 and kept[1] == sorted(kept[1])  # original patch order
    if name == "adaptive_a":  # the budget token runs through the encoder: CLS + 16 patches + 1
        assert out.trace.vision_tokens[0].tolist() == [18, 18]


def test_budget_changes_the_choice_only_when_conditioned():
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    for name, differs in (("adaptive_b", True), ("budget_blind", False)):
        r = make(name, dim=32)
        for p in r.parameters():  # make the conditioning matter at random init
            p.data.normal_(0, 0.5)
        r.eval()
        s4 = r.scores(Tokens(x=x, grid=(4, 4)), torch.tensor([4, 4]))
        s12 = r.scores(Tokens(x=x, grid=(4, 4)), torch.tensor([12, 12]))
        assert (not torch.allclose(s4, s12)) == differs


def test_save_and_load_roundtrip(tmp_path):
    for name in ("adaptive_a", "adaptive_b"):
        r = make(name, dim=32)
        r.save(tmp_path / name)
        loaded = create_reducer(name, 4, checkpoint=tmp_path / name)
        for (k1, v1), (k2, v2) in zip(r.state_dict().items(), loaded.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="holds a adaptive_a controller"):
        create_reducer("adaptive_b", 4, checkpoint=tmp_path / "adaptive_a")
    with pytest.raises(FileNotFoundError, match="not a trained controller folder"):
        create_reducer("adaptive_b", 4, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="no trained controller"):
        create_reducer("adaptive_b", 4)

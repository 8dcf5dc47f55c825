"""The signals table (methods/signals.py): every method's needs have an entry, every adapter computes what it declares,
the real providers fill the fields the table says with the shapes its stand-ins have, refusals name the signal."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.defaults import catalogue as read_catalogue
from methods import UnknownReducerError, expand_methods, get_reducer_class, list_reducers
from methods._llm import LLM_PROVIDERS
from methods._registry import register_reducer
from methods.base import Reduced, Site, TokenReducer, Tokens
from methods.families import FAMILIES, LLAVA, QWEN, QWEN3
from methods.llava import EMBEDDING_PROVIDERS, FEATURE_PROVIDERS, ReducedLlava
from methods.qwen import ReducedQwen
from methods.signals import SIGNALS, Dims, refusal, refuse, sees_question, signal_macs, stand_ins
from tests.conftest import IMAGE_TOKEN, QWEN_IMAGE, qwen_prompts, tiny_batch, tiny_llava, tiny_qwen

ADAPTERS = {"llava": ReducedLlava, "qwen": ReducedQwen}


def test_every_needed_signal_has_an_entry_and_a_new_one_is_refused_at_registration():
    for m in list_reducers():
        assert get_reducer_class(m).needs <= set(SIGNALS), m
    with pytest.raises(ValueError, match=r"unknown signals \['colour'\].*methods/signals.py"):
        register_reducer("needs_colour")(type("NeedsColour", (TokenReducer,), {"needs": frozenset({"colour"})}))
    assert "needs_colour" not in list_reducers()


@pytest.mark.parametrize("adapter", ADAPTERS.values(), ids=ADAPTERS)
def test_each_adapter_provides_signals_of_their_site_and_has_a_provider_for_each(adapter):
    providers = {Site.FEATURES: FEATURE_PROVIDERS, Site.LLM: LLM_PROVIDERS, Site.EMBEDDINGS: EMBEDDING_PROVIDERS}
    for site, names in adapter.provides.signals.items():
        assert all(site in SIGNALS[n].sites for n in names), site
        assert names <= set(providers.get(site, {})), site
    assert set(FEATURE_PROVIDERS) == {n for n, s in SIGNALS.items() if s.site is Site.FEATURES}
    assert set(LLM_PROVIDERS) == {n for n, s in SIGNALS.items() if s.site is Site.LLM}


def test_which_family_runs_which_method_follows_from_the_table():
    """Derived, not listed: these are the lists the two families ran before the table existed, plus the methods
    that read the question before the LLM (issue 37), which run on both."""
    assert [m for m in list_reducers() if LLAVA.runs(m)] == list_reducers()
    assert [m for m in list_reducers() if QWEN.runs(m)] == ["adaptive_b", "adaptive_q", "budget_blind", "cdpruner",
                                                           "dart", "divprune", "fastv", "full", "pdrop", "random",
                                                           "sparsevlm"]
    assert [m for m in list_reducers() if QWEN3.runs(m)] == [m for m in list_reducers() if QWEN.runs(m)]
    assert set(FAMILIES.values()) == {LLAVA, QWEN, QWEN3}


def test_refusals_name_the_signal_and_why():
    class AtFeatures(TokenReducer):
        name, needs = "at_features", frozenset({"query_attn", "feature_attn"})

    with pytest.raises(NotImplementedError, match=r"^at_features does not run on Qwen2.5-VL: it needs feature_attn, "
                                                  r"which requires a vision CLS token, and query_attn, computed at the "
                                                  r"llm site only; these do: adaptive_b, "):
        refuse(AtFeatures, QWEN.runner.provides)
    assert refusal(AtFeatures, LLAVA.runner.provides) == "needs query_attn, computed at the llm site only"
    at_vision = type("AtVision", (TokenReducer,), {"site": Site.VISION})
    assert refusal(at_vision, QWEN.runner.provides) == ("acts at the vision site, which this family's adapter does "
                                                       "not reduce at")


def test_macs_of_signals_computed_together_are_counted_once():
    d = Dims(width=4, seq=10, extra=1)
    both = signal_macs(frozenset({"cls_attn", "keys"}), d)
    assert both == signal_macs(frozenset({"keys"}), d) == 4 * 4 + 9 * (4 * 4 + 4)
    assert signal_macs(frozenset({"cls_attn", "keys", "feature_attn"}), d) == both + 10 * 4
    assert signal_macs(frozenset({"text_attn"}), Dims(width=4, q_width=6, seq=10, text=3)) == 3 * (4 * 6 + 10 * 6)


def _dims_of(shape: str, d: Dims) -> tuple[int, ...]:
    """A `fills` shape such as "(B, M, width)" in numbers."""
    sizes = {"B": d.batch, "N": d.tokens, "M": d.text, "N0": d.image, "width": d.width, "head_dim": d.head_dim,
             "feature_width": d.feature_width, "text_width": d.text_width}
    return tuple(sizes[k] for k in re.findall(r"\w+", shape.split(")")[0]))


@pytest.mark.parametrize("name", SIGNALS)
def test_stand_ins_fill_the_fields_the_table_names_with_its_shapes(name):
    s = SIGNALS[name]
    d = Dims(batch=2, tokens=5, width=8, head_dim=4, feature_width=16, text=3, image=7, text_width=6)
    values = s.stand_in(d, torch.Generator().manual_seed(0))
    assert set(values) == set(s.fills)
    for field, shape in s.fills.items():
        assert tuple(values[field].shape) == _dims_of(shape, d), field
        assert (values[field].dtype == torch.bool) == shape.endswith("bool"), field
        assert (values[field].dtype == torch.long) == shape.endswith("long"), field
    kwargs = stand_ins(frozenset({name}), d, torch.Generator().manual_seed(0))
    Tokens(x=torch.randn(2, 5, 8), grid=(1, 5), **kwargs)  # they are Tokens fields


class _Probe(TokenReducer):
    """Keeps every token and records what it was handed (`_probe` sets its site and needs)."""

    name, uses_budget = "probe", False

    def __init__(self, layer: int | None = None) -> None:
        super().__init__(None, layer)
        self.seen: list[Tokens] = []

    def forward(self, t: Tokens) -> Reduced:
        self.seen.append(t)
        n = t.x.size(1)
        return Reduced(x=t.x, keep=torch.arange(n).expand(t.x.size(0), n))


def _probe(site: Site, needs: frozenset[str], layer: int | None = None) -> _Probe:
    return type("Probe", (_Probe,), {"site": site, "needs": needs})(layer)


def _check_fields(t: Tokens, names: frozenset[str], d: Dims) -> None:
    for name in names:
        for field, shape in SIGNALS[name].fills.items():
            value = getattr(t.text, field[5:]) if field.startswith("text.") else getattr(t, field)
            assert value is not None, field
            assert tuple(value.shape) == _dims_of(shape, d), field


def test_llava_providers_fill_the_declared_fields_with_the_declared_shapes():
    model = tiny_llava(llm_layers=3)
    ids, mask, pixels = tiny_batch(model, 2)
    vc, tc = model.config.vision_config, model.config.text_config
    n = (vc.image_size // vc.patch_size) ** 2
    feats = frozenset(FEATURE_PROVIDERS)
    probe = _probe(Site.FEATURES, feats)
    ReducedLlava(model, probe).prefill(ids, mask, pixels, relevant=torch.zeros(2, n, dtype=torch.bool))
    t = probe.seen[0]
    _check_fields(t, feats, Dims(batch=2, tokens=n, width=vc.hidden_size, feature_width=vc.hidden_size,
                                 head_dim=vc.hidden_size // vc.num_attention_heads, text=t.text.valid.size(1),
                                 text_width=tc.hidden_size))
    after = [(mask[i].bool() & (torch.arange(ids.size(1)) > torch.nonzero(ids[i] == IMAGE_TOKEN)[-1])).sum().item()
             for i in range(2)]
    assert t.text.valid.sum(1).tolist() == after  # the question: the real tokens after each image
    llm = frozenset(LLM_PROVIDERS)
    probe = _probe(Site.LLM, llm, layer=1)
    ReducedLlava(model, probe).prefill(ids, mask, pixels)
    t = probe.seen[0]
    _check_fields(t, llm, Dims(batch=2, tokens=n, width=tc.hidden_size, text=t.text.valid.size(1), image=n))


def test_qwen_providers_fill_the_declared_fields_with_the_declared_shapes():
    model = tiny_qwen()
    ids, mask, pixels, grid = qwen_prompts(model, [(1, 8, 8), (1, 4, 8)])
    probe = _probe(Site.FEATURES, frozenset({"question"}))
    ReducedQwen(model, probe).prefill(ids, mask, pixels, grid)
    t = probe.seen[0]
    lm = model.model.language_model
    for i in range(2):  # the question's tokens: the LLM's own embeddings of the real tokens after the image
        after = (mask[i].bool() & (torch.arange(ids.size(1)) > torch.nonzero(ids[i] == QWEN_IMAGE)[-1]))
        m = int(after.sum())
        assert t.text.valid[i].sum() == m
        torch.testing.assert_close(t.text.embeds[i, :m], lm.embed_tokens(ids[i, after]))
    llm = frozenset(LLM_PROVIDERS)
    probe = _probe(Site.LLM, llm, layer=1)
    ReducedQwen(model, probe).prefill(ids, mask, pixels, grid)
    t = probe.seen[0]
    n = t.x.size(1)
    _check_fields(t, llm, Dims(batch=2, tokens=n, width=model.config.text_config.hidden_size,
                               text=t.text.valid.size(1), image=n))


def test_which_methods_see_the_question_follows_from_their_signals():
    """A method sees the question when it reads a signal that depends on it (`Signal.question`): the in-LLM methods
    and the oracle, and before the LLM adaptive_q and cdpruner; the catalogue records it, and `question_aware` /
    `question_blind` name the two groups of methods (without `full` and reference rows)."""
    aware = {m for m in list_reducers() if sees_question(get_reducer_class(m).needs)}
    assert aware == {"adaptive_q", "cdpruner", "dart", "fastv", "oracle", "pdrop", "sparsevlm"}
    assert {m for m, e in read_catalogue().items() if e["question"]} == aware
    assert set(expand_methods(("question_aware",))) == aware - {"oracle"}
    assert set(expand_methods(("question_blind",))) == set(list_reducers()) - aware - {"full"}
    assert expand_methods(("question_aware",), list(read_catalogue())) == expand_methods(("question_aware",))
    with pytest.raises(UnknownReducerError, match="Did you mean question_aware"):
        expand_methods(("question_awar",))

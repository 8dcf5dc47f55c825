"""The `oracle` reference (methods/oracle.py): relevant patches first, a seeded random fill; refused in one line
where no relevant patches are recorded. The registry's contracts (batch invariance, budget, FLOPs exact) cover it
with every other method (test_registry.py, test_flops.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.defaults import SMOKE_MODEL
from benchmarks.plan import RunSpec, make_plan
from methods import Tokens, create_reducer, get_reducer_class
from methods.random import hashed_scores
from tests.conftest import tiny_batch, tiny_llava


def restated(relevant: list[list[int]], keys: list[int], n: int, budget: int, seed: int) -> list[list[int]]:
    """The rule written out per sample: the relevant patches in order of their hash (highest first), then the
    others in the same order; the first `budget` of that list, in patch order."""
    out = []
    for rel, key in zip(relevant, keys, strict=True):
        h = hashed_scores(torch.tensor([key]), n, seed)[0].tolist()
        by_hash = sorted(range(n), key=lambda i: -h[i])
        ranked = [i for i in by_hash if i in rel] + [i for i in by_hash if i not in rel]
        out.append(sorted(ranked[:budget]))
    return out


def test_hand_case_relevant_first_then_the_random_fill():
    """Six patches, budget 3. Sample 0 has two relevant patches (1 and 4): both kept, plus the highest-hashed
    other. Sample 1 has four (0, 2, 3, 5): the three highest-hashed of them, nothing else."""
    r = create_reducer("oracle", 3, seed=0)
    rel = torch.tensor([[0, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    keys = torch.tensor([11, 12])
    h = hashed_scores(keys, 6, 0)
    other = max((0, 2, 3, 5), key=lambda i: int(h[0, i]))
    top3 = sorted(sorted((0, 2, 3, 5), key=lambda i: -int(h[1, i]))[:3])
    out = r(Tokens(x=torch.arange(12.0).view(2, 6, 1), grid=(2, 3), relevant=rel, sample_key=keys))
    assert out.keep.tolist() == [sorted([1, 4, other]), top3]
    assert out.x[0, :, 0].tolist() == [float(i) for i in sorted([1, 4, other])]  # the kept tokens, in patch order


@pytest.mark.parametrize("seed", [0, 3])
def test_equals_the_rule_written_out(seed):
    g = torch.Generator().manual_seed(seed)
    b, n, budget = 6, 144, 16
    rel = torch.rand(b, n, generator=g) < torch.tensor([0.01, 0.05, 0.1, 0.2, 0.7, 0.0]).view(b, 1)
    keys = torch.randint(0, 2**31, (b,), generator=g)
    out = create_reducer("oracle", budget, seed=seed)(Tokens(x=torch.randn(b, n, 4, generator=g), grid=(12, 12),
                                                          relevant=rel, sample_key=keys))
    want = restated([torch.nonzero(r).flatten().tolist() for r in rel], keys.tolist(), n, budget, seed)
    assert out.keep.tolist() == want


def test_through_the_adapter_the_kept_patches_are_the_relevant_ones():
    model = tiny_llava(seed=1)
    ids, mask, pixels = tiny_batch(model, 2, seed=3)
    from methods.llava import ReducedLlava  # noqa: PLC0415

    rel = torch.zeros(2, 16, dtype=torch.bool)
    rel[0, [2, 7]] = True
    rel[1, [0, 5, 9, 15]] = True
    run = ReducedLlava(model, create_reducer("oracle", 4))
    state = run.prefill(ids, mask, pixels, relevant=rel)
    kept = [state.trace.sample(i, 16)["kept_indices"] for i in range(2)]
    assert set(kept[0]) >= {2, 7} and len(kept[0]) == 4 and kept[1] == [0, 5, 9, 15]
    with pytest.raises(ValueError, match="relevant patches"):
        run.prefill(ids, mask, pixels)  # a batch without them is refused


def test_refused_in_one_line_where_no_relevant_patches_are_recorded():
    assert get_reducer_class("oracle").reference and not get_reducer_class("random").reference
    spec = RunSpec(model=SMOKE_MODEL, methods=("oracle",), budgets=(16,), tasks=("pope",), limit=2)
    only = "only synth_vqa, synth_scenes, synth_scenes_followup record; pope does not"
    with pytest.raises(ValueError, match=only) as e:
        make_plan(spec)
    assert "\n" not in str(e.value)
    default = make_plan(RunSpec(model=SMOKE_MODEL, budgets=(16,), tasks=("pope",), limit=2))  # the default set
    assert "oracle" not in {c.method for c in default.cells}
    assert any(n.startswith("oracle skipped: oracle reads each question's relevant_patches") for n in default.notes)

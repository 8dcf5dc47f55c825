"""Train the Qwen2.5-VL smoke model (a small Qwen2.5-VL-format model) on the synthetic VQA task, on CPU.

The LLaVA smoke model's recipe (`train.py` at 5f8822a: its model card has the numbers behind each choice) carried
over to this family, with what the family changes:

1. **Vision tower alone** (patch embedding, windowed and full-attention blocks, the 2 x 2 merger), with auxiliary
   heads on the merger's outputs: a 96 px image is 24 x 24 patches of 4 px merged into 12 x 12 tokens of 8 px,
   the synthetic task's own patch grid, so each merged token gets the labels `train.make_pool` gives a patch
   (colour and shape of the object covering it, an object centre, its row, column and left/right half), and the
   mean of the tokens the (colour, shape) pairs present. There is no CLS token to train.
2. **LLM** (decoder, embeddings, head) with the tower frozen (the merged tokens cached), on the answer token and
   ``<|im_end|>``, with the evaluation prompt (`methods.qwen.qwen_prompt` around the task's `doc_to_text`). The same
   curriculum (object tokens first, few of them) and random token dropping (`train.pick_tokens`); a dropped token
   leaves the sequence and every kept one keeps its M-RoPE position (t, row, column offsets from the image's start;
   the text after the image resumes at the start + 12), which is what the harness does for every reduction on
   this family.
3. **Stage 2 again**, no curriculum, fresh optimiser and schedule.
4. **Counting focus**: stage 2 at half the learning rate on a subset where half the questions are count questions.

**Resumable**, as `train.py`: finished stages and snapshots every `save_every` steps go to a work folder (``--work``,
by default ``OUT.work`` beside ``--out``), keyed by every setting a stage depends on (`train.WorkFolder`); rerunning
the same command after an interruption continues from the last snapshot with the same result.

Usage::

    python -m benchmarks.smoke_model.train_qwen --out benchmarks/smoke_model/qwen_checkpoint
    python -m benchmarks.smoke_model.train_qwen --tiny --out /tmp/tiny_qwen                # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks.smoke_model.build_qwen import QWEN_MEAN, QWEN_STD, build_qwen_model, build_qwen_processor, save_qwen
from benchmarks.smoke_model.train import (
    IGNORE,
    N_PAIRS,
    Pool,
    WorkFolder,
    make_pool,
    optimise,
    pick_tokens,
    stage_settings,
    until_interrupted,
    work_folder,
)
from benchmarks.tasks.synthetic.generate import GRID, NUM_PATCHES, QTYPES, SPLIT_SEEDS, SYNTH_VQA, Sample
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text, normalize_answer
from methods import create_reducer
from methods.qwen import ReducedQwen, qwen_prompt

# 4 px patches merged 2 x 2: 144 tokens of 8 px on a 96 px image; windows of 4 x 4 tokens (9 per image) in blocks 0
# and 1, full attention in block 2 (Qwen2.5-VL: every eighth block, the last one included); a 3-layer LLM with
# grouped-query attention (4 query, 2 key/value heads), as wide as the LLaVA smoke model's
QWEN_SMOKE_ARCH = {"patch_size": 4, "merge": 2, "window_tokens": 4, "vision_hidden": 64, "vision_depth": 3,
                   "full_blocks": (2,), "vision_heads": 4, "text_hidden": 128, "text_layers": 3, "text_heads": 4,
                   "kv_heads": 2}
TARGET_FULL, TARGET_DROP = 0.85, 0.15  # held-out targets reported in the card: full, and random 1/9 below it


@dataclass
class QwenTrainConfig:
    """Everything that determines a training run (field names as `train.TrainConfig`'s, which `pick_tokens` reads)."""

    n_train: int = 16000
    n_test: int = 1000
    stage1_steps: int = 3000  # shape per token breaks out of its plateau (~0.4) only after ~1,800 steps
    stage2_steps: int = 5000
    stage3_steps: int = 2000
    stage4_steps: int = 1500
    stage4_count_share: float = 0.5
    stage1_batch: int = 16  # 576 patches per image: half the LLM stages' batch
    batch_size: int = 32
    lr_vision: float = 2e-3
    lr_llm: float = 1e-3
    drop_prob: float = 0.5
    drop_k_range: tuple[int, int] = (2, 96)
    drop_start: float = 0.0
    favour_prob: float = 0.5
    objects_first: float = 0.65
    seed: int = 0
    eval_keep: int = 16  # the random check: 16 of 144 tokens (1/9)
    model_kwargs: dict = field(default_factory=lambda: dict(QWEN_SMOKE_ARCH))
    log_every: int = 50
    save_every: int = 250  # steps between a stage's resumable snapshots (with a work folder)

    def stage_inputs(self, stage: int) -> dict:
        """What stage `stage` (1-4) depends on (`train.stage_settings`), synth_vqa's question types and seed too."""
        return stage_settings(self, stage, ("n_train", "stage1_steps", "stage1_batch", "lr_vision", "seed",
                                            "model_kwargs"), {"n_test", "eval_keep", "log_every", "save_every"},
                              {"synth_vqa": [QTYPES, SPLIT_SEEDS["train"]]})

    @classmethod
    def tiny(cls) -> QwenTrainConfig:
        return cls(n_train=96, n_test=16, stage1_steps=8, stage2_steps=16, stage3_steps=4, stage4_steps=4,
                   stage1_batch=8, batch_size=8, lr_vision=3e-3, lr_llm=3e-3, log_every=4, save_every=5,
                   model_kwargs={**QWEN_SMOKE_ARCH, "vision_hidden": 32, "vision_depth": 2, "full_blocks": (1,),
                                 "text_hidden": 32, "text_layers": 2})


def patchify(images: Tensor, patch: int, merge: int, temporal: int = 2) -> Tensor:
    """uint8 (B, H, W, 3) images whose sides are multiples of patch x merge -> the processor's `pixel_values`
    (B x h x w, 3 x temporal x patch^2): normalised, each frame repeated `temporal` times, patches in merge-block
    order (each merged token's merge^2 patches together, blocks row by row)."""
    b, hh, ww, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(QWEN_MEAN).view(1, 3, 1, 1)) / torch.tensor(QWEN_STD).view(1, 3, 1, 1)  # (B, 3, H, W)
    x = x.unsqueeze(2).expand(-1, -1, temporal, -1, -1)  # (B, 3, T, H, W)
    gh, gw = hh // patch, ww // patch
    x = x.reshape(b, 3, temporal, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 1, 2, 5, 8)  # (B, gh/m, gw/m, m, m, 3, T, p, p)
    return x.reshape(b * gh * gw, 3 * temporal * patch * patch)


def grids(b: int, side: int) -> Tensor:
    return torch.tensor([[1, side, side]]).expand(b, -1)


class MergedAux(nn.Module):
    """Stage-1 heads on the merged tokens: per token colour, shape, centre, side, row, column; pairs present from
    their mean."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.token = nn.Linear(dim, 7 + 5 + 1 + 1 + GRID + GRID)
        self.pooled = nn.Linear(dim, N_PAIRS)

    def loss(self, merged: Tensor, pool: Pool, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
        h = self.token(merged)  # (B, P, 38)
        colour, shape, centre, side, row, col = h.split([7, 5, 1, 1, GRID, GRID], dim=-1)
        pos = torch.arange(NUM_PATCHES)
        rows, cols = (pos // GRID).expand(len(idx), -1), (pos % GRID).expand(len(idx), -1)
        pc, ps = pool.patch_color[idx], pool.patch_shape[idx]
        parts = {
            "color": F.cross_entropy(colour.flatten(0, 1), pc.flatten()),
            "shape": F.cross_entropy(shape.flatten(0, 1), ps.flatten(), ignore_index=IGNORE),
            "center": F.binary_cross_entropy_with_logits(centre.squeeze(-1), pool.patch_center[idx]),
            "rowcol": 0.5 * (F.cross_entropy(row.flatten(0, 1), rows.flatten())
                             + F.cross_entropy(col.flatten(0, 1), cols.flatten())),
            "side": F.binary_cross_entropy_with_logits(side.squeeze(-1), (cols >= GRID // 2).float()),
            "presence": F.binary_cross_entropy_with_logits(self.pooled(merged.mean(1)), pool.presence[idx]),
        }
        total = parts["color"] + parts["shape"] + parts["presence"] + 0.5 * (parts["center"] + parts["rowcol"]
                                                                             + parts["side"])
        logs = {k: v.item() for k, v in parts.items()}
        logs["acc_color"] = float((colour.argmax(-1) == pc)[pc > 0].float().mean())
        logs["acc_shape"] = float((shape.argmax(-1) == ps)[ps > 0].float().mean())
        return total, logs


def merged_tokens(model, images: Tensor) -> Tensor:
    """(B, 96, 96, 3) uint8 -> (B, 144, D) the merger's outputs, in raster order of the 12 x 12 token grid."""
    vc = model.config.vision_config
    side = images.shape[1] // vc.patch_size
    out = model.model.visual(patchify(images, vc.patch_size, vc.spatial_merge_size), grid_thw=grids(len(images), side))
    return out.pooler_output.view(len(images), -1, out.pooler_output.shape[-1])


def train_vision(model, pool: Pool, cfg: QwenTrainConfig, snap=None) -> list[dict]:
    """Stage 1: the vision tower and merger with the auxiliary heads (discarded afterwards). `snap(modules,
    generators)` gives the stage's `train.Snapshot` (None: not resumable)."""
    visual = model.model.visual
    aux = MergedAux(model.config.text_config.hidden_size)
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def batch_loss(step: int) -> tuple[Tensor, dict]:
        idx = torch.randint(len(pool.samples), (cfg.stage1_batch,), generator=gen)
        loss, parts = aux.loss(merged_tokens(model, pool.images[idx]), pool, idx)
        return loss, {"stage": 1, **parts}

    visual.train()
    log = optimise([*visual.parameters(), *aux.parameters()], cfg.stage1_steps, cfg.lr_vision, batch_loss,
                   "stage 1 (vision)", cfg.log_every, ("loss", "acc_color", "acc_shape"),
                   snap(nn.ModuleList([visual, aux]), [gen]) if snap else None)
    visual.eval()
    return log


@torch.no_grad()
def cache_merged(model, images: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([merged_tokens(model, images[i:i + batch]).half()
                      for i in tqdm(range(0, len(images), batch), desc="cache merged tokens", leave=False)])


@dataclass
class QwenPrompts:
    """Tokenised prompts ``prefix <|image_pad|>*144 suffix``; targets ``answer <|im_end|>``."""

    prefix: list[int]  # system turn, "user", <|vision_start|>
    suffix: list[list[int]]  # <|vision_end|>, question, post-prompt, <|im_end|>, "assistant"
    answer: list[int]


def tokenize(processor, samples: list[Sample]) -> QwenPrompts:
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    cache: dict[str, list[int]] = {}
    prefix, suffix, answer = None, [], []
    for s in samples:
        if s.question not in cache:
            cache[s.question] = tok(qwen_prompt(processor, doc_to_text({"question": s.question}))).input_ids
        ids = cache[s.question]
        cut = ids.index(image_id)
        if ids.count(image_id) != 1 or (prefix is not None and ids[:cut] != prefix):
            raise ValueError("expected one <|image_pad|> after the same prefix in every prompt")
        prefix = ids[:cut]
        suffix.append(ids[cut + 1:])
        ans = tok(s.answer, add_special_tokens=False).input_ids
        if len(ans) != 1 or ans[0] == tok.unk_token_id:
            raise ValueError(f"answer {s.answer!r} is not one known token")
        answer.append(ans[0])
    return QwenPrompts(prefix or [], suffix, answer)


def splice(model, prompts: QwenPrompts, idx: list[int], feats: Tensor, kept: Tensor | None, pad_id: int
           ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``prefix | kept merged tokens | suffix | answer`` with M-RoPE positions (3, B, T): text on all
    three axes, image token (row, col) at (p, p + row, p + col) for an image starting at p, the suffix from p + 12
    on (as `get_rope_index` gives them; a dropped token leaves its position unused). Returns embeddings,
    positions and the target positions (B, 2)."""
    b, k = feats.shape[:2]
    idx_kept = torch.arange(NUM_PATCHES).expand(b, -1) if kept is None else kept  # (B, K) raster indices
    p = len(prompts.prefix)
    rows = [prompts.prefix + [0] * k + prompts.suffix[i] + [prompts.answer[i]] for i in idx]
    t = max(len(r) for r in rows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    pos = torch.zeros(3, b, t, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        after = torch.arange(len(r) - p - k) + p + GRID  # the suffix and answer resume at the start + 12
        pos[:, j, :p] = torch.arange(p)
        pos[0, j, p:p + k] = p
        pos[1, j, p:p + k], pos[2, j, p:p + k] = p + idx_kept[j] // GRID, p + idx_kept[j] % GRID
        pos[:, j, p + k:len(r)] = after
        pos[:, j, len(r):] = after[-1] + 1 + torch.arange(t - len(r))
    emb = model.get_input_embeddings()(ids)  # (B, T, D)
    emb[:, p:p + k] = feats.to(emb.dtype)
    ends = torch.tensor([len(r) for r in rows])
    return emb, pos, torch.stack([ends - 2, ends - 1], dim=1)


def train_llm(model, processor, pool: Pool, feats: Tensor, cfg: QwenTrainConfig, stage: int = 2,
              snap=None) -> list[dict]:
    """Stage 2 (3, 4): the LLM on the answer loss, the tower frozen, with the curriculum and random token dropping
    of `train.pick_tokens`; `snap` as in `train_vision`."""
    prompts = tokenize(processor, pool.samples)
    answers = torch.tensor(prompts.answer)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    lm, head = model.model.language_model, model.lm_head
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    def batch_loss(step: int) -> tuple[Tensor, dict]:
        idx = torch.randint(len(pool.samples), (cfg.batch_size,), generator=gen)
        f = feats[idx].float()
        kept, mode = pick_tokens(step, cfg, pool, idx, gen)
        if kept is not None:
            f = f.gather(1, kept.unsqueeze(-1).expand(-1, -1, f.shape[-1]))
        emb, pos, tgt = splice(model, prompts, idx.tolist(), f, kept, tok.pad_token_id)
        hidden = lm(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state  # causal, no padding seen
        logits = head(hidden.gather(1, tgt.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])))  # (B, 2, V)
        labels = torch.stack([answers[idx], torch.full_like(answers[idx], eos)], dim=1)
        acc = float((logits[:, 0].argmax(-1) == labels[:, 0]).float().mean())
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), {"stage": stage, "acc": acc,
                                                                          "k": f.shape[1], "mode": mode}

    lm.train()
    log = optimise([*lm.parameters(), *head.parameters()], cfg.stage2_steps, cfg.lr_llm, batch_loss,
                   f"stage {stage} (LLM)", cfg.log_every, ("loss", "acc"), snap(model, [gen]) if snap else None)
    model.eval()
    return log


@torch.no_grad()
def evaluate(model, processor, samples: list[Sample], method: str = "full", budget: int | None = None,
             batch_size: int = 50) -> dict[str, float]:
    """Held-out accuracy through the harness's own adapter (`ReducedQwen`, greedy, the processor's inputs)."""
    run = ReducedQwen(model, create_reducer(method, budget))
    tok = processor.tokenizer
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]
    hits: dict[str, list[float]] = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        texts = [qwen_prompt(processor, doc_to_text({"question": s.question})) for s in chunk]
        inputs = processor(images=[Image.fromarray(s.image) for s in chunk], text=texts, padding=True,
                           return_tensors="pt")
        gen = run.generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                           inputs["image_grid_thw"], max_new_tokens=3, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        for s, row, n in zip(chunk, gen.tokens, gen.lengths, strict=True):
            pred = tok.decode(row[:n], skip_special_tokens=True)
            hits.setdefault(s.qtype, []).append(float(normalize_answer(pred) == normalize_answer(s.answer)))
    result = {"overall": float(np.mean([h for v in hits.values() for h in v]))}
    result.update({f"acc_{q}": float(np.mean(v)) for q, v in hits.items()})
    return result


def train(cfg: QwenTrainConfig, out: Path | None = None, command: str = "", work_dir: Path | None = None) -> dict:
    """Run the four stages (resuming from `work_dir`'s finished stages and snapshots, `train.WorkFolder`), evaluate
    on the held-out split, and save the checkpoint with its card to `out` (None: no save)."""
    torch.manual_seed(cfg.seed)
    timing = {}
    t0 = time.perf_counter()
    pool = make_pool(SYNTH_VQA, cfg.n_train, SPLIT_SEEDS["train"])
    test = [SYNTH_VQA.sample(SPLIT_SEEDS["test"], i) for i in range(cfg.n_test)]
    timing["data_s"] = time.perf_counter() - t0
    model, processor = build_qwen_model(**cfg.model_kwargs, seed=cfg.seed), build_qwen_processor()
    work = WorkFolder(work_dir, cfg)
    log, timing["stage1_s"] = work.run(1, model, lambda snap: train_vision(model, pool, cfg, snap))
    t = time.perf_counter()
    feats = cache_merged(model, pool.images)
    timing["features_s"] = time.perf_counter() - t
    more, timing["stage2_s"] = work.run(2, model, lambda snap: train_llm(model, processor, pool, feats, cfg, 2, snap))
    log += more
    stage3 = replace(cfg, stage2_steps=cfg.stage3_steps, objects_first=0.0, seed=cfg.seed + 5)
    more, timing["stage3_s"] = work.run(3, model, lambda snap: train_llm(model, processor, pool, feats, stage3, 3,
                                                                          snap))
    log += more
    counts = torch.tensor([s.qtype == "count" for s in pool.samples])
    gen = torch.Generator().manual_seed(cfg.seed + 11)
    others = (~counts).nonzero().flatten()
    n_other = int(counts.sum() * (1 - cfg.stage4_count_share) / cfg.stage4_count_share)
    pick = torch.cat([counts.nonzero().flatten(), others[torch.randperm(len(others), generator=gen)[:n_other]]])
    stage4 = replace(cfg, stage2_steps=cfg.stage4_steps, objects_first=0.0, lr_llm=cfg.lr_llm / 2, seed=cfg.seed + 11)
    more, timing["stage4_s"] = work.run(4, model, lambda snap: train_llm(model, processor, pool.subset(pick),
                                                                          feats[pick], stage4, 4, snap))
    log += more
    t = time.perf_counter()
    results = {"full": evaluate(model, processor, test),
               f"random_{cfg.eval_keep}": evaluate(model, processor, test, "random", cfg.eval_keep)}
    timing["eval_s"] = time.perf_counter() - t
    timing["total_s"] = sum(timing.values())  # a resumed stage counts the time of every run of it
    if out is not None:
        save_qwen(model, processor, Path(out))
        (Path(out) / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(out) / "train_log.json").write_text(json.dumps(log) + "\n")
        write_card(Path(out), model, cfg, results, timing, command)
    return {"results": results, "timing": timing, "log": log, "model": model, "processor": processor}


def write_card(out: Path, model, cfg: QwenTrainConfig, results: dict, timing: dict, command: str) -> None:
    vc, tc = model.config.vision_config, model.config.text_config
    parts = {"vision tower and merger": sum(p.numel() for p in model.model.visual.parameters()),
             "LLM (+ lm_head)": sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)}
    full, rnd = results["full"], results[f"random_{cfg.eval_keep}"]
    qtypes = [k for k in full if k.startswith("acc_")]
    rows = [f"| {name} | {r['overall']:.3f} | " + " | ".join(f"{r.get(q, float('nan')):.3f}" for q in qtypes) + " |"
            for name, r in results.items()]
    mins = timing["total_s"] / 60
    side, win = 96 // vc.patch_size, vc.window_size // (vc.patch_size * vc.spatial_merge_size)
    card = f"""# Qwen2.5-VL smoke model: {sum(parts.values()):,} parameters for the synthetic VQA task

Trained from scratch on CPU by `benchmarks/smoke_model/train_qwen.py` on `synth_vqa`. Standard Hugging Face format:
`Qwen2_5_VLForConditionalGeneration.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`, offline. It
exists to make token-reduction results on this family testable on CPU; it knows nothing outside this benchmark.

## Architecture

- Vision: Qwen2.5-VL's tower, {vc.patch_size} px patches (a 96 px image is {side} x {side} patches),
  width {vc.hidden_size}, {vc.depth} blocks (block {', '.join(map(str, vc.fullatt_block_indexes))} with full
  attention, the others in windows of {vc.window_size} px = {win} x {win} merged tokens), {vc.num_heads} heads; the
  merger turns each 2 x 2 group into one of 144 LLM tokens (12 x 12, the task's patch grid). No CLS token.
- LLM: Qwen2 decoder, width {tc.hidden_size}, {tc.num_hidden_layers} layers, {tc.num_attention_heads} query and
  {tc.num_key_value_heads} key/value heads, SwiGLU MLP {tc.intermediate_size}, M-RoPE; word-level tokenizer with
  Qwen's special tokens, Qwen2.5-VL-Instruct's chat template (`benchmarks/smoke_model/build_qwen.py`).

| part | parameters |
|---|---|
""" + "\n".join(f"| {k} | {v:,} |" for k, v in parts.items()) + f"""

## Training

Command (seeds fixed, `torch.set_num_threads(2)`): `{command or 'python -m benchmarks.smoke_model.train_qwen'}`

- Data: {cfg.n_train} `synth_vqa` training questions (one image each), split seed {SPLIT_SEEDS['train']}.
- Stage 1, vision tower and merger: {cfg.stage1_steps} steps, batch {cfg.stage1_batch}, AdamW lr {cfg.lr_vision};
  per-token heads on the merger's outputs (colour, shape, object centre, row, column, left/right half) and a
  (colour, shape) presence head on their mean.
- Stage 2, tower frozen (merged tokens cached), LLM: {cfg.stage2_steps} steps, lr {cfg.lr_llm}, loss on the answer
  token and `<|im_end|>`; the first {cfg.objects_first:.0%} of the steps keep K in [8, 48] tokens, object tokens first;
  afterwards {cfg.drop_prob:.0%} of the batches keep K log-uniform in {list(cfg.drop_k_range)}; kept tokens keep their
  M-RoPE positions.
- Stage 3: stage 2 again, {cfg.stage3_steps} steps, fresh optimiser, no curriculum. Stage 4: {cfg.stage4_steps}
  steps on a half-count subset at lr {cfg.lr_llm / 2}.
- Wall time on a 2-core CPU machine (shared): """ + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timing.items()
                                                               if k != "total_s") + f""", total {mins:.1f} min.

## Held-out accuracy

{cfg.n_test} test questions (split seed {SPLIT_SEEDS['test']}), greedy decoding through the harness's Qwen2.5-VL
adapter (`methods.qwen.ReducedQwen`) on the processor's inputs, normalised exact match. `random_{cfg.eval_keep}` is the
`random` method at {cfg.eval_keep} of the 144 tokens (1/9).

| setting | overall | {' | '.join(q[4:] for q in qtypes)} |
|---|---|{'---|' * len(qtypes)}
""" + "\n".join(rows) + f"""

Full minus random-1/9: {full['overall'] - rnd['overall']:+.3f} overall. Targets: full >= {TARGET_FULL}
({'met' if full['overall'] >= TARGET_FULL else 'NOT met'}); random-1/9 at least {TARGET_DROP} below full
({'met' if full['overall'] - rnd['overall'] >= TARGET_DROP else 'NOT met'}).
"""
    (out / "MODEL_CARD.md").write_text(card)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smoke_model.train_qwen", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tiny", action="store_true", help="a seconds-long run of a tiny model, for tests")
    p.add_argument("--work", type=Path, default=None, metavar="DIR",
                   help="keep finished stages and snapshots here, so that a rerun of the same command resumes "
                   "(default: OUT.work beside --out)")
    args = p.parse_args(argv)
    work = work_folder(p, args.work, args.out)
    torch.set_num_threads(2)
    cfg = QwenTrainConfig.tiny() if args.tiny else QwenTrainConfig()
    command = "python -m benchmarks.smoke_model.train_qwen " + " ".join(sys.argv[1:])
    res = until_interrupted(work, lambda: train(cfg, args.out, command=command, work_dir=work))
    print(json.dumps({"results": res["results"], "timing": res["timing"], "config": asdict(cfg)}, indent=2,
                     default=str))

if __name__ == "__main__":
    main()

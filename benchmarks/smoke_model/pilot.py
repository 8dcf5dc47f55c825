"""The smoke model's depth/width pilot (issue 33): what one stage-2 training step costs for LLMs of several depths
and widths on this CPU, and what the committed recipe's LLM stages would take with each.

A step is the recipe's: batch 32, forward, loss on the last two positions, backward and an AdamW update of the LLM
and its head, on 144 image tokens (every token) and on 24 (a curriculum or dropped batch), plus 22 text tokens.
The recipe's minutes weigh the two costs by the recipe's own mix (curriculum steps and dropped batches at the
24-token cost, full batches at the 144-token cost). Run it alone on the machine: two jobs on 2 cores halve each
other's speed.

    python -m benchmarks.smoke_model.pilot            # writes benchmarks/smoke_model/pilot.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from benchmarks.smoke_model.build import build_model
from benchmarks.smoke_model.train import SMOKE_ARCH, TrainConfig

SHAPES = ((8, 128), (6, 128), (8, 96), (10, 96), (12, 96), (8, 64))  # (layers, width) of the LLM
TEXT = 22  # text tokens around the image in a training prompt
OUT = Path(__file__).with_name("pilot.json")


def step_ms(layers: int, width: int, image_tokens: int, steps: int = 6) -> tuple[float, int]:
    """Median ms of one training step (after a warm-up step) and the LLM's parameters."""
    kw = {**SMOKE_ARCH, "text_layers": layers, "text_hidden": width}
    model = build_model(seed=0, **kw)
    lm, head = model.model.language_model, model.lm_head
    params = [*lm.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    emb = torch.randn(32, image_tokens + TEXT, width)
    pos = torch.arange(image_tokens + TEXT).expand(32, -1)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        hidden = lm(inputs_embeds=emb, position_ids=pos, use_cache=False).last_hidden_state
        loss = head(hidden[:, -2:]).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times[1:])[len(times[1:]) // 2], sum(p.numel() for p in params)


def recipe_minutes(cfg: TrainConfig, ms_full: float, ms_few: float) -> float:
    """Minutes of the recipe's LLM stages (2-4) at these step costs."""
    def stage(steps: int, curriculum: float) -> float:
        few = steps * (curriculum + (1 - curriculum) * cfg.drop_prob)
        return few * ms_few + (steps - few) * ms_full
    total = (stage(cfg.stage2_steps, cfg.objects_first) + stage(cfg.stage3_steps, cfg.stage3_objects_first)
             + stage(cfg.stage4_steps, 0.0))
    return total / 6e4


def main() -> None:
    torch.set_num_threads(2)
    cfg, rows = TrainConfig(), []
    conditions = (f"Measured by `python -m benchmarks.smoke_model.pilot` on {platform.machine()}, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__}, float32, batch {cfg.batch_size}.")
    for layers, width in SHAPES:
        full, n = step_ms(layers, width, 144)
        few, _ = step_ms(layers, width, 24)
        rows.append({"layers": layers, "width": width, "llm_parameters": n, "ms_per_step_144": round(full, 1),
                     "ms_per_step_24": round(few, 1), "recipe_min": round(recipe_minutes(cfg, full, few), 1)})
        print(rows[-1], flush=True)
        tmp = OUT.with_name(f".{OUT.name}.tmp")  # after every shape, atomically: an interrupt keeps the rows so far
        tmp.write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=1) + "\n")
        tmp.replace(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

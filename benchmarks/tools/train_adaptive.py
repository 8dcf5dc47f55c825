"""Train an adaptive token-pruning controller with the LM loss only and a random budget per batch.

    python -m benchmarks.tools.train_adaptive --model benchmarks/smoke_model/checkpoint --method adaptive_b
    accelerate launch --num_processes 8 -m benchmarks.tools.train_adaptive --model /ckpt/llava-1.5-7b-hf \\
        --method adaptive_a --data /data/llava_v1_5_mix665k.json --image-folder /data/images --budget-range 0.05 0.5
    python -m benchmarks.tools.train_adaptive --model /ckpt/Qwen2.5-VL-7B-Instruct --method adaptive_b --data ...

Any checkpoint folder the harness runs (LLaVA-1.5 or Qwen2.5-VL, told apart by its config); on Qwen2.5-VL only
the controllers that score each token (`adaptive_b`, `budget_blind`) train, on the merger's output.

The vision encoder and the LLM are frozen by default; `--train-projector` and `--lora-rank R` (peft LoRA on the
LLM's attention projections) unfreeze more. Each batch draws one budget K uniformly from `--budget-range` (as a
share of the patches); the controller must pick exactly K patches; the answer tokens' cross-entropy is the only
training signal (no FLOPs or sparsity term). On Qwen2.5-VL, whose images differ in size, the batch's one draw is a
share f of each image's own tokens (floor(f x tokens), at least 1, as `--budgets 0.25` runs it). By default it
reaches the controller through the score function (REINFORCE): every question runs with `--samples` Gumbel top-K
draws, each draw's advantage is the other draws' mean answer loss minus its own, and the loss is -advantage x
log-probability of the draw; the model itself needs no backward pass. `--estimator straight_through` uses the plan's
straight-through Gumbel-softmax instead (see methods/adaptive.py for why it is not the default). Only the new
modules are saved (the controller's weights and config, a few hundred KB), into `--out` (default
MODEL/controllers/METHOD/seed<SEED>, where the runner finds every seed). With `--train-projector` (LLaVA: the
multimodal projector; Qwen2.5-VL: the vision tower's patch merger) or LoRA, the trained model is also saved as a
checkpoint folder of the same family in OUT/model; evaluate with `--model OUT/model`.
A killed run resumes from OUT/train_state.pt when started again with the same command.

Data: synthetic tasks' train splits, generated on the fly and interleaved (default `--data synth_vqa,synth_scenes`,
the LLaVA smoke model's tasks; `--data synth_vqa` for the Qwen2.5-VL smoke model, which knows that task only; `synth`
is `synth_vqa`, as controllers trained before `synth_scenes` recorded it), or a LLaVA-format JSON list of
{"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}
(the first human/gpt turn is used).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from benchmarks.defaults import controller_dir, go_offline
from benchmarks.plan import read_config
from benchmarks.tasks.synthetic.generate import SYNTH_VQA, Generator
from benchmarks.tasks.synthetic.scenes import SYNTH_SCENES
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from methods import create_reducer, get_reducer_class, list_reducers
from methods.adaptive import ESTIMATORS
from methods.budget import Budget
from methods.cli import OneLineParser, at_least, check_device, first_line
from methods.families import LLAVA, Family, family_of
from methods.qwen import fraction_counts

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m benchmarks.tools.train_adaptive", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", type=Path, required=True,
                   help="local checkpoint folder (llava-hf LLaVA-1.5 or Qwen2.5-VL)")
    learned = [m for m in list_reducers() if get_reducer_class(m).needs_checkpoint]
    p.add_argument("--method", required=True, choices=learned)
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"synthetic tasks' train splits, comma-separated and interleaved (default {DEFAULT_DATA}; "
                   "'synth' is synth_vqa), or a LLaVA-format JSON file")
    p.add_argument("--image-folder", type=Path, default=None, help="folder the JSON's image paths are relative to")
    p.add_argument("--synth-samples", type=at_least(1), default=20000,
                   help="synthetic training questions, over the tasks of --data")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: MODEL/controllers/METHOD/seedSEED)")
    p.add_argument("--steps", type=at_least(1), default=600)
    p.add_argument("--batch-size", type=at_least(1), default=32, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budget-range", type=float, nargs=2, default=(0.05, 0.5), metavar=("MIN", "MAX"),
                   help="budgets drawn per batch, as shares of the patches (default 0.05 0.5)")
    p.add_argument("--hidden", type=int, default=256, help="controller width")
    p.add_argument("--estimator", default="reinforce", choices=ESTIMATORS,
                   help="gradient estimator for the selection (default reinforce; see methods/adaptive.py)")
    p.add_argument("--samples", type=int, default=4,
                   help="reinforce: selections drawn per question, for the leave-one-out baseline (default 4)")
    p.add_argument("--tau", type=float, default=5.0,
                   help="Gumbel-softmax temperature of the straight-through estimator (AdaLLaVA: 5)")
    p.add_argument("--train-projector", action="store_true",
                   help="also train the projector (LLaVA's multimodal projector, Qwen2.5-VL's patch merger)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank on the LLM (0: LLM frozen)")
    p.add_argument("--save-every", type=at_least(1), default=100)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a controller already trained in OUT (its files move to OUT/replaced/)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--seed", type=at_least(0), default=0,
                   help="training seed (controller, data order, budgets, Gumbel draws); the default --out is seedSEED")
    p.add_argument("--device", default=None,
                   help="cpu or cuda (each process uses its own GPU); default: accelerate's choice")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- data


SYNTH_DATA: dict[str, Generator] = {  # --data NAME[,NAME]: the synthetic train splits it interleaves
    "synth_vqa": SYNTH_VQA,
    "synth_scenes": SYNTH_SCENES,
    "synth": SYNTH_VQA,  # what controllers trained before synth_scenes recorded (the generator's own name)
}
DEFAULT_DATA = "synth_vqa,synth_scenes"  # the LLaVA smoke model's tasks (the Qwen2.5-VL one knows synth_vqa only)


def synthetic(data: str) -> tuple[Generator, ...] | None:
    """The generators a --data value names (comma-separated synthetic tasks), or None for a JSON file."""
    names = data.split(",")
    return tuple(SYNTH_DATA[n] for n in names) if all(n in SYNTH_DATA for n in names) else None


class SynthTrain(torch.utils.data.Dataset):
    """Synthetic tasks' train splits (held out from the test splits by their seeds), made on the fly and
    interleaved: item i is question i // T of task i % T's split."""

    def __init__(self, n: int, gens: tuple[Generator, ...] = (SYNTH_VQA,)) -> None:
        self.n, self.gens = n, gens

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        gen = self.gens[i % len(self.gens)]
        s = gen.sample(gen.seeds["train"], i // len(self.gens))
        return Image.fromarray(s.image), doc_to_text({"question": s.question}), s.answer


class LlavaJson(torch.utils.data.Dataset):
    """LLaVA-format conversations; the first human/gpt turn of each record that has an image."""

    def __init__(self, path: Path, image_folder: Path | None) -> None:
        try:
            records = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--data {path} is not a JSON file ({e}); give a LLaVA-format JSON list") from None
        if not isinstance(records, list):
            raise ValueError(f"--data {path} holds a JSON {type(records).__name__}, not the list of records LLaVA's "
                             "format has")
        self.items = []
        for r in records:
            turns = r.get("conversations", []) if isinstance(r, dict) else []
            if ("image" in r and isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns)
                    and turns[0].get("from") == "human" and turns[1].get("from") == "gpt"):
                self.items.append((r["image"], turns[0]["value"], turns[1]["value"]))
        if not self.items:
            raise ValueError(f"{path} holds no LLaVA-format records with an image and a human/gpt turn")
        self.folder = image_folder or Path(path).parent

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple:
        image, question, answer = self.items[i]
        return Image.open(self.folder / image).convert("RGB"), question, answer


class Collate:
    """Prompt + answer + end-of-sequence, left-padded; `answer_len` counts the answer's tokens (eos included). LLaVA's
    prompt ends in "ASSISTANT:" and the answer follows a space; Qwen2.5-VL's ends in "assistant\n" and the answer
    follows directly, ended by the tokenizer's end of turn (`<|im_end|>`)."""

    def __init__(self, processor, family: Family = LLAVA) -> None:
        self.processor, self.family = processor, family
        self.eos = processor.tokenizer.eos_token or ""
        self.sep = " " if family is LLAVA else ""

    def __call__(self, batch: list[tuple]) -> dict:
        images, questions, answers = zip(*batch, strict=True)
        prompts = [self.family.prompt(self.processor, q) for q in questions]
        full = [f"{p}{self.sep}{a}{self.eos}" for p, a in zip(prompts, answers, strict=True)]
        tok = self.processor.tokenizer
        lens = [len(tok(f).input_ids) - len(tok(p).input_ids) for p, f in zip(prompts, full, strict=True)]
        inputs = self.processor(images=list(images), text=full, return_tensors="pt", padding=True)
        return {**inputs, "answer_len": torch.tensor(lens)}


def answer_losses(tail_logits: torch.Tensor, input_ids: torch.Tensor, answer_len: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy of each sample's answer tokens. tail_logits (B, M+1, V): the last M+1 positions."""
    m = tail_logits.size(1) - 1
    targets = input_ids[:, -m:]  # (B, M)
    is_answer = torch.arange(m, device=targets.device).unsqueeze(0) >= (m - answer_len.to(targets.device)).unsqueeze(1)
    logits = tail_logits[:, :-1].float()  # position t predicts token t + 1
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return (loss.view_as(targets) * is_answer).sum(1) / is_answer.sum(1)


def step_loss(runner, batch: dict, budgets: torch.Tensor, estimator: str, samples: int,
              inputs: tuple[str, ...] = LLAVA.inputs) -> tuple[torch.Tensor, float]:
    """The loss to minimise for one batch, and the mean answer loss of the selections drawn (for the log).

    straight_through: the answer loss itself; its gradient reaches the scores through the Gumbel-softmax mask.
    reinforce: each question is run with `samples` independent selections; a selection's advantage is how much
    lower its answer loss is than the mean of the other draws for the same question (leave-one-out baseline), and
    the loss is -advantage x log-probability of the selection. The LM loss is the only signal either way.
    `runner` is the family's adapter (`ReducedLlava`, `ReducedQwen`); `inputs` the processor outputs it takes.
    """
    ids, answer_len = batch["input_ids"].to(budgets.device), batch["answer_len"]
    tail = int(answer_len.max()) + 1
    if estimator == "straight_through":
        state = runner.prefill(*(batch[k] for k in inputs), budgets=budgets, tail=tail)
        loss = answer_losses(state.tail_logits, ids, answer_len).mean()
        return loss, loss.item()

    def rep(x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (S * B, ...): draw s of question b at row s * B + b
        return x.repeat(samples, *[1] * (x.dim() - 1))  # Qwen's flattened patches repeat image after image, too

    state = runner.prefill(*(rep(batch[k]) for k in inputs), budgets=rep(budgets), tail=tail)
    per = answer_losses(state.tail_logits, rep(ids), rep(answer_len))  # (S * B,)
    lm = per.detach().view(samples, -1)  # (S, B)
    advantage = (lm.sum(0, keepdim=True) - lm) / (samples - 1) - lm  # (S, B) the other draws' mean loss minus this one
    loss = -(advantage * state.aux["log_prob"].view(samples, -1)).mean()
    if per.requires_grad:  # a trained projector or LoRA learns from the answer loss directly
        loss = loss + per.mean()
    return loss, lm.mean().item()


# ---------------------------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> Path:
    from accelerate import Accelerator  # noqa: PLC0415 - Hugging Face imports follow go_offline()


    acc = Accelerator(cpu=args.device == "cpu")
    device = "cpu" if args.device == "cpu" else str(acc.device)  # cuda: this process's own GPU (cuda:LOCAL_RANK)
    out = args.out
    torch.manual_seed(args.seed)  # the same initial weights (controller, LoRA) in every process
    random.seed(args.seed)
    gens = synthetic(args.data)
    data = SynthTrain(args.synth_samples, gens) if gens else LlavaJson(Path(args.data), args.image_folder)
    family = family_of(read_config(args.model))
    model, processor = family.load(args.model, device=device, dtype=args.dtype)
    model.requires_grad_(False)
    trained = []
    if args.train_projector:
        projector = model.model.multi_modal_projector if family is LLAVA else model.model.visual.merger
        projector.requires_grad_(True)
        trained += list(projector.parameters())
    if args.lora_rank:
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - only for --lora-rank

        lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        inject_adapter_in_model(lora, model.model.language_model)  # LoRA layers inside the LLM's own modules
        for name, p in model.model.language_model.named_parameters():
            p.requires_grad_("lora_" in name)
        trained += [p for name, p in model.model.language_model.named_parameters() if "lora_" in name]
    layout = family.layout(model.config)
    n = layout.num_patches if family.fixed_tokens else None  # None: images differ in size
    controller = new_controller(args, family, layout).to(device)
    if acc.process_index:  # each further process draws its own budgets and Gumbel noise (process 0 keeps the stream)
        torch.manual_seed(args.seed + acc.process_index)
    params = list(controller.parameters()) + trained
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(args.seed)  # the data order: each pass draws its shuffle from it
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=Collate(processor, family), generator=order, drop_last=True)
    loader = acc.prepare(loader)
    step, skip = 0, 0
    state_path = out / STATE_FILE
    if state_path.is_file():  # resume
        state = torch.load(state_path, map_location=device, weights_only=False)
        controller.load_state_dict(state["controller"])
        opt.load_state_dict(state["optimizer"])
        for p, saved in zip(trained, state["trained"], strict=True):
            p.data.copy_(saved)
        step = state["step"]
        torch.set_rng_state(state["rng"])  # the main process's state; the others get their own below
        if "order" in state:  # the pass it stopped in: its shuffle drawn again, the batches it had done skipped
            order.set_state(state["order"])
            skip = state["pass_step"]
            random.setstate(state["py_random"])
            np.random.set_state(state["np_random"])
        if acc.process_index:
            torch.manual_seed(args.seed + acc.process_index + 7919 * step)  # prime stride: no two (rank, step) collide
        acc.print(f"resumed from {state_path} at step {step}")
    if acc.is_main_process and (out / LOG_FILE).is_file():  # one run's log: drop steps after the state it resumes
        lines = (out / LOG_FILE).read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        (out / LOG_FILE).write_text("".join(f"{line}\n" for line in kept))
    plural = "es" if acc.num_processes > 1 else ""
    if n is not None:
        lo, hi = (Budget.fraction(f).tokens(n) if f < 1 else n for f in args.budget_range)  # the one share rule
        acc.print(f"training on {acc.num_processes} process{plural} ({device}), budgets {lo}-{hi} of {n} patches")
    else:
        acc.print(f"training on {acc.num_processes} process{plural} ({device}), budgets {args.budget_range[0]:g}-"
                  f"{args.budget_range[1]:g} of each image's tokens")
    runner = family.runner(model, controller)
    controller.train()
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.method}", disable=not acc.is_main_process)
    t0 = time.perf_counter()
    try:
        while step < args.steps:
            pass_start, pass_step = order.get_state(), skip  # before this pass draws its shuffle
            batches, skip = (acc.skip_first_batches(loader, skip) if skip else loader), 0
            for batch in batches:
                if step >= args.steps:
                    break
                if n is not None:
                    k = torch.randint(lo, hi + 1, (1,)).item()  # one budget per batch
                    budgets = torch.full((batch["input_ids"].size(0),), k, device=device)
                else:  # one share per batch: each image's own count
                    k = round(args.budget_range[0] + (args.budget_range[1] - args.budget_range[0])
                              * torch.rand(()).item(), 4)
                    budgets = fraction_counts(k, layout.tokens(batch["image_grid_thw"])).to(device)
                loss, lm_loss = step_loss(runner, batch, budgets, args.estimator, args.samples, family.inputs)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for p in params:  # average gradients over processes (the controller is small: no DDP wrapper needed)
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, reduction="mean")
                opt.step()
                step += 1
                pass_step += 1
                bar.update(1)
                bar.set_postfix(lm_loss=f"{lm_loss:.3f}", k=k)
                if acc.is_main_process:
                    out.mkdir(parents=True, exist_ok=True)
                    with open(out / LOG_FILE, "a") as f:
                        f.write(json.dumps({"step": step, "lm_loss": round(lm_loss, 5), "loss": round(loss.item(), 5),
                                            "budget": k, "elapsed_s": round(time.perf_counter() - t0, 2)}) + "\n")
                    if step % args.save_every == 0 or step == args.steps:
                        save(out, controller, opt, trained, step, model, processor, args, (pass_start, pass_step))
    finally:
        bar.close()  # before any message, so an error is the last line
    return out


def new_controller(args: argparse.Namespace, family: Family, layout):
    """An untrained controller for the model of `layout` (`Family.controller_config`: per patch of the vision tower's
    width on LLaVA, per merged token of the LLM's width on Qwen2.5-VL); a one-line error if the method cannot run
    there."""
    controller = create_reducer(args.method, 1, config=family.controller_config(
        layout, args.method, hidden=args.hidden, tau=args.tau, estimator=args.estimator))
    family.check_reducer(controller, layout)  # e.g. adaptive_a on Qwen2.5-VL
    return controller


def save(out: Path, controller, opt, trained, step: int, model, processor, args,
         data_pass: tuple[torch.Tensor, int]) -> None:
    """The resumable training state (atomic), and at the last step the controller's weights and config (what the
    runner loads: a folder holds a controller only once its training has finished, never a half-trained one)."""
    if step == args.steps:  # before the state: a run killed in between redoes its last steps, never loses them
        controller.save(out)
    state = {"controller": controller.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "trained": [p.detach().cpu() for p in trained], "rng": torch.get_rng_state(), "args": vars(args),
             "order": data_pass[0], "pass_step": data_pass[1], "py_random": random.getstate(),
             "np_random": np.random.get_state()}
    tmp = out / f".{STATE_FILE}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, out / STATE_FILE)
    except BaseException:  # Ctrl-C or a full disk mid-write: no partial file is left, the last state stands
        tmp.unlink(missing_ok=True)
        raise
    (out / "train_args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=2) + "\n")
    if trained and step == args.steps:
        if args.lora_rank:  # merge, so OUT/model is a plain llava-hf folder
            merge_lora(model.model.language_model)
        model.save_pretrained(out / "model")
        processor.save_pretrained(out / "model")


def merge_lora(module: torch.nn.Module) -> None:
    """Fold injected LoRA layers back into their base linear layers, leaving plain modules."""
    for name, child in list(module.named_children()):
        if hasattr(child, "merge") and hasattr(child, "base_layer"):
            child.merge()
            setattr(module, name, child.base_layer)
        else:
            merge_lora(child)


RESUME_IGNORES = {"steps", "save_every", "device", "debug", "overwrite"}  # may change between a run and its resume


def check_inputs(args: argparse.Namespace) -> None:
    """Everything wrong with the arguments that can be seen before the model loads, as one ValueError."""
    lo, hi = args.budget_range
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"--budget-range {lo} {hi}: need 0 < MIN <= MAX <= 1 (shares of the patches)")
    if args.estimator == "reinforce" and args.samples < 2:
        raise ValueError(f"--samples {args.samples}: reinforce needs at least 2 selections per question")
    if args.lr <= 0 or args.tau <= 0 or args.hidden < 1 or args.lora_rank < 0:
        raise ValueError("--lr and --tau must be > 0, --hidden >= 1 and --lora-rank >= 0")
    config = read_config(args.model)  # a checkpoint folder of a family the harness runs
    family = family_of(config)
    new_controller(args, family, family.layout(config))  # the method runs on this model (no weights load)
    if synthetic(args.data) is None and not Path(args.data).is_file():
        raise FileNotFoundError(f"--data {args.data}: no such file; give synthetic tasks ({', '.join(SYNTH_DATA)}, "
                                "comma-separated) or a LLaVA-format JSON file")
    if args.image_folder is not None and not args.image_folder.is_dir():
        raise FileNotFoundError(f"--image-folder {args.image_folder} is not a folder")
    if args.device:
        check_device(args.device)


def prepare_out(args: argparse.Namespace) -> str:
    """Decide what happens to OUT: 'new' (nothing trained there), 'resume' (a killed run with these settings),
    'done' (this training already finished). A finished controller of other settings is never replaced without
    --overwrite, and then its files move to OUT/replaced/ (so no log is ever mixed across runs)."""
    out = args.out
    state, trained = out / STATE_FILE, (out / "controller.json").is_file()
    settings = {k: str(v) for k, v in vars(args).items() if k not in RESUME_IGNORES}
    if state.is_file() and not args.overwrite:
        try:
            saved = torch.load(state, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file
            raise ValueError(f"{state} cannot be read ({type(e).__name__}); pass --overwrite to start over") from None
        before = {k: str(v) for k, v in saved.get("args", {}).items() if k not in RESUME_IGNORES}
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in sorted(changed.items()))
            raise ValueError(f"{out} holds a training run with other settings ({listed}); rerun with its settings to "
                             "resume it, pass --out DIR to train another, or --overwrite to replace it")
        return "done" if saved.get("step", 0) >= args.steps else "resume"
    if trained and not args.overwrite:
        raise ValueError(f"{out} already holds a trained {args.method} controller; pass --out DIR to train another, "
                         "or --overwrite to replace it (its files move to OUT/replaced/)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not a writable folder; pass another --out")
    if args.overwrite and out.is_dir():
        old = [f for f in out.iterdir() if f.name != "replaced"]
        if old:
            (out / "replaced").mkdir(exist_ok=True)
            for f in old:
                os.replace(f, out / "replaced" / f.name)
    return "new"


def main(argv: list[str] | None = None) -> int:
    go_offline()
    args = parse_args(argv)
    args.out = args.out or controller_dir(args.model, args.method, args.seed)
    try:
        check_inputs(args)
        if prepare_out(args) == "done":
            print(f"{args.out} already holds this training, finished ({args.steps} steps); nothing to do")
            return 0
        out = train(args)
    except KeyboardInterrupt:
        print(f"interrupted: the last saved step is in {args.out} (every --save-every {args.save_every} steps); "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, OSError, NotImplementedError) as e:
        if args.debug:
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"saved the controller to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

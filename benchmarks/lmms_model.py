"""`reduced_vlm`: an lmms-eval model that runs a local checkpoint of a supported family (LLaVA-1.5, Qwen2.5-VL;
`methods.families`, chosen from its config) through that family's adapter (`methods.llava.ReducedLlava`,
`methods.qwen.ReducedQwen`).

Usable three ways:

* from the runner (`run_bench.py`), which builds one instance per checkpoint and swaps the reducer per cell;
* from Python: `simple_evaluate(model=ReducedLMM(pretrained=PATH, method="full"), tasks=[...])`;
* from lmms-eval's own CLI, registered through the `lmms_eval.models` entry point of this package (no edit to
  lmms-eval): `python -m lmms_eval --model reduced_vlm --model_args pretrained=PATH,method=fastv,budget=64`
  (`reduced_llava`, its first name, still works).
  Every `model_args` key other than the ones below goes to the method's constructor (e.g. `layer=2`). Learned
  methods find their controller in PRETRAINED/controllers/<method> unless `checkpoint=DIR` is given. A mistake in
  `model_args` (unknown method or argument, bad budget, missing controller) ends the run with one line
  `error: ...` on stderr and exit status 2, as `run_bench.py` does (lmms-eval's CLI would otherwise print the
  traceback and exit 0).

Prompts follow the family's: the checkpoint's chat template renders a user turn holding the image and the task's
text (LLaVA-1.5: `USER: <image>\\n{text} ASSISTANT:`; Qwen2.5-VL-Instruct: its system turn, then the image span and
the text in the user turn); decoding is greedy with the KV cache. Multi-round tasks (lmms-eval's
`generate_until_multi_round`, e.g. `synth_scenes_followup`) are conversations about one image: each later question is
answered in the `conversation` mode, "prune-once" (on the cache, `methods._llm.LLMSide.ask_again`) or "re-prune"
(the whole conversation prefilled again). Per-sample token traces, batch times and a few model-input images go to the
model's `recorder` (`benchmarks.records.Recorder`, set by the runner), keyed
by (task, doc_id), for the runner to join with lmms-eval's sample logs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm
from transformers import AutoConfig

from benchmarks.defaults import CONVERSATIONS, controllers
from benchmarks.distributed import current_world
from benchmarks.plan import read_config
from benchmarks.records import Recorder, cache_value_bytes
from flops.analytic import conversation_kv_bytes, count, model_shape
from methods import TokenReducer, UnknownReducerError, create_reducer, get_reducer_class
from methods.budget import Budget
from methods.cli import first_line
from methods.families import family_of
from methods.trace import Timing

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 16


def manifests():
    """Entry point for lmms-eval's model registry (`[project.entry-points."lmms_eval.models"]`)."""
    return [ModelManifest(model_id=name, simple_class_path="benchmarks.lmms_model.ReducedLMM")
            for name in ("reduced_vlm", "reduced_llava")]


def lmms_eval_syntax(message: str, method: str | None = None) -> str:
    """Reword a message written for `run_bench.py`'s options in lmms-eval's: `--method-args M.ARG=V` becomes
    `ARG=V in --model_args`, `set M.ARG` becomes `set ARG in --model_args`, `pass --model PATH` becomes
    `pass pretrained=PATH in --model_args` and any other `--model PATH` `pretrained=PATH` (in lmms-eval `--model`
    names the model class). Commands quoted in backticks (another
    program's options, e.g. `python -m benchmarks.tools.train_adaptive --model MODEL`) are left as they are."""
    parts = message.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        text = re.sub(r"--method-args (\w+)\.(\w+=[^\s;,)]+)", r"\2 in --model_args", parts[i])
        if method:
            text = re.sub(rf"\bset {re.escape(method)}\.(\w+)", r"set \1 in --model_args", text)
        text = re.sub(r"\bpass --model ([^\s;,)]+)", r"pass pretrained=\1 in --model_args", text)
        parts[i] = re.sub(r"--model (?=\S)", "pretrained=", text)
    return "`".join(parts)


def check_conversation(mode: str) -> str:
    if mode not in CONVERSATIONS:
        raise ValueError(f"conversation must be one of {', '.join(CONVERSATIONS)}, got {mode!r}")
    return mode


def per_sample_ms(t: Timing, batch: int) -> dict:
    """A batch's times per sample (batch time / batch size), in milliseconds."""
    return {
        "prefill_ms": round(1e3 * t.prefill_s / batch, 4),
        "decode_ms_per_token": round(1e3 * t.decode_s / (t.decode_steps * batch), 4) if t.decode_steps else None,
        "reducer_ms": round(1e3 * t.reducer_s / batch, 4),
    }


def cli_message(e: BaseException, method: str | None, model_class: str = "ReducedLMM") -> str:
    """One line for a bad `--model_args`, worded as `run_bench.py` words the same mistake, in lmms-eval's syntax."""
    plain_key = isinstance(e, KeyError) and not isinstance(e, UnknownReducerError) and e.args
    text = first_line(ValueError(e.args[0]) if plain_key else e)  # str(KeyError) would quote the message
    if isinstance(e, TypeError):
        if method and model_class not in text:  # an argument the method's constructor does not take
            text = f"{method}: {text}; see the method's docstring for its arguments"
        else:
            text = f"reduced_vlm: {text}"
    return lmms_eval_syntax(text, method)


def pretrained_config(pretrained: str):
    """The config of `pretrained`: a local checkpoint folder (`plan.read_config`, its one-line errors), or a model id
    already in the local Hugging Face cache; a one-line FileNotFoundError when it is neither."""
    if Path(pretrained).is_dir():
        return read_config(Path(pretrained))
    try:
        config = AutoConfig.from_pretrained(pretrained, local_files_only=True)
    except Exception:  # noqa: BLE001 - transformers raises OSError, ValueError or HFValidationError for a bad id
        raise FileNotFoundError(f"--model {pretrained} is not a checkpoint folder (no config.json) nor a model in the "
                                "local Hugging Face cache") from None
    return config  # a foreign family is refused by the caller's `family_of`, in one line


class DocumentError(ValueError):
    """One document of a task cannot be evaluated (its image unreadable, refused, or not one image); the runner adds
    the task's data files to the message."""

    def __init__(self, task: str, doc_id: int, what: str) -> None:
        super().__init__(f"{task} doc {doc_id}: {what}")
        self.task, self.doc_id = task, doc_id


class ReducedLMM(lmms):
    """lmms-eval model: a LLaVA-1.5 or Qwen2.5-VL checkpoint with one token reducer.

    Args:
        pretrained: local checkpoint folder (llava-hf, or Qwen2.5-VL such as Qwen/Qwen2.5-VL-7B-Instruct).
        method: registered reducer name (`python run_bench.py --list`).
        budget: visual tokens the LLM sees (ignored by `full`): a count, or a fraction of each image's (0.25).
        batch_size: prompts per forward pass (left-padded; predictions do not depend on it).
        device: "cpu", "cuda", "cuda:1", ...; under several processes (`benchmarks.distributed`) "cuda" means
            each process's own GPU, cuda:LOCAL_RANK.
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16".
        max_new_tokens: default when a task does not set it.
        conversation: how a multi-round task's later turns are answered (`generate_until_multi_round`):
            "prune-once" (on the cache the previous turn left, the image reduced once) or "re-prune" (the whole
            conversation prefilled again from the full image, reduced again).
        **method_args: extra constructor arguments of the method (e.g. `layer=2`). A learned method (its class
            sets `needs_checkpoint`) given no `checkpoint` gets the controller trained for PRETRAINED with the lowest
            seed (PRETRAINED/controllers/<method>/seed<N>, `benchmarks.defaults.controllers`).

    Bad arguments raise here (ValueError, KeyError, FileNotFoundError, TypeError, ...), before the model loads
    where they can; only `create_from_arg_string` (lmms-eval's `--model_args`) turns them into an exit.
    """

    is_simple = True
    cli_errors = (ValueError, KeyError, FileNotFoundError, TypeError, NotImplementedError)  # bad input, not bugs

    def __init__(
        self,
        pretrained: str,
        method: str = "full",
        budget: int | float | None = None,
        batch_size: int | str = 1,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        conversation: str = "prune-once",
        max_batch_size: int | None = None,
        model=None,
        processor=None,
        **method_args,
    ) -> None:
        super().__init__()
        self.conversation = check_conversation(conversation)  # before the model loads, as every bad argument
        found = controllers(Path(pretrained), method) if get_reducer_class(method).needs_checkpoint else {}
        if found and "checkpoint" not in method_args:  # the lowest training seed's (seed0 when trained here)
            method_args["checkpoint"] = str(next(iter(found.values())))
        config = model.config if model is not None else pretrained_config(pretrained)
        self.family = family_of(config)
        if self.family.fixed_tokens and isinstance(budget, float) and 0 < budget < 1:  # every image has the same
            budget = Budget.fraction(budget).at(self.family.layout(config).num_patches)  # count: a fraction is one
        reducer = create_reducer(method, budget, **method_args)  # a bad method argument fails before the model loads
        world = current_world(device)  # several processes (accelerate launch / torchrun): one shard each
        device = world.device_for(device)
        if world.size > 1:  # lmms-eval's evaluator gathers its counters across processes through `accelerator`
            self.accelerator = Accelerator(cpu=not device.startswith("cuda"))
            self._rank, self._world_size = world.rank, world.size
        if model is None:
            model, processor = self.family.load(pretrained, device=device, dtype=dtype)
        self.pretrained = str(pretrained)
        self.model, self.processor = model, processor
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.recorder = Recorder()  # what samples and batches record beyond lmms-eval's logs; the runner's per cell
        self._warned_sampling = False
        self.progress: Callable[[int, int], None] | None = None  # (done, total) after each batch; None: own bar
        self.set_reducer(reducer)  # checks the reducer against the model (site, layer, a controller's shapes)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ReducedLMM:
        """lmms-eval's constructor for `--model_args`. A mistake in the arguments prints one line, `error: ...`, on
        stderr and raises SystemExit(2), as `run_bench.py` does; lmms-eval's CLI catches every Exception (it prints
        the traceback and exits 0) but lets SystemExit through."""
        try:
            method = str(simple_parse_args_string(arg_string).get("method", "full"))
        except ValueError:  # an item without `=`
            print(f"error: --model_args takes KEY=VALUE pairs separated by commas, got {arg_string!r}",
                  file=sys.stderr)
            raise SystemExit(2) from None
        try:
            return super().create_from_arg_string(arg_string, additional_config)
        except cls.cli_errors as e:
            print(f"error: {cli_message(e, method, cls.__name__)}", file=sys.stderr)
            raise SystemExit(2) from None

    # ------------------------------------------------------------------ configuration

    def set_reducer(self, reducer: TokenReducer) -> None:
        """Swap the reducer (the loaded model is reused)."""
        self.reducer = reducer.to(self.model.device).eval()
        self.runner = self.family.runner(self.model, self.reducer)

    @contextlib.contextmanager
    def cell(self, reducer: TokenReducer, recorder: Recorder, progress: Callable[[int, int], None] | None,
             conversation: str | None = None) -> Iterator[ReducedLMM]:
        """The runner's one call per cell: evaluate with `reducer` (a multi-round task's later turns as
        `conversation` says, default "prune-once"), writing each sample's records to `recorder` and (done, total)
        after each batch to `progress`; on leaving, the model draws its own progress bar again."""
        self.set_reducer(reducer)
        self.recorder, self.progress = recorder, progress
        self.conversation = check_conversation(conversation or "prune-once")
        try:
            yield self
        finally:
            self.progress = None

    @property
    def device(self) -> torch.device:
        """The model's device (lmms-eval's evaluator puts its cross-process request counts there)."""
        return self.model.device

    def image_tokens(self, inputs, j: int) -> int:
        """Visual tokens of prompt j's image before any reduction."""
        if self.family.fixed_tokens:
            return self.runner.layout.num_patches
        return int(self.runner.layout.tokens(inputs["image_grid_thw"][j]))

    def clean(self) -> None:
        """lmms-eval 0.7.3 deletes the model's modules after each run; keep them so one load serves many cells."""

    # ------------------------------------------------------------------ prompts

    def build_prompt(self, context: str) -> str:
        """The family's prompt with one image (`methods.llava.llava_prompt`, `methods.qwen.qwen_prompt`)."""
        return self.family.prompt(self.processor, context)

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        tok = self.processor.tokenizer.eos_token_id
        return sorted(set(ids + ([tok] if tok is not None else [])))

    # ------------------------------------------------------------------ lmms-eval API

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for idx, chunk, gen in self._batches(requests):
            prompts, images = self._prepare(chunk)
            inputs = self._inputs(chunk, prompts, images)
            out = self._generate(inputs, gen, self._extra(chunk, 0))
            times = per_sample_ms(out.timing, len(chunk))
            self.recorder.batches.append(times)
            records = []
            for j, req in enumerate(chunk):
                n = int(out.lengths[j])
                rec = {**out.trace.sample(j, self.image_tokens(inputs, j)), **times}
                self._record(req, rec, inputs, j)
                records.append(rec)
                counts = TokenCounts(input_tokens=rec["llm_tokens_per_layer"][0], output_tokens=n)
                results[idx[j]] = GenerationResult(text=self._text(out.tokens[j, :n], gen), token_counts=counts)
            self._log_batch(out.timing, records)
        return results

    def _log_batch(self, timing: Timing, records: list[dict]) -> None:
        """The batch's means in lmms-eval's own throughput log (`log_metrics`), so that its results JSON's
        `throughput` block carries them (`avg_<name>`, means over batches) for a user who stays in lmms-eval: visual
        tokens entering the LLM and averaged over its layers, prefill GFLOPs (analytic; a conversation's first turn),
        the KV cache in MiB (after the last turn), and per-sample prefill and reducer milliseconds."""
        shape, b = model_shape(self.model.config), len(records)
        value_bytes = cache_value_bytes(self.model.config)
        generated = sum(int(r["generated_tokens"]) for r in records)
        elapsed = timing.prefill_s + timing.decode_s
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=generated,
                    avg_speed=generated / elapsed if elapsed > 0 else 0.0, additional_metrics={
                        "request_count": b,
                        "visual_tokens": sum(r["visual_tokens"] for r in records) / b,
                        "visual_tokens_layer_mean": sum(sum(v) / len(v) for r in records
                                                        if (v := r.get("visual_tokens_per_layer"))) / b,
                        "prefill_gflops": sum(2 * count(r, shape).prefill for r in records) / b / 1e9,
                        "kv_cache_mb": sum(conversation_kv_bytes(r, shape, value_bytes) for r in records) / b / 2**20,
                        "prefill_ms": 1e3 * timing.prefill_s / b, "reducer_ms": 1e3 * timing.reducer_s / b})

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """A conversation per request, through lmms-eval's multi-round protocol: turn 1 is the request's context;
        after each answer the task's `doc_to_text(doc, previous_output=..., round_idx=r, previous_round_info=...)`
        returns (visuals, the next turn's text, terminal, the results so far, round info). Every turn asks about
        the first turn's image (a round that brings images is refused). Each later turn is answered as `conversation`
        says: "prune-once" appends it to the cache the previous turn left (the image reduced once, for turn 1's
        question: `methods._llm.LLMSide.ask_again`); "re-prune" prefills the whole conversation again from the full
        image, the reducer running on it. Both see the same tokens: the prompt, each answer as generated (its end-of-
        sequence token left out) and the chat format's text between turns (`Family.follow_up`). Returns each
        conversation's results as the task returned them when it ended (lmms-eval passes them to
        `process_results`). Each later round's text is read as the next user turn's question, not as a whole new
        context (lmms-eval's own clients rebuild the prompt from it): a task whose later texts repeat the conversation
        would repeat it here."""
        results: list[list[str] | None] = [None] * len(requests)
        for idx, chunk, gen in self._batches(requests):
            for j, res in enumerate(self._converse(chunk, gen)):
                results[idx[j]] = res
        return results

    def _batches(self, requests: list[Instance]) -> Iterator[tuple[list[int], list[Request], dict]]:
        """(indices, requests, decoding settings) per batch, with the progress bar and `progress` calls. Batches
        share decoding settings (so a sample's output never depends on its batch-mates) and similar lengths."""
        reqs = [Request.of(r) for r in requests]
        settings = [self._gen_settings(r.gen_kwargs) for r in reqs]
        order = sorted(range(len(reqs)), key=lambda i: (repr(settings[i]), len(reqs[i].context)))
        batches = []
        for _, group in itertools.groupby(order, key=lambda i: repr(settings[i])):
            group = list(group)
            batches += [group[s : s + self.batch_size] for s in range(0, len(group), self.batch_size)]
        with tqdm(total=len(requests), desc=f"{self.reducer.name} b={self.reducer.token_budget}", leave=False,
                  disable=self.rank != 0 or self.progress is not None) as bar:
            done = 0
            for idx in batches:
                yield idx, [reqs[i] for i in idx], settings[idx[0]]
                bar.update(len(idx))
                done += len(idx)
                if self.progress is not None:
                    self.progress(done, len(requests))

    def _generate(self, inputs, gen: dict, extra: dict, keep_state: bool = False):
        """The adapter's greedy generation on a processor batch."""
        return self.runner.generate(*(inputs[k] for k in self.family.inputs), max_new_tokens=gen["max_new_tokens"],
                                    eos_token_id=self._eos_ids(), pad_token_id=self._pad_id(), keep_state=keep_state,
                                    **extra)

    def _extra(self, chunk: list[Request], turn: int) -> dict:
        """The reducer's extra inputs for turn `turn` (0: the first) of `chunk`: the oracle's relevant patches."""
        return {"relevant": self._relevant(chunk, turn)} if "relevant" in self.reducer.needs else {}

    def _text(self, tokens: torch.Tensor, gen: dict) -> str:
        """An answer's text: decoded, cut at the task's first stop string, stripped."""
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in gen["until"]:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text.strip()

    def _record(self, req: Request, rec: dict, inputs, j: int) -> None:
        """Sample j's records for the runner: its trace and times, and for the first docs its model-input image."""
        self.recorder.samples[(req.task, req.doc_id)] = rec
        if self.family.fixed_tokens and self.recorder.wants_picture(req.task, req.doc_id):  # LLaVA: one grid
            self.recorder.pictures[(req.task, req.doc_id)] = {
                "image": self._model_image(inputs["pixel_values"][j]), "question": req.context,
                "grid": list(self.runner.layout.grid)}

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else 0

    def _content(self, tokens: torch.Tensor, n: int) -> list[int]:
        """An answer's tokens as the conversation keeps them: the n generated, less a final end-of-sequence token."""
        ids = tokens[:n].tolist()
        return ids[:-1] if ids and ids[-1] in self._eos_ids() else ids

    def _converse(self, chunk: list[Request], gen: dict) -> list[list[str]]:
        """One batch of conversations (`generate_until_multi_round`); records each sample's first turn's trace and
        times, its `conversation` mode and per later turn (`follow_ups`) the tokens prefilled and generated, and in
        re-prune mode that prefill's whole trace."""
        tok, eos, prune_once = self.processor.tokenizer, self._eos_ids(), self.conversation == "prune-once"
        prompts, images = self._prepare(chunk)
        inputs = self._inputs(chunk, prompts, images)
        out = self._generate(inputs, gen, self._extra(chunk, 0), keep_state=prune_once)
        times = per_sample_ms(out.timing, len(chunk))
        b = len(chunk)
        lengths = [int(n) for n in out.lengths]
        answers = [[self._text(out.tokens[j, : lengths[j]], gen)] for j in range(b)]
        content = [self._content(out.tokens[j], lengths[j]) for j in range(b)]
        history = [inputs["input_ids"][j][inputs["attention_mask"][j].bool()].tolist() + content[j] for j in range(b)]
        # prune once: the cache holds all but each answer's last generated token, which the next turn's text begins
        pending = [content[j][lengths[j] - 1 :] for j in range(b)]
        later: list[list[dict]] = [[] for _ in range(b)]
        ended: list[list[str] | None] = [None] * b
        info: list = [None] * b
        state, follow_ms = out.state, 0.0
        for r in itertools.count(1):
            asks: dict[int, list[int]] = {}  # sample -> the tokens of its next turn's text (after its answer)
            for j, req in enumerate(chunk):
                if ended[j] is not None:
                    continue
                visuals, text, terminal, so_far, info[j] = req.doc_to_text(
                    req.doc(self.task_dict), previous_output=answers[j], round_idx=r, previous_round_info=info[j])
                if terminal:
                    ended[j] = [str(a) for a in so_far]
                    continue
                if [v for v in (visuals or []) if v is not None]:
                    raise DocumentError(req.task, req.doc_id, f"round {r} brings images; reduced_vlm's conversations "
                                                              "ask every round about the first round's image")
                answers[j] = list(so_far)
                asks[j] = tok(self.family.follow_up(self.processor, text), add_special_tokens=False).input_ids
            if not asks:
                break
            if prune_once:  # every sample of the cache takes part; one that has ended gets one token, unread
                ids, mask = left_pad([pending[j] + asks[j] if j in asks else [self._pad_id()] for j in range(b)],
                                     self._pad_id())
                nxt = self.runner.ask_again(state, ids, mask, gen["max_new_tokens"], eos, self._pad_id())
                state, rows = nxt.state, {j: j for j in asks}
            else:  # the whole conversation again, from the full image, for the samples still talking
                js = sorted(asks)
                sub = self._inputs([chunk[j] for j in js], [prompts[j] for j in js], [images[j] for j in js])
                sub["input_ids"], sub["attention_mask"] = left_pad([history[j] + asks[j] for j in js], self._pad_id())
                nxt = self._generate(sub, gen, self._extra([chunk[j] for j in js], r))
                rows = {j: i for i, j in enumerate(js)}
            follow_ms += per_sample_ms(nxt.timing, nxt.tokens.size(0))["prefill_ms"]
            for j, i in rows.items():
                n = int(nxt.lengths[i])
                answers[j].append(self._text(nxt.tokens[i, :n], gen))
                said = self._content(nxt.tokens[i], n)
                pending[j], history[j] = said[n - 1 :], history[j] + asks[j] + said
                later[j].append({"tokens": int(mask[i].sum()), "generated_tokens": n} if prune_once
                                else nxt.trace.sample(i, self.image_tokens(sub, i)))
        times |= {"follow_up_prefill_ms": round(follow_ms, 4)}  # every later turn's prefill, per sample
        for j, req in enumerate(chunk):
            rec = {**out.trace.sample(j, self.image_tokens(inputs, j)), **times, "conversation": self.conversation,
                   "follow_ups": later[j]}
            self._record(req, rec, inputs, j)
        self.recorder.batches.append(times)
        self._log_batch(out.timing, [self.recorder.samples[(r.task, r.doc_id)] for r in chunk])
        return [e if e is not None else a for e, a in zip(ended, answers, strict=True)]

    def _model_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) normalised pixels -> (H, W, 3) uint8: the resized, cropped image the patch grid is cut from."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        std = torch.tensor(ip.image_std).view(3, 1, 1)
        return (pixels.float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)

    def _relevant(self, chunk: list[Request], turn: int = 0) -> torch.Tensor:
        """(B, N) bool: each doc's recorded `relevant_patches` of turn `turn` (the `oracle` reference's signal; a
        later turn's are in the doc's `follow_ups`)."""
        mask = torch.zeros(len(chunk), self.runner.layout.num_patches, dtype=torch.bool)
        for b, req in enumerate(chunk):
            doc = req.doc(self.task_dict)
            if turn:
                doc = (doc.get("follow_ups") or [{}] * turn)[turn - 1]
            if "relevant_patches" not in doc:
                raise ValueError(f"{self.reducer.name} needs each question's relevant_patches, which {req.task} does "
                                 "not record; run it on synth_vqa, synth_scenes or synth_scenes_followup")
            mask[b, list(doc["relevant_patches"])] = True
        return mask

    def _prepare(self, chunk: list[Request]) -> tuple[list[str], list]:
        prompts, images = [], []
        for req in chunk:
            try:
                visuals = req.doc_to_visual(req.doc(self.task_dict))
                visuals = [v for v in (visuals or []) if v is not None]
                image = visuals[0].convert("RGB") if len(visuals) == 1 else None
            except Exception as e:  # noqa: BLE001 - PIL, the task's own function or the dataset: each its own type
                raise DocumentError(req.task, req.doc_id, f"its image cannot be read ({type(e).__name__}: "
                                                          f"{first_line(e)})") from e
            if image is None:
                raise DocumentError(req.task, req.doc_id, f"{len(visuals)} images; reduced_vlm evaluates single-image "
                                                          "prompts only")
            images.append(image)
            prompts.append(self.build_prompt(req.context))
        return prompts, images

    def _inputs(self, chunk: list[Request], prompts: list[str], images: list) -> dict:
        """The processor's batch; when it refuses one, the document it refuses is named (`DocumentError`)."""
        try:
            return self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        except Exception:  # noqa: BLE001 - find the image at fault, one at a time
            for req, prompt, image in zip(chunk, prompts, images, strict=True):
                try:
                    self.processor(images=[image], text=[prompt], return_tensors="pt")
                except Exception as e:  # noqa: BLE001 - the processors raise ValueError or their own types
                    raise DocumentError(req.task, req.doc_id, f"the processor refuses its {image.width}x"
                                                              f"{image.height} image ({type(e).__name__}: "
                                                              f"{first_line(e)})") from e
            raise

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if (gen_kwargs.get("do_sample") or (gen_kwargs.get("temperature") or 0) > 0) and not self._warned_sampling:
            log.warning("reduced_vlm decodes greedily; the task's sampling settings are ignored")
            self._warned_sampling = True
        return {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), "until": until}

    def loglikelihood(self, requests: list[Instance]):
        raise NotImplementedError(
            "reduced_vlm implements generate_until only; use the generation variant of the task "
            "(all of gqa, pope, mme, textvqa_val, scienceqa_img, mmbench_en_dev_static generate)"
        )


@dataclass(frozen=True)
class Request:
    """One lmms-eval generation request, by name: `generate_until`'s arguments, or `generate_until_multi_round`'s
    (which add `doc_to_text`, called for each later round)."""

    context: str
    gen_kwargs: dict
    doc_to_visual: Callable
    doc_to_text: Callable | None
    doc_id: int
    task: str
    split: str

    @classmethod
    def of(cls, instance: Instance) -> Request:
        args = instance.args
        if len(args) == 7:  # multi-round: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)
            return cls(*args)
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return cls(context, gen_kwargs, doc_to_visual, None, doc_id, task, split)

    def doc(self, task_dict: dict) -> dict:
        return task_dict[self.task][self.split][self.doc_id]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of token lists, left-padded with `pad_id` to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = torch.tensor(r, dtype=torch.long), 1
    return ids, mask

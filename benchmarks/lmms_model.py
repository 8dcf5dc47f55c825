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
the text in the user turn); decoding is greedy with the KV cache. Per-sample token traces, batch times
and a few model-input images go to the model's `recorder` (`benchmarks.records.Recorder`, set by the runner), keyed
by (task, doc_id), for the runner to join with lmms-eval's sample logs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import simple_parse_args_string
from tqdm import tqdm
from transformers import AutoConfig

from benchmarks.defaults import controllers
from benchmarks.distributed import current_world
from benchmarks.records import Recorder
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
        max_batch_size: int | None = None,
        model=None,
        processor=None,
        **method_args,
    ) -> None:
        super().__init__()
        found = controllers(Path(pretrained), method) if get_reducer_class(method).needs_checkpoint else {}
        if found and "checkpoint" not in method_args:  # the lowest training seed's (seed0 when trained here)
            method_args["checkpoint"] = str(next(iter(found.values())))
        config = model.config if model is not None else AutoConfig.from_pretrained(pretrained, local_files_only=True)
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
    def cell(self, reducer: TokenReducer, recorder: Recorder, progress: Callable[[int, int], None] | None
             ) -> Iterator[ReducedLMM]:
        """The runner's one call per cell: evaluate with `reducer`, writing each sample's records to `recorder` and
        (done, total) after each batch to `progress`; on leaving, the model draws its own progress bar again."""
        self.set_reducer(reducer)
        self.recorder, self.progress = recorder, progress
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
        settings = [self._gen_settings(r.args[1]) for r in requests]
        # batches share decoding settings (so a sample's output never depends on its batch-mates); similar lengths
        order = sorted(range(len(requests)), key=lambda i: (repr(settings[i]), len(requests[i].args[0])))
        batches = []
        for _, group in itertools.groupby(order, key=lambda i: repr(settings[i])):
            group = list(group)
            batches += [group[s : s + self.batch_size] for s in range(0, len(group), self.batch_size)]
        tok = self.processor.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        with tqdm(total=len(requests), desc=f"{self.reducer.name} b={self.reducer.token_budget}", leave=False,
                  disable=self.rank != 0 or self.progress is not None) as bar:
            done = 0
            for idx in batches:
                chunk = [requests[i] for i in idx]
                prompts, images = self._prepare(chunk)
                gen = settings[idx[0]]
                inputs = self._inputs(chunk, prompts, images)
                extra = {"relevant": self._relevant(chunk)} if "relevant" in self.reducer.needs else {}
                out = self.runner.generate(
                    *(inputs[k] for k in self.family.inputs),
                    max_new_tokens=gen["max_new_tokens"], eos_token_id=self._eos_ids(), pad_token_id=pad_id, **extra,
                )
                times = per_sample_ms(out.timing, len(chunk))
                self.recorder.batches.append(times)
                for j, req in enumerate(chunk):
                    n = int(out.lengths[j])
                    text = tok.decode(out.tokens[j, :n], skip_special_tokens=True)
                    for stop in gen["until"]:
                        if stop and stop in text:
                            text = text.split(stop)[0]
                    text = text.strip()
                    _, _, _, doc_id, task, _ = req.args
                    rec = {**out.trace.sample(j, self.image_tokens(inputs, j)), **times}
                    self.recorder.samples[(task, doc_id)] = rec
                    if self.family.fixed_tokens and self.recorder.wants_picture(task, doc_id):  # LLaVA: one grid
                        self.recorder.pictures[(task, doc_id)] = {"image": self._model_image(inputs["pixel_values"][j]),
                                                         "question": req.args[0], "grid": list(self.runner.layout.grid)}
                    counts = TokenCounts(input_tokens=rec["llm_tokens_per_layer"][0], output_tokens=n)
                    results[idx[j]] = GenerationResult(text=text, token_counts=counts)
                bar.update(len(chunk))
                done += len(chunk)
                if self.progress is not None:
                    self.progress(done, len(requests))
        return results

    def _model_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(3, H, W) normalised pixels -> (H, W, 3) uint8: the resized, cropped image the patch grid is cut from."""
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        std = torch.tensor(ip.image_std).view(3, 1, 1)
        return (pixels.float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)

    def _relevant(self, chunk: list[Instance]) -> torch.Tensor:
        """(B, N) bool: each doc's recorded `relevant_patches` (the `oracle` reference's signal)."""
        mask = torch.zeros(len(chunk), self.runner.layout.num_patches, dtype=torch.bool)
        for b, req in enumerate(chunk):
            _, _, _, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if "relevant_patches" not in doc:
                raise ValueError(f"{self.reducer.name} needs each question's relevant_patches, which {task} does not "
                                 "record; run it on synth_vqa or synth_scenes")
            mask[b, list(doc["relevant_patches"])] = True
        return mask

    def _prepare(self, chunk: list[Instance]) -> tuple[list[str], list]:
        prompts, images = [], []
        for req in chunk:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            try:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id])
                visuals = [v for v in (visuals or []) if v is not None]
                image = visuals[0].convert("RGB") if len(visuals) == 1 else None
            except Exception as e:  # noqa: BLE001 - PIL, the task's own function or the dataset: each its own type
                raise DocumentError(task, doc_id, f"its image cannot be read ({type(e).__name__}: "
                                                  f"{first_line(e)})") from e
            if image is None:
                raise DocumentError(task, doc_id, f"{len(visuals)} images; reduced_vlm evaluates single-image "
                                                  "prompts only")
            images.append(image)
            prompts.append(self.build_prompt(context))
        return prompts, images

    def _inputs(self, chunk: list[Instance], prompts: list[str], images: list) -> dict:
        """The processor's batch; when it refuses one, the document it refuses is named (`DocumentError`)."""
        try:
            return self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        except Exception:  # noqa: BLE001 - find the image at fault, one at a time
            for req, prompt, image in zip(chunk, prompts, images, strict=True):
                try:
                    self.processor(images=[image], text=[prompt], return_tensors="pt")
                except Exception as e:  # noqa: BLE001 - the processors raise ValueError or their own types
                    _, _, _, doc_id, task, _ = req.args
                    raise DocumentError(task, doc_id, f"the processor refuses its {image.width}x{image.height} "
                                                      f"image ({type(e).__name__}: {first_line(e)})") from e
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

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("reduced_vlm does not implement multi-round generation")

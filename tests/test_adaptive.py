"""The adaptive controller: exact-K Gumbel selection, budget conditioning, Option A's budget token, save/load."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.defaults import SMOKE_MODEL
from benchmarks.tasks.synthetic import generate, scenes
from benchmarks.tasks.synthetic.tasks.utils import doc_to_text
from benchmarks.tools import train_adaptive
from methods import Tokens, create_reducer, get_reducer_class
from methods.adaptive import ControllerConfig, budget_encoding, gumbel_topk, plackett_luce_topk
from methods.base import TextTokens
from methods.llava import ReducedLlava, llava_prompt, load_llava
from tests.conftest import tiny_batch


def make(name, budget=4, dim=32, n=16, text=24, **kwargs):
    """An untrained controller for `n` tokens of width `dim` (and question tokens of width `text` where it reads
    them), seeded."""
    torch.manual_seed(0)
    text = text if "question" in get_reducer_class(name).needs else 0
    return create_reducer(name, budget, config=ControllerConfig(method=name, dim=dim, num_patches=n, text_dim=text),
                          **kwargs)


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


def test_plackett_luce_draw_and_log_probability_hand_computed():
    # weights 1, 2, 3 and k = 2: the set {b, c} comes from the ordered draws (c, b), probability 3/6 * 2/3 = 1/3,
    # and (b, c), probability 2/6 * 3/4 = 1/4; together 7/12, and log_prob is the log of one of the two
    torch.manual_seed(0)
    n = 20000
    logits = torch.tensor([1.0, 2.0, 3.0]).log().expand(n, 3).clone().requires_grad_(True)
    mask, log_prob = plackett_luce_topk(logits, torch.full((n,), 2))
    assert mask.sum(1).eq(2).all() and not mask.requires_grad
    bc = mask[:, 1:].sum(1).eq(2)
    assert abs(bc.float().mean().item() - 7 / 12) < 0.015
    lp = log_prob[bc].detach()
    is_cb = torch.isclose(lp, torch.tensor(1 / 3).log())
    assert (is_cb | torch.isclose(lp, torch.tensor(1 / 4).log())).all()
    assert abs(is_cb.float().mean().item() - 4 / 7) < 0.02  # P(order c, b | set {b, c}) = (1/3) / (7/12)
    log_prob.sum().backward()  # the score function has mean zero: E[d log p / d logits] = 0
    assert logits.grad.mean(0).abs().max() < 0.02


def test_reinforce_with_leave_one_out_baseline_finds_the_best_items():
    # a bandit: a selection's loss is minus its items' summed value; advantage as in train_adaptive.step_loss
    torch.manual_seed(0)
    value = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 0.9, 0.0, 0.0])
    logits = torch.zeros(1, 8, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    s, k = 4, torch.full((4,), 3)
    for _ in range(300):
        mask, log_prob = plackett_luce_topk(logits.expand(s, 8), k)
        cost = -(mask * value).sum(1)  # (S,) lower is better, as a loss
        advantage = (cost.sum() - cost) / (s - 1) - cost
        opt.zero_grad()
        (-(advantage * log_prob).mean()).backward()
        opt.step()
    assert set(logits[0].topk(3).indices.tolist()) == {1, 3, 5}


def test_budget_encoding_hand_computed():
    enc = budget_encoding(torch.tensor([0.25]), num_freqs=2)  # f = [1, 10000^-0.5], s = pi / 2
    s = torch.pi / 2 * torch.tensor([1.0, 0.01])
    torch.testing.assert_close(enc[0], torch.cat([s.sin(), s.cos()]))


@pytest.mark.parametrize("name", ["adaptive_a", "adaptive_b", "adaptive_q", "budget_blind"])
def test_exact_budget_per_sample_and_edges_through_the_adapter(tiny_model, name):
    dim = tiny_model.config.vision_config.hidden_size
    r = make(name, budget=5, dim=dim, text=tiny_model.config.text_config.hidden_size).eval()
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
        s4 = r.scores(Tokens(x=x, grid=(4, 4)), torch.tensor([4, 4]), torch.tensor([16, 16]))
        s12 = r.scores(Tokens(x=x, grid=(4, 4)), torch.tensor([12, 12]), torch.tensor([16, 16]))
        assert (not torch.allclose(s4, s12)) == differs


def test_the_question_changes_the_scores_and_masking_it_gives_option_b():
    """adaptive_q's scores depend on the question; with `question=False` they do not, and they are Option B's with the
    same weights (the text term off). Padding in the question is ignored."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 32, generator=g)
    words = [TextTokens(valid=torch.ones(2, 3, dtype=torch.bool), embeds=torch.randn(2, 3, 24, generator=g))
             for _ in range(2)]
    q = make("adaptive_q", dim=32).eval()  # its initial weights: larger ones saturate the attention on one patch
    k, n = torch.tensor([4, 4]), torch.tensor([16, 16])
    s1, s2 = (q.scores(Tokens(x=x, grid=(4, 4), text=w), k, n) for w in words)
    assert not torch.allclose(s1, s2)
    padded = TextTokens(valid=torch.tensor([[True] * 3 + [False]] * 2),
                        embeds=torch.cat([words[0].embeds, torch.randn(2, 1, 24, generator=g)], 1))
    torch.testing.assert_close(q.scores(Tokens(x=x, grid=(4, 4), text=padded), k, n), s1)
    q.question = False
    off = [q.scores(Tokens(x=x, grid=(4, 4), text=w), k, n) for w in words]
    torch.testing.assert_close(off[0], off[1])
    b = make("adaptive_b", dim=32).eval()
    b.load_state_dict({k: v for k, v in q.state_dict().items() if not k.startswith("text")})
    torch.testing.assert_close(b.scores(Tokens(x=x, grid=(4, 4)), k, n), off[0])


def test_adaptive_q_macs_hand_computed():
    """Option B's MACs (content, head, budget path, attention over N keys) with the question's M tokens: their
    projection M T D, and N + M keys in the attention. The ablation costs Option B's."""
    d, h, t, n, m = 32, 256, 24, 16, 3
    content_head_budget = n * d * h + n * h + 2 * 128 * h + h * d + d * h
    attention = 2 * d * d + 2 * (n + m) * d * d + 2 * (n + m) * d
    q = make("adaptive_q", dim=d, text=t).eval()
    x = torch.randn(2, n, d)
    words = TextTokens(valid=torch.tensor([[True] * m, [True] * (m - 1) + [False]]), embeds=torch.randn(2, m, t))
    out = q(Tokens(x=x, grid=(4, 4), text=words))
    assert out.macs.tolist() == [content_head_budget + m * t * d + attention,
                                 content_head_budget + (m - 1) * t * d + attention - 2 * d * d - 2 * d]
    off = make("adaptive_q", dim=d, text=t, question=False).eval()(Tokens(x=x, grid=(4, 4), text=words))
    b = make("adaptive_b", dim=d).eval()(Tokens(x=x, grid=(4, 4)))
    assert off.macs.tolist() == b.macs.tolist() == [content_head_budget + 2 * d * d + 2 * n * d * d + 2 * n * d] * 2


def test_save_and_load_roundtrip(tmp_path):
    for name in ("adaptive_a", "adaptive_b"):
        r = make(name, dim=32)
        r.save(tmp_path / name)
        loaded = create_reducer(name, 4, checkpoint=tmp_path / name)
        for (k1, v1), (k2, v2) in zip(r.state_dict().items(), loaded.state_dict().items(), strict=True):
            assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(ValueError, match="holds a adaptive_a controller"):
        create_reducer("adaptive_b", 4, checkpoint=tmp_path / "adaptive_a")
    with pytest.raises(FileNotFoundError, match="not a trained controller folder"):
        create_reducer("adaptive_b", 4, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="no trained controller"):
        create_reducer("adaptive_b", 4)


@pytest.mark.parametrize("estimator", ["reinforce", "straight_through"])
def test_training_command_saves_loads_and_resumes(tmp_path, estimator):
    out = tmp_path / "ctrl"
    common = ["--model", str(SMOKE_MODEL), "--method", "adaptive_b", "--out", str(out), "--batch-size", "4",
              "--synth-samples", "16", "--device", "cpu", "--save-every", "1", "--estimator", estimator]
    assert train_adaptive.main([*common, "--steps", "2"]) == 0
    saved = create_reducer("adaptive_b", 9, checkpoint=out)
    assert saved.config.estimator == estimator
    assert train_adaptive.main([*common, "--steps", "3"]) == 0  # resumes at step 2: one more step
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["lm_loss"] > 0 and 2 <= r["budget"] <= 72 for r in log)
    assert not torch.equal(create_reducer("adaptive_b", 9, checkpoint=out).head[1].weight, saved.head[1].weight)


def test_training_command_rejects_one_sample_for_reinforce(tmp_path, capsys):
    assert train_adaptive.main(["--model", "x", "--method", "adaptive_b", "--samples", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


@pytest.mark.slow
def test_training_runs_under_accelerate_with_two_processes(tmp_path):
    """Two CPU processes (gloo) train one controller; the main process logs and saves it. Launched with
    `--multi_gpu` because `accelerate launch --cpu` starts a single process (see tests/test_accelerate.py)."""

    out = tmp_path / "ctrl"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home")}  # no accelerate default_config.yaml is read
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "benchmarks.tools.train_adaptive", "--model", str(SMOKE_MODEL), "--method", "adaptive_b", "--out",
           str(out),
           "--batch-size", "4", "--synth-samples", "32", "--steps", "2", "--device", "cpu", "--save-every", "1"]
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training on 2 processes" in res.stdout
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # written by the main process only
    assert create_reducer("adaptive_b", 9, checkpoint=out).config.estimator == "reinforce"


def test_training_with_lora_and_projector_saves_a_plain_llava_model(tmp_path):
    out = tmp_path / "ctrl"
    assert train_adaptive.main(["--model", str(SMOKE_MODEL), "--method", "adaptive_b", "--out", str(out),
                                "--batch-size", "4", "--synth-samples", "8", "--device", "cpu", "--steps", "2",
                                "--lora-rank", "2", "--train-projector"]) == 0
    model, _ = load_llava(out / "model")  # LoRA merged back: a plain llava-hf folder
    base, _ = load_llava(SMOKE_MODEL)
    assert not any("lora" in name for name, _ in model.named_parameters())
    changed = {n for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters(), strict=True)
               if not torch.equal(p, q)}
    assert any("multi_modal_projector" in n for n in changed) and any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)


TRAIN = ["--method", "adaptive_b", "--batch-size", "4", "--synth-samples", "64", "--device", "cpu", "--save-every", "1"]


def train_with(*extra: str) -> list[str]:
    """TRAIN with the options `extra` gives replaced by its values (an option given twice is refused)."""
    pairs = [(TRAIN[i], TRAIN[i + 1]) for i in range(0, len(TRAIN), 2)]
    return [x for flag, value in pairs if flag not in extra for x in (flag, value)] + list(extra)


def test_training_never_replaces_a_controller_or_resumes_other_settings(tmp_path, capsys):
    trained = tmp_path / "trained"
    shutil.copytree(SMOKE_MODEL / "controllers" / "adaptive_b" / "seed0", trained)  # as committed: no training state
    before = {f.name: f.read_bytes() for f in trained.iterdir()}
    assert train_adaptive.main(["--model", str(SMOKE_MODEL), *TRAIN, "--steps", "2", "--out", str(trained)]) == 2
    assert "already holds a trained adaptive_b controller" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in trained.iterdir()} == before

    out = tmp_path / "run"
    assert train_adaptive.main(["--model", str(SMOKE_MODEL), *TRAIN, "--steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert train_adaptive.main(["--model", str(SMOKE_MODEL), *TRAIN, "--steps", "2", "--out", str(out),
                                "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "other settings (lr 0.001 -> 0.01)" in err and err.count("\n") == 1
    assert train_adaptive.main(["--model", str(SMOKE_MODEL), *TRAIN, "--steps", "1", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out

    assert train_adaptive.main(["--model", str(SMOKE_MODEL), *TRAIN, "--steps", "1", "--out", str(trained),
                                "--overwrite"]) == 0
    assert {f.name: f.read_bytes() for f in (trained / "replaced").iterdir()} == before
    assert len((trained / "train_log.jsonl").read_text().splitlines()) == 1  # a new log, not appended


@pytest.mark.parametrize(("argv", "phrase"), [
    (["--data", "/nonexistent.json"], "--data /nonexistent.json: no such file"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--steps", "-1"], "--steps: must be >= 1"),
    (["--budget-range", "0.5", "0.1"], "need 0 < MIN <= MAX <= 1"),
    (["--data", "{dict_json}"], "holds a JSON dict, not the list of records"),
    (["--data", "{not_json}"], "is not a JSON file"),
    (["--device", "cuda"], "no usable CUDA device"),
    (["--out", "{a_file}/sub"], "is not a writable folder"),
])
def test_training_bad_input_is_one_line(argv, phrase, tmp_path, capsys):
    if not torch.cuda.is_available() or "cuda" not in argv:
        pass
    else:
        pytest.skip("this machine has a GPU")
    (tmp_path / "dict.json").write_text('{"a": 1}')
    (tmp_path / "not.json").write_text("{oops")
    (tmp_path / "a_file").write_text("")
    argv = [a.format(dict_json=tmp_path / "dict.json", not_json=tmp_path / "not.json", a_file=tmp_path / "a_file")
            for a in argv]
    argv = argv if "--out" in argv else [*argv, "--out", str(tmp_path / "c")]
    try:
        code = train_adaptive.main(["--model", str(SMOKE_MODEL), *train_with(*argv)])
    except SystemExit as e:  # argparse's own checks, one line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_sigint_during_training_exits_130_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "ctrl"
    cmd = [sys.executable, "-m", "benchmarks.tools.train_adaptive", "--model", str(SMOKE_MODEL), *TRAIN, "--out",
           str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    repo = Path(__file__).resolve().parents[1]
    # SIGINT as a Ctrl-C delivers it: a shell without job control starts background jobs with SIGINT ignored, which
    # a child inherits (Python then installs no KeyboardInterrupt handler), so restore the default in the child
    proc = subprocess.Popen([*cmd, "--steps", "200"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    log = out / "train_log.jsonl"
    while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    assert not list(out.glob(".*tmp"))  # no partial state file
    saved = torch.load(out / "train_state.pt", weights_only=False)["step"]
    res = subprocess.run([*cmd, "--steps", str(saved + 1)], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0 and f"resumed from {out / 'train_state.pt'} at step {saved}" in res.stdout
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, saved + 2))  # one run's log, no step twice


def test_synthetic_data_interleaves_the_tasks_it_names():
    """--data synth_vqa,synth_scenes (the default) alternates the two train splits; 'synth' is synth_vqa (what
    earlier controllers recorded); a JSON path is not synthetic."""
    synthetic = train_adaptive.synthetic
    data = train_adaptive.SynthTrain(6, synthetic(train_adaptive.DEFAULT_DATA))
    questions = [data[i][1].splitlines()[0] for i in range(6)]
    vqa = [generate.generate_sample(generate.SPLIT_SEEDS["train"], j).question for j in range(3)]
    sc = [scenes.generate_scene(scenes.SPLIT_SEEDS["train"], j).question for j in range(3)]
    assert questions == [q for pair in zip(vqa, sc, strict=True) for q in pair]
    assert synthetic("synth") == synthetic("synth_vqa") == (generate.SYNTH_VQA,)
    assert synthetic("/data/llava.json") is None and synthetic("synth_vqa,/x.json") is None


@pytest.mark.parametrize("method", ["adaptive_a", "adaptive_b", "adaptive_q", "budget_blind"])
def test_training_runs_on_a_bfloat16_model(tmp_path, method):
    """--dtype bfloat16: the model in bfloat16, the controller in float32 scoring its features; a step runs and the
    saved controller loads and keeps its budget on the bfloat16 model."""
    out = tmp_path / method
    argv = ["--model", str(SMOKE_MODEL), *train_with("--method", method, "--steps", "1", "--dtype", "bfloat16",
                                                     "--out", str(out))]
    assert train_adaptive.main(argv) == 0
    base, processor = load_llava(SMOKE_MODEL, dtype="bfloat16")
    reducer = create_reducer(method, 8, checkpoint=str(out)).eval()
    samples = [generate.generate_sample(generate.SPLIT_SEEDS["val"], i) for i in range(2)]
    inputs = processor(images=[Image.fromarray(s.image) for s in samples], padding=True, return_tensors="pt",
                       text=[llava_prompt(processor, doc_to_text({"question": s.question})) for s in samples])
    gen = ReducedLlava(base, reducer).generate(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], 2)
    assert gen.trace.visual_tokens[:, -1].tolist() == [8, 8] and torch.isfinite(gen.first_logits).all()


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Interrupted after step 4 (inside the second pass over 12 questions in batches of 4) and resumed, a run ends
    with the controller weights of the same run uninterrupted, bit for bit (CPU, same seed): the data order, the
    budget draws and the Gumbel draws continue where they stopped."""
    from safetensors.torch import load_file  # noqa: PLC0415

    def argv(out):
        return ["--model", str(SMOKE_MODEL), *train_with("--steps", "6", "--synth-samples", "12", "--out", str(out))]

    assert train_adaptive.main(argv(tmp_path / "whole")) == 0
    real, calls = train_adaptive.step_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_adaptive, "step_loss", interrupted)
    assert train_adaptive.main(argv(tmp_path / "cut")) == 130
    monkeypatch.setattr(train_adaptive, "step_loss", real)
    assert train_adaptive.main(argv(tmp_path / "cut")) == 0
    whole, cut = load_file(tmp_path / "whole" / "controller.safetensors"), load_file(tmp_path / "cut" /
                                                                                     "controller.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)

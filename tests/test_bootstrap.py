"""Bootstrap: tokenizer, tiny Qwen3, SFT and the end-to-end `bootstrap` (tiny and short here;
the full-quality run is the slow test at the bottom)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks import countdown as cd
from tasks.teacher import render_teacher_prompt
from trainer.bootstrap.chat import chat_prompt, encode_prompts, encode_responses
from trainer.bootstrap.evaluate import generate, response_logprobs
from trainer.bootstrap.model import build_model
from trainer.bootstrap.run import bootstrap
from trainer.bootstrap.sft import SFTConfig, prepare, sample_batch, train_sft
from trainer.bootstrap.tokenizer import IM_END, build_tokenizer

TINY = {"hidden": 32, "layers": 2, "heads": 2, "kv_heads": 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: on the shared 2-core box two torch threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_round_trips_task_strings(tok):
    for p in cd.generate(100, seed=0):
        for text in (p.prompt_text(), p.solution_text(), p.reference(),
                     render_teacher_prompt(p.prompt_text(), p.solution_text())):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
    # template words are single tokens, digits always single characters
    assert tok.tokenize("Answer: 123") == ["Answer", ":", " ", "1", "2", "3"]
    assert tok.tokenize("Correctly solve") == ["Correctly", " solve"]
    # text outside the templates still round-trips, character by character
    assert tok.decode(tok("Zebra 42!", add_special_tokens=False)["input_ids"]) == "Zebra 42!"


def test_tokenizer_chat_template_and_special_tokens(tok, tmp_path):
    msgs = [{"role": "user", "content": "Make 24 from 3 5 7 9."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nMake 24 from 3 5 7 9.<|im_end|>\n<|im_start|>assistant\n"
    assert text == chat_prompt(msgs[0]["content"])  # the fast path SFT uses
    assert tok.eos_token == IM_END and tok.pad_token == "<|endoftext|>"
    ids = encode_prompts(tok, [msgs[0]["content"]])[0]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(ids) < 30
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == text
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id


def test_model_saves_and_reloads(tok, tmp_path):
    model = build_model(tok, seed=0, **TINY)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again).__name__ == "Qwen3ForCausalLM"
    x = torch.tensor([encode_prompts(tok, ["Make 24 from 3 5 7 9."])[0]])
    assert torch.equal(model(x).logits, again(x).logits)
    assert again.config.eos_token_id == tok.eos_token_id
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tok.chat_template


def test_sample_batch_has_both_formats_and_response_only_targets(tok):
    items = prepare(tok, cd.generate(50, seed=0))
    cfg = SFTConfig(batch_size=64, teacher_fraction=0.5, copy_fraction=1.0)
    student, teacher = sample_batch(tok, items, cfg, __import__("random").Random(0))
    assert len(student) + len(teacher) == 64 and student and teacher
    header = tok.convert_tokens_to_ids("Correct")
    assert all(header not in p for p, _ in student) and all(header in p for p, _ in teacher)
    for p, r in teacher:  # copy_fraction=1: the response is the demonstration in the prompt
        text = tok.decode(p)
        assert tok.decode(r[:-1]) in text and r[-1] == tok.eos_token_id


def test_sft_is_deterministic_and_learns(tok):
    items = prepare(tok, cd.generate(200, seed=0))
    users = [it.problem.prompt_text() for it in items[:16]]
    targets = [it.solutions[0] for it in items[:16]]

    def run(seed: int, steps: int):
        model = build_model(tok, seed=seed, **TINY)
        before = sum(response_logprobs(model, tok, users, targets))
        cfg = SFTConfig(steps=steps, batch_size=16, lr=5e-3, warmup=5, seed=seed, log_every=0)
        train_sft(model, tok, items, cfg, log=lambda _: None)
        return model.state_dict(), before, sum(response_logprobs(model, tok, users, targets))

    a, before, after = run(0, 12)
    b, _, _ = run(0, 12)
    c, _, _ = run(1, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert after > before + 16 * 1.0  # at least 1 nat per solution better


def test_response_logprobs_match_a_manual_forward(tok):
    model = build_model(tok, seed=0, **TINY)
    user, resp = "Make 24 from 3 5 7 9.", "5*3=15\n15+9=24\nAnswer: 24"
    (lp,) = response_logprobs(model, tok, [user], [resp])
    p, r = encode_prompts(tok, [user])[0], encode_responses(tok, [resp])[0]
    logits = model(torch.tensor([p + r])).logits[0].log_softmax(-1)
    manual = sum(logits[len(p) - 1 + i, t].item() for i, t in enumerate(r))
    assert lp == pytest.approx(manual, abs=1e-4)


def test_generate_greedy_is_reproducible(tok):
    model = build_model(tok, seed=0, **TINY)
    users = ["Make 24 from 3 5 7 9.", "Make 10 from 1 2 3 4."]
    assert generate(model, tok, users, temperature=0.0, max_new_tokens=8) == \
        generate(model, tok, users[:1], temperature=0.0, max_new_tokens=8) + \
        generate(model, tok, users[1:], temperature=0.0, max_new_tokens=8)  # left padding is right


def test_short_bootstrap_end_to_end(tmp_path):
    m = bootstrap(tmp_path, seed=0, steps=3, batch_size=8, train_problems=100, eval_problems=8,
                  log=lambda _: None, **TINY)
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "bootstrap.json"):
        assert (tmp_path / f).exists(), f
    saved = json.loads((tmp_path / "bootstrap.json").read_text())
    assert saved == json.loads(json.dumps(m))
    assert 0.0 <= m["heldout_accuracy_greedy"] <= 1.0 and m["sft"]["steps_done"] == 3
    for k in ("logprob_student", "logprob_teacher_copy", "logprob_teacher_sibling"):
        assert m["teacher"][k] < 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    out = generate(model, tok, ["Make 24 from 3 5 7 9."], temperature=1.0, max_new_tokens=4)
    assert isinstance(out[0], str)
    # deterministic under the seed: a second run writes the very same weights
    bootstrap(tmp_path / "again", seed=0, steps=3, batch_size=8, train_problems=100,
              eval_problems=8, log=lambda _: None, **TINY)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_full_bootstrap_quality(tmp_path):
    """The default bootstrap leaves room for RL and gives the teacher a real advantage."""
    m = bootstrap(tmp_path, seed=0)
    assert 0.05 <= m["heldout_accuracy_sampled"] <= 0.5
    assert m["heldout_accuracy_greedy"] >= m["heldout_accuracy_sampled"]
    t = m["teacher"]
    assert t["logprob_teacher_copy"] > t["logprob_student"] + 2.0


def test_mechanism_diagnostics_weight_report_by_hand():
    """The toy-regime check (trainer/bootstrap/diagnose.py) reads the same bounds as the
    trainer: w = exp(-D) (D = q - s, the paper's sign) clipped to [1 - eps_w, 1 + eps_w]."""
    import math

    import torch

    from trainer.bootstrap.diagnose import weight_report

    D = -torch.tensor([math.log(3.0), -0.1, 0.2, math.log(0.4)])  # log w = -D
    r = weight_report(D, 1.0)  # bounds [0, 2]: only ln 3 reaches the upper one
    assert r["reweighted_tokens"] == 4 and r["clip_share"] == 0.25 and r["clip_low_share"] == 0
    assert r["mean_abs_D"] == pytest.approx(float(D.abs().mean()))
    assert r["self_driven_share"] == 0.5
    assert r["mean_w"] == pytest.approx((2.0 + math.exp(-0.1) + math.exp(0.2) + 0.4) / 4)
    r = weight_report(D, 0.5)  # bounds [0.5, 1.5]: ln 3 high, ln 0.4 low
    assert (r["clip_high_share"], r["clip_low_share"], r["clip_share"]) == (0.25, 0.25, 0.5)

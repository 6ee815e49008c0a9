"""`rlrt inspect`: the page shows exactly the correct, teacher-scored responses, one span per
response token, with s, q and D = q - s (the paper's sign) equal to an independent
recomputation (a plain forward over a hand-built teacher context), and the RLRT weight of the spec's formula.

The model is a freshly initialised tiny Qwen3 with the bootstrap tokenizer (no SFT: seconds).
Its answers are random, so the data uses a stand-in task (tests/support/inspect_task.py:
correct when the response contains the reference), which gives mixed groups at once."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rlrt.cli import app
from tasks.data import DataConfig, load_rows
from trainer.bootstrap.model import build_model
from trainer.bootstrap.tokenizer import build_tokenizer

ROWS = [  # references chosen so that most groups are mixed for this model and seed
    {"id": "a", "prompt": "Make 10 from 3 4 0.", "answer": "e", "solution": "3+4=7\nAnswer: 7"},
    {"id": "b", "prompt": "Make 11 from 3 4 1.", "answer": "a", "solution": "Answer: 12"},
    {"id": "c", "prompt": "Make 12 from 3 4 2.", "answer": "7", "solution": "{x} in braces"},
    {"id": "d", "prompt": "Make 13 from 3 4 3.", "answer": "+", "solution": "no solution here"},
]
G = 6
CONTAINS = "support.inspect_task:ContainsTask"  # a task registered by dotted path only
TEMPLATE = "{p}\n\nCorrect solution:\n\n{d}\n\nCorrectly solve the original question.\n"


class _Spans(HTMLParser):
    """Collect, per `div.resp`, the attributes of its `span.tok`s."""

    def __init__(self) -> None:
        super().__init__()
        self.responses: list[list[dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "div" and a.get("class") == "resp":
            self.responses.append([])
        elif tag == "span" and a.get("class") == "tok":
            self.responses[-1].append(a)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """One `rlrt inspect` run through the CLI; returns (model dir, out dir, stdout summary)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits on the first here
    root = tmp_path_factory.mktemp("inspect")
    tok = build_tokenizer()
    model_dir = root / "model"
    build_model(tok, seed=0, hidden=32, layers=2, heads=2, kv_heads=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = root / "rows.jsonl"
    data.write_text("\n".join(json.dumps({**r, "task": CONTAINS}) for r in ROWS) + "\n")
    out = root / "out"
    res = CliRunner().invoke(app, [
        "inspect", "--model", str(model_dir), "--data", str(data), "--n", "4", "--g", str(G),
        "--max-new-tokens", "24", "--out", str(out), "--seed", "0"])
    torch.set_num_threads(before)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    return model_dir, out, summary


@pytest.fixture(scope="module")
def shown(run) -> list[dict]:
    return json.loads((run[1] / "inspect.json").read_text())["shown"]


@pytest.fixture(scope="module")
def spans(run) -> list[list[dict[str, str]]]:
    parser = _Spans()
    parser.feed((run[1] / "inspect.html").read_text())
    return parser.responses


def test_only_correct_responses_of_mixed_groups_are_shown(run, shown):
    summary = run[2]
    assert 0 < summary["correct"] < summary["responses"], "the data must give right and wrong"
    assert shown, "no correct response was shown"
    for r in shown:
        assert ROWS[r["prompt_index"]]["answer"] in r["text"], r  # correct by the task's rule
        assert r["reward"] == 1.0
        assert 0 < sum(r["group_rewards"]) < G  # mixed group (all-correct ones have A = 0)
    # Every correct response of every mixed group has a demonstration here (a sibling or the
    # reference solution), so all of them, and nothing else, are on the page.
    everything = json.loads((run[1] / "inspect.json").read_text())["responses"]
    assert len(everything) == len(ROWS) * G
    by_group: dict[int, list[dict]] = {}
    for r in everything:
        assert r["reward"] == float(ROWS[r["prompt_index"]]["answer"] in r["text"])
        by_group.setdefault(r["prompt_index"], []).append(r)
    expected = {(r["prompt_index"], r["response_index"]) for rs in by_group.values()
                if 0 < sum(x["reward"] for x in rs) < G for r in rs if r["reward"] == 1.0}
    assert {(r["prompt_index"], r["response_index"]) for r in shown} == expected
    assert summary["shown"] == len(shown)


def test_demonstration_is_a_correct_sibling_or_the_solution(shown):
    by_key = {(r["prompt_index"], r["response_index"]): r for r in shown}
    modes = set()
    for r in shown:
        modes.add(r["demo_mode"])
        if sum(r["group_rewards"]) >= 2:
            j = r["demo_index"]
            assert r["demo_mode"] == "sibling" and j != r["response_index"]
            assert r["group_rewards"][j] == 1.0
            assert r["demo_text"] == by_key[(r["prompt_index"], j)]["text"].strip()
        else:  # the only correct one: the dataset's solution stands in
            assert r["demo_mode"] == "reference_solution"
            assert r["demo_text"] == ROWS[r["prompt_index"]]["solution"]
    assert "sibling" in modes


def test_html_has_a_span_per_token_with_d_equal_to_s_minus_q(run, shown, spans):
    model_dir = run[0]
    assert len(spans) == len(shown)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    def chat(user: str) -> list[int]:
        text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"  # the template
        return tok(text, add_special_tokens=False)["input_ids"]

    def logprobs(context: list[int], resp: list[int]) -> torch.Tensor:
        ids = torch.tensor([context + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        pos = torch.arange(len(context) - 1, len(context) + len(resp) - 1)
        return logp[pos, torch.tensor(resp)]

    checked = 0
    for r, sp in zip(shown, spans, strict=True):
        ids = [int(a["data-id"]) for a in sp]
        assert ids == [t["id"] for t in r["tokens"]] and len(ids) > 0
        prompt = ROWS[r["prompt_index"]]["prompt"]
        teacher_ctx = chat(TEMPLATE.format(p=prompt, d=r["demo_text"]))
        assert r["teacher_context_ids"] == teacher_ctx + ids
        s = logprobs(chat(prompt), ids)
        q = logprobs(teacher_ctx, ids)
        got = {k: torch.tensor([float(a[f"data-{k}"]) for a in sp], dtype=torch.float64)
               for k in ("s", "q", "d")}
        assert torch.allclose(got["s"], s, atol=1e-4, rtol=0), (got["s"] - s).abs().max()
        assert torch.allclose(got["q"], q, atol=1e-4, rtol=0), (got["q"] - q).abs().max()
        assert torch.allclose(got["d"], q - s, atol=1e-4, rtol=0)
        checked += 1
    assert checked >= 1


def test_weights_follow_the_rlrt_formula(shown, spans):
    lam, eps_w = 0.5, 1.0  # the rlrt preset
    for r, sp in zip(shown, spans, strict=True):
        rw = torch.tensor(r["group_rewards"], dtype=torch.float64)
        a_k = float((r["reward"] - rw.mean()) / (rw.std() + 1e-6))
        assert r["adv"] == pytest.approx(a_k, rel=1e-5)
        for a in sp:
            d = float(a["data-d"])
            w = min(max(math.exp(-math.copysign(1.0, a_k) * d), 1 - eps_w), 1 + eps_w)
            assert float(a["data-w"]) == pytest.approx(w, abs=1e-3)
            assert float(a["data-adv"]) == pytest.approx(a_k * ((1 - lam) + lam * w), rel=1e-4)


def test_png_is_a_valid_image(run):
    path: Path = run[1] / "inspect.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200


def test_preset_without_teacher_is_refused(run):
    res = CliRunner().invoke(app, ["inspect", "--model", str(run[0]), "--preset", "grpo",
                                   "--out", str(run[1] / "grpo")])
    assert res.exit_code == 2
    assert "uses no teacher" in res.output


def test_countdown_items_carry_their_solution():
    items = load_rows(DataConfig(task="countdown"), seed=0, n=3)
    assert len(items) == 3
    assert all(it.task == "countdown" and it.solution and it.answer.startswith("numbers=")
               for it in items)

"""The teacher contract (tasks/teacher.py): who needs a teacher score, and what the teacher
scores, with tokenizers built here (no hub downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from protocol.messages import (
    PromptTask,
    Response,
    ScoredGroup,
    TeacherRequest,
    TeacherScores,
    Verification,
    VerifiedGroup,
)
from tasks.teacher import (
    DEFAULT_TEMPLATE,
    Demonstration,
    build_teacher_context,
    missing_teacher_scores,
    pick_demonstration,
    pick_sibling,
    render_teacher_prompt,
    strip_think,
    teacher_context_for_group,
    teacher_needed,
    teacher_needed_for_group,
)
from trainer.algorithm import AlgorithmConfig, token_advantages

T, F = True, False

# --------------------------------------------------------------------------- teacher_needed


@pytest.mark.parametrize(
    "correct, rewards, scope, mode, solution, fallback, want",
    [
        # rlrt: correct responses of a mixed group, each has another correct sibling.
        ([T, T, F, F], [1, 1, 0, 0], "correct_mixed", "sibling", F, T, [T, T, F, F]),
        # a single correct response has no other correct sibling ...
        ([F, T, F, F], [0, 1, 0, 0], "correct_mixed", "sibling", F, T, [F, F, F, F]),
        # ... unless the dataset has a reference solution to fall back to,
        ([F, T, F, F], [0, 1, 0, 0], "correct_mixed", "sibling", T, T, [F, T, F, F]),
        # and only if the fallback is on.
        ([F, T, F, F], [0, 1, 0, 0], "correct_mixed", "sibling", T, F, [F, F, F, F]),
        # all-correct / all-wrong groups: A = 0, nothing to score.
        ([T, T, T], [1, 1, 1], "correct_mixed", "sibling", T, T, [F, F, F]),
        ([F, F, F], [0, 0, 0], "correct_mixed", "sibling", T, T, [F, F, F]),
        # rlrt_all: every A != 0 response; incorrect ones use a correct sibling, the lone
        # correct one has none (no solution).
        ([T, F, F], [1, 0, 0], "nonzero_adv", "sibling", F, T, [F, T, T]),
        ([T, F, F], [1, 0, 0], "nonzero_adv", "sibling", T, T, [T, T, T]),
        ([T, T, T], [1, 1, 1], "nonzero_adv", "sibling", T, T, [F, F, F]),
        # graded rewards: 0.5 is the group mean (A = 0) and is skipped.
        ([T, F, F], [1, 0.5, 0], "nonzero_adv", "sibling", F, T, [F, F, T]),
        # rlsd: the reference answer always exists.
        ([T, F], [1, 0], "nonzero_adv", "reference_answer", F, T, [T, T]),
        ([T, T], [1, 1], "nonzero_adv", "reference_answer", F, T, [F, F]),
        # opsd: every response, when the dataset has a solution; none without.
        ([F, F, F], [0, 0, 0], "all", "reference_solution", T, T, [T, T, T]),
        ([T, F, F], [1, 0, 0], "all", "reference_solution", F, T, [F, F, F]),
        # grpo
        ([T, F], [1, 0], "none", "sibling", T, T, [F, F]),
    ],
)
def test_teacher_needed(correct, rewards, scope, mode, solution, fallback, want):
    got = teacher_needed(
        correct, rewards, scope, mode, has_solution=solution, fallback_to_solution=fallback
    )
    assert got == want


def test_reference_answer_mode_needs_an_answer():
    assert teacher_needed([T, F], [1, 0], "nonzero_adv", "reference_answer", has_answer=False) == [
        F,
        F,
    ]


def contract_group(
    texts: list[str],
    correct: list[bool],
    *,
    solution: str | None = None,
    request: TeacherRequest | None = None,
    answer: str = "42",
) -> VerifiedGroup:
    task = PromptTask(
        run_id="r",
        prompt_id="p",
        group_id="g1",
        prompt_text="What is six times seven ?",
        prompt_ids=np.arange(3),
        answer=answer,
        solution=solution,
        group_size=len(texts),
        teacher=request or TeacherRequest(scope="correct_mixed"),
    )
    responses = [
        Response(
            token_ids=np.arange(10 + 10 * i, 14 + 10 * i),
            logprobs=np.full(4, -1.0),
            finish_reason="stop",
            text=t,
        )
        for i, t in enumerate(texts)
    ]
    verifs = [Verification(reward=float(c), correct=c) for c in correct]
    return VerifiedGroup(
        run_id="r", task=task, responses=responses, engine_version=0, verifications=verifs
    )


def test_teacher_needed_for_group_reads_the_request():
    g = contract_group(["a", "b", "c", "d"], [T, F, T, F])
    assert teacher_needed_for_group(g) == [T, F, T, F]
    lone = contract_group(["a", "b"], [T, F], solution="6*7=42")
    assert teacher_needed_for_group(lone) == [T, F]
    assert teacher_needed_for_group(contract_group(["a", "b"], [T, F])) == [F, F]
    rlsd = AlgorithmConfig.from_preset("rlsd").teacher_request()
    assert teacher_needed_for_group(contract_group(["a", "b"], [T, F], request=rlsd)) == [T, T]


def test_missing_teacher_scores():
    g = contract_group(["a", "b", "c", "d"], [T, F, T, F])
    score = TeacherScores(logprobs=np.full(4, -1.0), context_mode="sibling", demo_index=2)
    full = ScoredGroup(**g.model_dump(), teacher=[score, None, score, None])
    assert missing_teacher_scores(full) == []
    part = ScoredGroup(**g.model_dump(), teacher=[score, None, None, None])
    assert missing_teacher_scores(part) == [2]


def test_trainer_and_contract_agree_on_what_is_needed():
    # rlrt, group [1, 0, 0, 0] without a solution: the contract schedules nothing, and the
    # trainer, given nothing, trains the lone correct rollout as GRPO and counts it.
    cfg = AlgorithmConfig.from_preset("rlrt")
    needed = teacher_needed([T, F, F, F], [1, 0, 0, 0], cfg.scope, cfg.context_mode)
    out = token_advantages(
        cfg,
        rewards=torch.tensor([1.0, 0, 0, 0]),
        group_ids=torch.zeros(4, dtype=torch.long),
        mask=torch.ones(4, 2, dtype=torch.bool),
        student_logprobs=torch.zeros(4, 2),
        teacher_logprobs=torch.zeros(4, 2),
        has_teacher=torch.tensor(needed),
    )
    assert needed == [F, F, F, F]
    assert out.metrics["unscored_rows"] == 1


# --------------------------------------------------------------------------- demonstration


@pytest.mark.parametrize(
    "text, want",
    [
        ("<think>hmm, 6*7?</think>\n6*7 = 42", "6*7 = 42"),
        ("a<think>x</think>b<think>y\n</think>c", "abc"),
        ("still thinking </think> so 42", "so 42"),  # opened by the chat template
        ("6*7 = 42 <think>cut off by the length cap", "6*7 = 42"),
        ("no reasoning block", "no reasoning block"),
    ],
)
def test_strip_think(text, want):
    assert strip_think(text) == want


def test_sibling_is_a_different_correct_one_and_deterministic():
    correct = [T, T, F, T, T]
    picks = {pick_sibling(correct, 0, seed=s, key="g") for s in range(40)}
    assert picks == {1, 3, 4}  # never itself, never the incorrect one, all reachable
    assert pick_sibling(correct, 0, seed=5, key="g") == pick_sibling(correct, 0, seed=5, key="g")
    assert pick_sibling([T, F], 0) is None
    assert pick_sibling([F, T], 0) == 1


def test_pick_demonstration_modes_and_fallbacks():
    texts = ["<think>t</think>A", "B", "C"]
    d = pick_demonstration(texts, [T, T, F], 1)
    assert d == Demonstration(text="A", mode="sibling", index=0)
    assert pick_demonstration(texts, [T, T, F], 1, strip_think_blocks=False).text == texts[0]
    # lone correct: fall back to the solution, or nothing.
    assert pick_demonstration(texts, [F, T, F], 1, solution="S").mode == "reference_solution"
    assert pick_demonstration(texts, [F, T, F], 1) is None
    assert pick_demonstration(texts, [F, T, F], 1, solution="S", fallback_to_solution=False) is None
    # explicit modes
    assert pick_demonstration(texts, [T, T, F], 1, "reference_solution", solution="S").text == "S"
    assert pick_demonstration(texts, [T, T, F], 1, "reference_solution") is None
    assert pick_demonstration(texts, [T, T, F], 2, "reference_answer", answer="42").text == "42"


def test_render_the_spec_template_with_braces_in_the_text():
    got = render_teacher_prompt("Find {x} with $x^{2}=4$.", "x = {2}")
    assert (
        got
        == "Find {x} with $x^{2}=4$.\n\nCorrect solution:\n\nx = {2}\n\nCorrectly solve the original question.\n"
    )
    assert render_teacher_prompt("P", "D", "[{demonstration}] {prompt}") == "[D] P"
    assert DEFAULT_TEMPLATE.count("{") == 2


# --------------------------------------------------------------------------- token sequence

QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def char_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII + newline) plus special tokens, so the
    expected ids can be written out from the expected string; a BOS post-processor when
    `bos` to catch a doubled BOS."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.add_special_tokens(specials)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.chat_template = QWEN3_TEMPLATE
    return fast


def expected_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The ids of `text` written out by hand: specials as one id, every other char its own."""
    vocab = tok.get_vocab()
    ids, i = [], 0
    while i < len(text):
        for sp in ("<|im_start|>", "<|im_end|>", "<s>"):
            if text.startswith(sp, i):
                ids.append(vocab[sp])
                i += len(sp)
                break
        else:
            ids.append(vocab[text[i]])
            i += 1
    return ids


def test_qwen3_template_context_and_offset():
    tok = char_tokenizer()
    demo = Demonstration(text="6*7 = 42", mode="sibling", index=2)
    resp = [5, 9, 77, 3]
    ctx = build_teacher_context(tok, "What is 6*7?", demo, resp)
    rendered = (
        "<|im_start|>user\nWhat is 6*7?\n\nCorrect solution:\n\n6*7 = 42\n\n"
        "Correctly solve the original question.\n<|im_end|>\n<|im_start|>assistant\n"
    )
    want = expected_ids(tok, rendered)
    assert ctx.input_ids == want + resp
    assert ctx.response_start == len(want)
    assert ctx.input_ids[ctx.response_start :] == resp
    # thinking models: the generation prompt follows the student's rendering.
    think = build_teacher_context(
        tok, "Q", demo, resp, chat_template_kwargs={"enable_thinking": False}
    )
    assert think.input_ids[: think.response_start][
        -len("<think>\n\n</think>\n\n") :
    ] == expected_ids(tok, "<think>\n\n</think>\n\n")


def test_no_doubled_bos_from_the_tokenizer():
    tok = char_tokenizer(bos=True)
    tok.chat_template = "{{ bos_token }}" + QWEN3_TEMPLATE
    assert tok("a")["input_ids"][0] == 1  # the post-processor would add one
    ctx = build_teacher_context(tok, "Q", Demonstration("D", "sibling", 1), [7])
    assert ctx.input_ids.count(1) == 1 and ctx.input_ids[0] == 1


def test_wordlevel_tokenizer_with_a_simple_template():
    words = ["<unk>", "<bos>", "USER:", "ASSISTANT:", "Correct", "solution:", "Correctly", "solve"]
    words += ["the", "original", "question.", "2+2?", "4"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}USER: {{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )
    ctx = build_teacher_context(fast, "2+2?", Demonstration("4", "sibling", 0), [11, 12])
    v = vocab
    want = [v["USER:"], v["2+2?"], v["Correct"], v["solution:"], v["4"], v["Correctly"], v["solve"]]
    want += [v["the"], v["original"], v["question."], v["ASSISTANT:"]]
    assert ctx.input_ids == want + [11, 12] and ctx.response_start == len(want)


def test_teacher_context_for_group_end_to_end():
    tok = char_tokenizer()
    g = contract_group(["<think>a</think>x=1", "wrong", "<think>b</think>x=2", ""], [T, F, T, T])
    ctx = teacher_context_for_group(g, 0, tok)
    assert ctx is not None and ctx.demonstration.index in (2, 3)
    assert ctx.input_ids[ctx.response_start :] == g.responses[0].token_ids.tolist()
    # the same call gives the same sibling; the text is stripped of its think block.
    again = teacher_context_for_group(g, 0, tok)
    assert again == ctx
    ctx2 = teacher_context_for_group(g, 3, tok, TeacherRequest(scope="correct_mixed", seed=1))
    assert ctx2.demonstration.text in ("x=1", "x=2")
    # response 3 has empty text: it is decoded from its tokens when picked as a sibling.
    demos = [
        teacher_context_for_group(g, 0, tok, TeacherRequest(seed=s)).demonstration
        for s in range(30)
    ]
    assert {d.index for d in demos} == {2, 3}
    decoded = tok.decode(list(range(40, 44)), skip_special_tokens=True).strip()
    assert decoded and all(d.text == decoded for d in demos if d.index == 3)
    # no other correct response and no solution: no context; the answer in its mode.
    lone = contract_group(["x=1", "no"], [T, F])
    assert teacher_context_for_group(lone, 0, tok) is None
    ans = teacher_context_for_group(
        lone, 1, tok, TeacherRequest(scope="nonzero_adv", context_mode="reference_answer")
    )
    assert ans.demonstration == Demonstration("42", "reference_answer", None)

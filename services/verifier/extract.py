"""Where the final answer is in a text: pure string work (regexes and one linear brace scan),
no sympy, so it is cheap on any input. mathcheck.py parses and compares what is found here.

- `boxed_answers`: the last `\\boxed{}` and the boxes joined to it ("\\boxed{1} and
  \\boxed{2}", "\\boxed{(2,2)} \\quad \\text{and} \\quad \\boxed{(6,2)}", "\\boxed{1}\\boxed{2}"):
  the several answers of a multi-solution problem.
- `final_answer_line`: the text after the last "answer is / answer: / ####" anchor.
- `dapo_answer_line`: the last "Answer:" line near the end (DAPO-Math's format, verl's
  `math_dapo` reward).
"""

from __future__ import annotations

import re

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
# Literal braces `\{ \}` (set notation) are not group delimiters, so they are matched first and
# skipped.
_BRACE = re.compile(r"\\[{}]|[{}]")
# "The final answer is X", "Answer: X", GSM8K's "#### X". The last such line wins.
_ANSWER_LINE = re.compile(
    r"(?:\banswer\b\s*(?:is\b\s*)?[:：]?|^\s*####)\s*(?P<ans>[^\n]+)",
    re.IGNORECASE | re.MULTILINE,
)
# A "final answer" stated after the last box overrides it (a worked solution that boxes its
# intermediate results, then concludes "Final Answer: The final answer is $10,455$"). Only this
# explicit phrase: a bare "answer" after a box is usually prose about it ("... is the answer").
_FINAL_ANSWER = re.compile(r"\bfinal\s+answer\b\s*(?:is\b)?\s*[:：]?\s*(?P<ans>[^\n]+)", re.IGNORECASE)
# verl's math_dapo: the last "Answer:" line within the response's last 300 characters (the
# DAPO prompt asks for it as the last line; a line far from the end is not the final answer).
_DAPO_LINE = re.compile(r"answer\s*:\s*(?P<ans>[^\n]+)", re.IGNORECASE)
DAPO_TAIL_CHARS = 300

# What may stand between two boxes that give the answers of one problem, once LaTeX spacing,
# math delimiters and \text{} wrappers are stripped (_plain): nothing, or a conjunction ("and",
# "or", a comma or semicolon), optionally after up to four words ("papers and", "for part (a)
# and") and before one variable label ("and y_2 ="). Anything else ("no wait,", "then I
# realised it is") means the earlier box was superseded, and only the last one counts.
_JOINER = re.compile(
    r"""\s*(?:
        (?:[\w()]+\s+){0,4}(?:,\s*(?:and|or)\b|,|;|\band\b|\bor\b)\s*
        (?:[A-Za-z](?:_\{?\w+\}?)?\s*=\s*)?
    )?""",
    re.VERBOSE | re.IGNORECASE,
)
# Words of a self-correction: "\boxed{3} wait, \boxed{5}" gives one answer, the last.
_SUPERSEDED = re.compile(r"\b(?:wait|no|not|actually|but|hmm|instead|oops|mistake|correct\w*)\b",
                         re.IGNORECASE)
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox)\s*\{([^{}]*)\}")
_LATEX_SPACING = re.compile(r"\\(?:quad|qquad|[,;:! ]|\(|\)|\[|\])|\\\\|\$|~|&")
# A box farther than this from the next one is never joined to it (keeps the joiner regex on
# short strings).
_MAX_JOINER_CHARS = 80
# Most boxes joined into one answer (math-verify joins 6): each is parsed by sympy on its own,
# so a response of hundreds of joined boxes must not cost hundreds of parses.
MAX_JOINED = 16


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each group-opening `{` -> index of its matching `}`, in one linear pass (a
    5,000-deep nest must not cost more than a flat string)."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for m in _BRACE.finditer(text):
        tok = m.group()
        if tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            pairs[stack.pop()] = m.start()
    return pairs


def _boxes(text: str) -> list[tuple[int, int]]:
    """(start of `\\boxed`, index of its closing brace) of every complete outermost box, in
    order. A truncated box (no closing brace) and boxes nested inside another are left out."""
    pairs = _closing_braces(text)
    out: list[tuple[int, int]] = []
    for m in _BOX_START.finditer(text):
        close = pairs.get(m.end() - 1)
        if close is None or (out and m.start() < out[-1][1]):
            continue
        out.append((m.start(), close))
    return out


def _content(text: str, box: tuple[int, int]) -> str:
    start, close = box
    return text[text.index("{", start) + 1 : close]


def _plain(connector: str) -> str:
    return _LATEX_SPACING.sub(" ", _TEXT_WRAPPER.sub(r" \1 ", connector))


def _joined(connector: str) -> bool:
    """Do two boxes with `connector` between them give answers of one problem?"""
    if len(connector) > _MAX_JOINER_CHARS:
        return False
    plain = _plain(connector)
    return _JOINER.fullmatch(plain) is not None and _SUPERSEDED.search(plain) is None


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), or None. A truncated
    trailing box (no closing brace) is skipped in favour of the one before it."""
    boxes = _boxes(text)
    return _content(text, boxes[-1]) if boxes else None


def boxed_answers(text: str) -> tuple[list[str], int]:
    """The contents of the last box and of the boxes joined to it, in order, and where the
    last box ends ([] and -1 without a box)."""
    boxes = _boxes(text)
    if not boxes:
        return [], -1
    chain = [boxes[-1]]
    for prev in reversed(boxes[:-1]):
        if len(chain) == MAX_JOINED or not _joined(text[prev[1] + 1 : chain[0][0]]):
            break
        chain.insert(0, prev)
    return [_content(text, b) for b in chain], boxes[-1][1] + 1


def final_answer_line(text: str) -> str | None:
    """Text after the last "answer is / answer: / ####" anchor, or None."""
    last = None
    for last in _ANSWER_LINE.finditer(text):  # noqa: B007 - we want the final match
        pass
    return last.group("ans").strip() if last else None


def final_answer_after(text: str, pos: int) -> str | None:
    """The last explicit "final answer (is)" line that starts at or after `pos`, or None."""
    last = None
    for last in _FINAL_ANSWER.finditer(text, pos):  # noqa: B007 - we want the final match
        pass
    return last.group("ans").strip() if last else None


def dapo_answer_line(text: str) -> str | None:
    """The last "Answer: X" of the response's last DAPO_TAIL_CHARS characters, or None."""
    last = None
    for last in _DAPO_LINE.finditer(text[-DAPO_TAIL_CHARS:]):  # noqa: B007 - the final match
        pass
    return last.group("ans").strip() if last else None

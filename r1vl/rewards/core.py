"""StepRAR and StepRVR, the two rule-based step-wise rewards of StepGRPO (R1-VL, arXiv 2503.12937).

Both are pure functions of strings and never raise on any completion (empty,
megabytes long, lone surrogates, regex metacharacters, pathological maths).

StepRAR -- step-wise reasoning accuracy (`accuracy_reward`)
------------------------------------------------------------
k = (key-step groups matched) / (groups), 0 when there are none. A group is a
list of equivalent phrasings of one key step; it matches when any phrasing,
lowercased, is a substring of the lowercased text of the completion's
`### Step N:` sections joined by single spaces (Image Description and
Rationales do not count). An empty or blank phrasing never matches (as a
substring it would match every text; the data loader refuses such rows).

variant="paper" (default; Eq. 2 of the paper) compares the *final answers*:
the first line after `### The final answer is:` in the completion against the
same line of the solution (the whole stripped solution if it has no such
header, e.g. a bare "42"; a display `$$ ... $$` / `\\[ ... \\]` opened on that line
runs on to its closing delimiter), equal when the two strings are identical (also
after NFKC, "−" as "-", markdown bold and a trailing period dropped); a reference
that is one choice letter or yes/no is matched by the letter or word the answer
starts with; a ratio or a time of day ("2:3", "3:45") must be written the same on
both sides; otherwise math-verify decides, each line read as LaTeX when it carries
mathematics without delimiters (`r1vl.rewards.answers`: math-verify alone reads
"2\\sqrt{3}" as 2, "2:3" as 2, "\\dfrac{3}{4}" and "A." as nothing)::

    1 + alpha*k   answer right
        alpha*k   answer given but wrong
        0         no non-empty final-answer line

variant="official" reproduces the authors' released code
(src/r1-vl/src/open_r1/grpo.py): math-verify on the *whole* completion against
the *whole* solution (`verify(parse(completion), parse(solution))`), falling
back to comparing the final-answer lines (each side's whole stripped text when
it has no final-answer header); reward 1[correct] + alpha*k, alpha*k also when
no answer is given.

Why the default differs: math-verify's parse of a whole completion extracts
*some* expression of it (in practice the last one it can parse), not
necessarily the final answer, so under the official variant a completion whose
steps write the right number but whose final answer is different and not a
parseable expression ("eight", "cannot be determined") or missing is scored
correct; and a completion with no answer at all still collects alpha*k. For a
choice-letter answer the whole-text parse finds no letter, only some number,
often the last step's: a wrong letter after as many steps as the solution has
("### Step 2:" on both sides) is scored correct. The paper variant rewards only
what the completion states as its answer.

StepRVR -- step-wise reasoning validity (`validity_reward`)
-----------------------------------------------------------
1.0 iff the completion is *complete* -- contains `### Image Description:`,
`### Rationales:`, `### Step 1:` and `### The final answer is:` -- and
*logical* -- the first final-answer header starts after the end of the last
`### Step N:` header (not checked when the stripped text ends with the
final-answer header) and the step numbers read 1, 2, ..., n in order;
otherwise 0.0. (Same as the authors' code; there is one variant.)
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from r1vl.data.format import (
    FINAL_ANSWER,
    IMAGE_DESCRIPTION,
    RATIONALES,
    _STEP_HEADER,
    answer_line,
    extract_final_answer,
    step_numbers,
    step_sections,
    without_markers,
)
from r1vl.rewards import answers
from r1vl.rewards.verify import (
    DEFAULT_TIMEOUT_S,
    math_equal,
    math_equal_official,
    needs_worker_process,
)

VARIANTS = ("paper", "official")
_CANONICAL_INT = re.compile(r"(?:-?[1-9][0-9]{0,11}|0)\Z", re.ASCII)
DEFAULT_ALPHA = 0.1


@dataclass
class AccuracyResult:
    reward: float  # the StepRAR value
    key_step_fraction: float  # k
    correct: bool  # the answer was judged right
    timed_out: bool  # a math-verify call hit its deadline (counted as "not verified")


# ---------------------------------------------------------------------------------
# helpers that accept anything


def as_text(x: Any) -> str:
    """Any object as a str, never raising: bytes are decoded (invalid UTF-8 replaced), None is ''.
    A str subclass becomes a plain str (its text): reward workers unpickle plain strs only."""
    if type(x) is str:
        return x
    if isinstance(x, str):
        return str.__str__(x)
    if x is None:
        return ""
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).decode("utf-8", errors="replace")
    try:
        return str(x)
    except Exception:  # noqa: BLE001
        return ""


def _alternatives(group: Any) -> list[str]:
    if isinstance(group, (list, tuple)):
        alts = [as_text(alt) for alt in group
                if isinstance(alt, (str, bytes, int, float)) and not isinstance(alt, bool)]
    elif isinstance(group, (str, bytes, int, float)) and not isinstance(group, bool):
        alts = [as_text(group)]
    else:
        return []  # a malformed group is a key step nobody can match (it still counts)
    # an empty phrasing would be a substring of every completion: it matches nothing instead
    return [alt for alt in alts if alt.strip()]


def key_step_groups(key_steps: Any) -> list[list[str]]:
    """Normalise key steps to a list of groups of alternatives.

    Accepts `{"Steps": [[alt, ...], ...]}`, a plain list of such groups, or
    None/empty; a bare string (as a group or as the whole value) is a
    one-alternative group. Never raises.
    """
    try:
        if key_steps is None:
            return []
        if isinstance(key_steps, dict):
            key_steps = key_steps.get("Steps", [])
            if key_steps is None:
                return []
        if isinstance(key_steps, (str, bytes)):
            text = as_text(key_steps)
            return [[text]] if text.strip() else []
        if not isinstance(key_steps, (list, tuple)):
            return []
        return [_alternatives(g) for g in key_steps]
    except Exception:  # noqa: BLE001 -- e.g. a dict subclass whose .get raises
        return []


def _nfc_lower(text: str) -> str:
    # NFC, as Qwen2's tokenizer normalises what it encodes: a key step written with a combining
    # accent ("café" as e + U+0301) is found in a completion that reproduces it (decoded as é);
    # without the grounding markers, which decoding drops
    return unicodedata.normalize("NFC", without_markers(text)).lower()


def _step_text(completion: str) -> str:
    return _nfc_lower(" ".join(step_sections(completion)))


def key_step_fraction(completion: str, key_steps: Any) -> float:
    """k: the fraction of key-step groups found in the completion's Step sections (both sides
    lower-cased and in Unicode NFC)."""
    groups = key_step_groups(key_steps)
    if not groups:
        return 0.0
    text = _step_text(as_text(completion))
    matched = sum(1 for g in groups if any(_nfc_lower(alt) in text for alt in g))
    return matched / len(groups)


# ---------------------------------------------------------------------------------
# StepRAR


def _official_answer_line(text: str) -> str:
    # The authors' fallback: the final-answer line, or the whole stripped text.
    line = extract_final_answer(text)
    if line is not None:
        return line
    return text.strip() if FINAL_ANSWER not in text else ""


def accuracy_details(completion: Any, solution: Any, key_steps: Any = None, *,
                     alpha: float = DEFAULT_ALPHA, variant: str = "paper",
                     timeout_s: float | None = DEFAULT_TIMEOUT_S,
                     use_math_verify: bool = True) -> AccuracyResult:
    """StepRAR with its parts (k, correctness, whether math-verify timed out).

    Runs math-verify in this process under a `timeout_s` deadline (main thread
    only; off the main thread use `accuracy_reward`, which sandboxes).
    use_math_verify=False skips math-verify and reports the call as timed out
    (what a worker killed at its hard deadline gets: only string equality counts).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    try:
        completion = without_markers(as_text(completion))  # as the engines decode (a reference
        solution = without_markers(as_text(solution))  # with <|box_start|> was never matched)
        k = key_step_fraction(completion, key_steps)
        bonus = alpha * k
        if variant == "paper":
            pred = answer_line(completion)
            if pred is None:
                return AccuracyResult(0.0, k, False, False)
            gold = answer_line(solution)
            if gold is None and FINAL_ANSWER not in solution:
                gold = solution.strip() or None  # a bare answer as the solution
            if gold is None:  # the reference states no answer: nothing can be right
                return AccuracyResult(bonus, k, False, False)
            if pred == gold:
                return AccuracyResult(1.0 + bonus, k, True, False)
            # ratios / times unspaced: math-verify reads "2:3" as 2 but "2 : 3" as 3
            pred, gold = answers.unspaced_colons(answers.clean(pred)), answers.unspaced_colons(answers.clean(gold))
            if pred.rstrip(".") == gold.rstrip("."):
                return AccuracyResult(1.0 + bonus, k, True, False)
            letter = answers.gold_choice(gold)
            yes_no = None if letter else answers.yes_no(gold)
            if letter or yes_no:  # a choice letter or yes/no: math-verify reads neither
                equal = (answers.pred_choice(pred) == letter) if letter else (answers.yes_no(pred) == yes_no)
                return AccuracyResult((1.0 if equal else 0.0) + bonus, k, equal, False)
            if answers.colon_groups(pred) != answers.colon_groups(gold):
                # a ratio or a time of day, which math-verify reads as its first number ("2:5" and
                # "2" were "2:3"), is compared as written
                return AccuracyResult(bonus, k, False, False)
            if _CANONICAL_INT.match(pred) and _CANONICAL_INT.match(gold):
                # two different integers written plainly: math-verify can only say "different"
                # (checked against it in the tests); skipping it saves ~2 ms per completion
                return AccuracyResult(bonus, k, False, False)
            if not use_math_verify:
                return AccuracyResult(bonus, k, False, True)
            equal, timed_out = math_equal(gold, pred, timeout_s)
            return AccuracyResult((1.0 if equal else 0.0) + bonus, k, equal, timed_out)
        # official: the string comparison is the authors' fallback; doing it first gives
        # the same result (correct = verify OR string-equal) and skips most math-verify calls.
        if _official_answer_line(completion) == _official_answer_line(solution):
            return AccuracyResult(1.0 + bonus, k, True, False)
        if not use_math_verify:
            return AccuracyResult(bonus, k, False, True)
        equal, timed_out = math_equal_official(completion, solution, timeout_s)
        return AccuracyResult((1.0 if equal else 0.0) + bonus, k, equal, timed_out)
    except Exception:  # noqa: BLE001 -- last line of defence: never raise on a string
        return AccuracyResult(0.0, 0.0, False, False)


def accuracy_reward(completion: Any, solution: Any, key_steps: Any = None, *,
                    alpha: float = DEFAULT_ALPHA, variant: str = "paper",
                    timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """StepRAR (see the module docstring): 1[answer right] + alpha*k, per `variant`.

    math-verify runs under a `timeout_s` deadline per call; a timeout counts
    as "not verified". Called off the main thread (where no signal-based
    deadline is possible), the work runs in a one-process sandbox.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if needs_worker_process(timeout_s):
        from r1vl.rewards.pool import sandbox_accuracy

        return sandbox_accuracy(completion, solution, key_steps, alpha=alpha,
                                variant=variant, timeout_s=timeout_s).reward
    return accuracy_details(completion, solution, key_steps, alpha=alpha,
                            variant=variant, timeout_s=timeout_s).reward


# ---------------------------------------------------------------------------------
# StepRVR


def _is_complete(text: str) -> bool:
    return all(h in text for h in (IMAGE_DESCRIPTION, RATIONALES, "### Step 1:", FINAL_ANSWER))


def _is_logical(text: str) -> bool:
    if not text.strip().endswith(FINAL_ANSWER):
        first_final = text.find(FINAL_ANSWER)
        last_step_end = -1
        for m in _STEP_HEADER.finditer(text):
            last_step_end = m.end()
        if first_final < 0 or last_step_end < 0 or first_final < last_step_end:
            return False
    numbers = step_numbers(text)
    if not numbers:
        return False
    for expected, written in enumerate(numbers, start=1):
        # compare as integers ("01" reads 1, as in the authors' int()); a number too
        # long to convert cannot equal a step count
        if len(written) > 12 or int(written) != expected:
            return False
    return True


def validity_reward(completion: Any) -> float:
    """StepRVR: 1.0 iff the completion is complete and logical (module docstring), else 0.0."""
    try:
        text = as_text(completion)
        return 1.0 if (_is_complete(text) and _is_logical(text)) else 0.0
    except Exception:  # noqa: BLE001
        return 0.0

"""Hand-written cases for every rule of StepRAR / StepRVR (both variants) and for the format helpers."""
import threading

import pytest

from r1vl.data import extract_final_answer, format_prompt
from r1vl.data.format import REASONING_INSTRUCTION, step_sections
from r1vl.rewards import accuracy_reward, key_step_fraction, key_step_groups, validity_reward
from r1vl.rewards.core import accuracy_details


def make(description="Two numbers: 4 and 3.", rationale="Add the two numbers.",
         steps=("The numbers are 4 and 3.", "4 + 3 = 7."), answer="7", tail=""):
    parts = [f"### Image Description:\n{description}", f"### Rationales:\n{rationale}",
             "### Let's think step by step."]
    parts += [f"### Step {i}:\n{s}" for i, s in enumerate(steps, start=1)]
    if answer is not None:
        parts.append(f"### The final answer is: {answer}")
    return "\n".join(parts) + tail


SOL = make()
KS = {"Steps": [["4 and 3", "3 and 4"], ["4 + 3 = 7", "4+3=7"]]}


# ---------------------------------------------------------------- format helpers

def test_format_prompt_is_the_authors_instruction_then_the_question():
    p = format_prompt("How many red shapes are there?")
    assert p.startswith("Generate an image description based on the question.\n")
    assert p.endswith("### The final answer is: \n\nQuestion: How many red shapes are there?")
    for h in ("### Image Description:", "### Rationales:", "### Let's think step by step.", "### Step 1:"):
        assert h in p
    assert p == REASONING_INSTRUCTION.replace("{question}", "Question: How many red shapes are there?")


def test_format_prompt_keeps_an_existing_question_prefix_and_is_idempotent():
    p = format_prompt("Question: What is 2+2?")
    assert p.count("Question: ") == 1
    assert format_prompt(p) == p
    # braces in the question are not format fields
    assert format_prompt("Is {x} > 1?").endswith("Question: Is {x} > 1?")


@pytest.mark.parametrize("text,expected", [
    ("### The final answer is: 42", "42"),
    ("### The final answer is:42  ", "42"),
    ("### The final answer is:\n42\nmore", "42"),
    ("### The final answer is:  \n\n  x = 3  \n### Step 9:", "x = 3"),
    ("### The final answer is: A\n### The final answer is: B", "A"),  # the first header
    ("### The final answer is:", None),
    ("### The final answer is:   \n \n", None),
    ("no header here: 42", None),
    ("", None),
    ("### The final answer is: 5\r\n", "5"),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_final_answer_non_string():
    assert extract_final_answer(None) is None  # type: ignore[arg-type]


def test_step_sections_stop_at_next_header_and_skip_leading_space():
    text = "### Step 1:  a\nb\n### Step 2:\nc ### not a break\n### The final answer is: 1"
    assert step_sections(text) == ["a\nb", "c ### not a break"]


# ---------------------------------------------------------------- key steps

@pytest.mark.parametrize("ks,groups", [
    (None, []),
    ({}, []),
    ({"Steps": []}, []),
    ({"Steps": None}, []),
    ([], []),
    ({"Steps": [["a", "b"], "c"]}, [["a", "b"], ["c"]]),
    ([["a"], ["b", "c"]], [["a"], ["b", "c"]]),
    ("solo", [["solo"]]),
    ([["a", 3, None]], [["a", "3"]]),
    ([None], [[]]),
])
def test_key_step_groups(ks, groups):
    assert key_step_groups(ks) == groups


def test_k_counts_groups_matched_case_insensitively_in_step_sections_only():
    c = make(description="4 + 3 = 7 in the description", steps=("THE NUMBERS ARE 4 AND 3.", "So 8."))
    assert key_step_fraction(c, KS) == 0.5  # group 1 via "4 and 3" (lowercased); group 2 only in the description
    assert key_step_fraction(make(rationale="4+3=7", steps=("x",)), KS) == 0.0  # rationale does not count
    assert key_step_fraction(SOL, KS) == 1.0
    assert key_step_fraction(SOL, None) == 0.0
    assert key_step_fraction(SOL, {"Steps": []}) == 0.0
    assert key_step_fraction(SOL, [["nope"], ["4 + 3 = 7"], ["zzz"]]) == pytest.approx(1 / 3)


def test_k_blank_phrasings_match_nothing():
    """An empty or blank phrasing (a data slip) is in every text: it is left out of its group, and a
    group of nothing else is never matched (it still counts in the fraction's denominator)."""
    assert key_step_fraction(SOL, [[""]]) == 0.0
    assert key_step_fraction(SOL, [["  ", "\n"]]) == 0.0
    assert key_step_fraction(SOL, [["4 + 3 = 7"], [""]]) == 0.5
    assert key_step_fraction(SOL, [["", "4 + 3 = 7"]]) == 1.0


def test_k_alternative_can_span_two_step_sections_joined_by_a_space():
    c = make(steps=("first half", "second half"))
    assert key_step_fraction(c, [["half second"]]) == 1.0  # "first half" + " " + "second half"


def test_k_final_answer_section_is_not_step_text():
    c = make(steps=("nothing here",), answer="4 + 3 = 7")
    assert key_step_fraction(c, KS) == 0.0


# ---------------------------------------------------------------- StepRAR, paper variant

@pytest.mark.parametrize("answer,expected", [
    ("7", 1.1),            # identical
    ("7.0", 1.1),          # math-verify
    ("\\frac{14}{2}", 1.1),
    ("$7$", 1.1),
    ("8", 0.1),            # given but wrong
    ("", 0.0),             # header without an answer
    (None, 0.0),           # no header
])
def test_paper_variant_branches(answer, expected):
    assert accuracy_reward(make(answer=answer), SOL, KS) == pytest.approx(expected)


# (reference answer, completion's answer, judged right): how models and data sets write answers
ANSWER_FORMS = [
    # LaTeX without delimiters: read as LaTeX, not as its leading number
    ("2\\sqrt{3}", "2", False), ("2\\sqrt{3}", "2\\sqrt{5}", False), ("2\\pi", "2", False),
    ("2\\sqrt{3}", "$2\\sqrt{3}$", True), ("2\\sqrt{3}", "2\\sqrt{3}.", True), ("\\dfrac{3}{4}", "0.75", True),
    ("x^2+1", "$x^2+1$", True), ("4\\sqrt{2} cm", "4\\sqrt{2}", True), ("4\\sqrt{2} cm", "4 cm", False),
    ("The area is 2\\sqrt{3}", "2\\sqrt{3} square units", True), ("12", "12 \\text{ cm}^2", True),
    ("2x+1", "1 + 2x", True), ("y = 2x + 1", "2x+1", True), ("(1, 2)", "(1,2)", True),
    # signs and Unicode
    ("3", "- 3", False), ("-3", "- 3", True), ("-3", "(-3)", True), ("-3", "\u22123", True), ("12", "\uff11\uff12", True),
    # choice letters and yes/no, which math-verify reads as nothing
    ("A", "A.", True), ("A", "(A)", True), ("A", "a", True), ("A", "**A**", True), ("A", "Option A", True),
    ("A", "The answer is A.", True), ("A", "A) 12", True), ("A", "$A$", True), ("A", "\\text{A}", True),
    ("(B)", "B", True), ("A", "B", False), ("A", "Answer: B", False), ("A", "Apple", False), ("A", "(B) A", False),
    ("A", "a triangle", False), ("A", "A triangle", False), ("A", "A: 12", True), ("A", "a)", True), ("A", "[A]", True),
    ("C", "C. Both", True), ("A", "A.B", False),
    ("Yes", "yes.", True), ("no", "No, it is not.", True), ("Yes", "No", False), ("Yes", "Not sure", False),
    # display maths on the lines after the header
    ("0.5", "\n$$\n\\frac{1}{2}\n$$", True), ("0.5", "\n\\[\n\\frac{1}{2}\n\\]", True), ("0.5", "$$\n\\frac{1}{3}\n$$", False),
    # plain text, as before
    ("12", "12 cm", True), ("12", "12 square units", True), ("50%", "0.5", True), ("30", "30^\\circ", True),
    ("1234567", "1,234,567", True), ("12", "x = 12", True), ("12", "It is 12.", True), ("7", "7 (seven)", True),
    ("12", "The area is 12 square units.", True), ("7", "8", False),
    # ratios and times of day, which math-verify reads as their first number ("2:5" was "2:3")
    ("2:3", "2:5", False), ("2:3", "2", False), ("3:45", "3:50", False), ("1", "1:2", False), ("2:3", "4:6", False),
    ("2:3", "2 : 3", True), ("2:3", "The ratio is 2:3.", True), ("2:3", "x = 2 : 3", True), ("3:45 pm", "3:45 PM", True),
    ("1:2:4", "1:2:4", True), ("1:2:4", "1:2:5", False),
    # intervals and lists, read as LaTeX: math-verify reads the plain text "[1, 3]" as 3 and "[1,3]" as nothing
    ("[1, 3]", "[1,3]", True), ("[1,3]", "$[1,3]$", True), ("[1, 3]", "[0, 3]", False), ("[1, 3]", "3", False),
    ("[1,3]", "The interval is [1, 3]", True), ("[1, 3]", "[1, 3)", False), ("3", "2, 3", False),
    ("1,000", "1000", True), ("2.5", "2,5", True), ("0.5", "0,5", True), ("12.5 cm", "12,5 cm", True),
    ("2,5", "2.5", True),  # a decimal comma (no space after it) stays plain text, which math-verify reads
    ("1, 2, 3", "1,2,3", True), ("1,2,3", "1, 2, 3", True), ("1,2,3", "3", False), ("1,250,000", "1250000", True),
    # a boxed letter or yes/no; yes/no after a lead-in, as letters
    ("B", "\\boxed{B}", True), ("B", "$\\boxed{B}$", True), ("B", "\\boxed{C}", False), ("No", "Answer: No", True),
    ("Yes", "The answer is yes.", True), ("Yes", "\\boxed{Yes}", True), ("Yes", "Answer: No", False),
    # a sentence's full stop is no part of the answer, on either side; a reference letter with one is a letter
    ("Paris", "Paris.", True), ("Paris.", "Paris", True), ("C.", "(C)", True), ("C.", "(B)", False),
]


@pytest.mark.parametrize("gold,pred,right", ANSWER_FORMS)
def test_paper_variant_answer_forms(gold, pred, right):
    r = accuracy_details(make(answer=pred), make(answer=gold), None)
    assert (r.correct, r.reward) == (right, float(right)), (gold, pred)


def test_paper_variant_reads_long_answer_lines_quickly():
    """No reading is quadratic in the line's length (a guard against a regex scan that would take
    minutes on a 200 kB answer line; each takes about a millisecond)."""
    import time

    # "1" * 12_000: the ratio scan tried from every digit of the run took 32 s, outside any deadline
    for line in ("ab " * 70_000 + "1+", "a" * 200_000 + "+1", "(" * 200_000, "1" * 12_000, "1" * 200_000 + ":2"):
        t = time.perf_counter()
        accuracy_details(make(answer=line), make(answer="2\\sqrt{3}"), None, use_math_verify=False)
        assert time.perf_counter() - t < 5.0
    # a choice letter read off a line of a letter, a long whitespace run and more: 28 s at 64k spaces
    for line in ("A" + " " * 64_000 + "x", "b" + " " * 32_000 + "." + " " * 32_000 + "x"):
        t = time.perf_counter()
        accuracy_details(make(answer=line), make(answer="B"), None, use_math_verify=False)
        assert time.perf_counter() - t < 5.0


def test_paper_variant_uses_final_answer_line_not_earlier_expressions():
    # the steps write the right result, the final answer is a different one in words:
    # wrong under "paper", right under "official" (whole-text math-verify finds the 7)
    c = make(steps=("The numbers are 4 and 3.", "4 + 3 = 7."), answer="eight")
    assert accuracy_reward(c, SOL, KS) == pytest.approx(0.1)
    assert accuracy_reward(c, SOL, KS, variant="official") == pytest.approx(1.1)
    # a parseable different final answer is what math-verify extracts: wrong under both
    c = make(steps=("The numbers are 4 and 3.", "4 + 3 = 7."), answer="8")
    assert accuracy_reward(c, SOL, KS, variant="official") == pytest.approx(0.1)


def test_paper_variant_alpha_and_partial_k():
    c = make(steps=("The numbers are 4 and 3.", "so 7"))
    assert accuracy_reward(c, SOL, KS, alpha=0.5) == pytest.approx(1.25)
    assert accuracy_reward(make(answer="9", steps=("x",)), SOL, KS) == 0.0  # wrong and k = 0


def test_paper_variant_string_equality_for_non_math_answers():
    sol = make(answer="B. the cat")
    assert accuracy_reward(make(answer="B. the cat"), sol, None) == 1.0
    assert accuracy_reward(make(answer="B. the dog"), sol, None) == 0.0


def test_paper_variant_bare_answer_solution_and_solution_without_answer():
    assert accuracy_reward(make(answer="7"), "7", None) == 1.0
    assert accuracy_reward(make(answer="7"), " 7 \n", None) == 1.0
    # a reference with an empty final-answer line: nothing can be right, k still counts
    assert accuracy_reward(make(answer="7"), "### The final answer is:  ", KS) == pytest.approx(0.1)


def test_paper_variant_gold_is_first_header_of_solution():
    sol = "### The final answer is: 7\n### The final answer is: 9"
    assert accuracy_reward(make(answer="7"), sol, None) == 1.0
    assert accuracy_reward(make(answer="9"), sol, None) == 0.0


def test_details_report_parts():
    r = accuracy_details(make(answer="7.0"), SOL, KS)
    assert (r.correct, r.key_step_fraction, r.timed_out) == (True, 1.0, False)
    r = accuracy_details(make(answer="7.0"), SOL, KS, use_math_verify=False)
    assert (r.correct, r.timed_out, r.reward) == (False, True, pytest.approx(0.1))


# ---------------------------------------------------------------- StepRAR, official variant

def test_official_variant_no_answer_still_gets_alpha_k():
    assert accuracy_reward(make(answer=None), SOL, KS, variant="official") == pytest.approx(1.1)  # steps contain 7
    c = make(answer=None, steps=("The numbers are 4 and 3.", "no result"))
    assert accuracy_reward(c, SOL, KS, variant="official") == pytest.approx(0.05)


def test_official_variant_branches():
    assert accuracy_reward(make(answer="7"), SOL, KS, variant="official") == pytest.approx(1.1)
    assert accuracy_reward(make(answer="\\frac{14}{2}"), SOL, KS, variant="official") == pytest.approx(1.1)
    wrong = make(steps=("The numbers are 4 and 3.", "4 + 3 = 9."), answer="9")
    assert accuracy_reward(wrong, SOL, KS, variant="official") == pytest.approx(0.05)


def test_official_variant_string_fallback_whole_text_without_header():
    # no header on either side: the whole stripped texts are compared
    assert accuracy_reward("  the cat  ", "the cat", None, variant="official") == 1.0
    assert accuracy_reward("the cat", "the dog", None, variant="official") == 0.0
    # header on the solution only: its answer line against the whole completion
    assert accuracy_reward("  blue ", "### The final answer is: blue", None, variant="official") == 1.0
    # an empty final-answer line on both sides compares equal, as in the authors' code
    assert accuracy_reward("### The final answer is:", "### The final answer is:", None,
                           variant="official") == 1.0
    assert accuracy_reward("### The final answer is:", "### The final answer is:", None) == 0.0


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="variant"):
        accuracy_reward("x", "y", None, variant="nope")


def test_accuracy_reward_off_the_main_thread_uses_the_sandbox():
    out = {}

    def run():
        out["ok"] = accuracy_reward(make(answer="7.0"), SOL, KS)
        out["wrong"] = accuracy_reward(make(answer="eight"), SOL, KS, variant="official")

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert out == {"ok": pytest.approx(1.1), "wrong": pytest.approx(1.1)}


# ---------------------------------------------------------------- StepRVR

def test_validity_complete_and_logical():
    assert validity_reward(SOL) == 1.0
    assert validity_reward(make(steps=("only one",))) == 1.0
    assert validity_reward(make(tail="\n")) == 1.0


@pytest.mark.parametrize("missing", ["### Image Description:", "### Rationales:", "### Step 1:",
                                     "### The final answer is:"])
def test_validity_incomplete(missing):
    assert validity_reward(SOL.replace(missing, "###")) == 0.0


def test_validity_lets_think_header_is_not_required():
    assert validity_reward(SOL.replace("### Let's think step by step.", "")) == 1.0


def test_validity_final_answer_before_last_step_is_illogical():
    c = make(steps=("a", "b"), answer=None)
    c = c.replace("### Step 2:", "### The final answer is: 7\n### Step 2:")
    assert validity_reward(c) == 0.0


def test_validity_ending_with_bare_final_header_skips_the_order_check():
    # the text ends with the header: the position check is skipped (authors' rule), numbering still checked
    c = "### Image Description:\n### Rationales:\n### The final answer is: 1\n### Step 1:\nx\n### The final answer is:"
    assert validity_reward(c) == 1.0
    assert validity_reward(c + "  \n") == 1.0


def test_validity_first_final_header_counts():
    c = "### Image Description:\n### Rationales:\n### The final answer is: 1\n### Step 1:\nx\n### The final answer is: 2"
    assert validity_reward(c) == 0.0


@pytest.mark.parametrize("numbers,ok", [
    ((1, 2, 3), True),
    ((1, 3), False),
    ((2, 1), False),
    ((1, 1), False),
    ((1, 2, 2), False),
])
def test_validity_step_numbers_in_order(numbers, ok):
    c = make(steps=())
    body = "".join(f"### Step {n}:\nx\n" for n in numbers)
    c = c.replace("### The final answer is:", body + "### The final answer is:")
    assert validity_reward(c) == (1.0 if ok else 0.0)


def test_validity_leading_zero_and_huge_step_numbers():
    c = make(steps=("a", "b")).replace("### Step 2:", "### Step 02:")
    assert validity_reward(c) == 1.0  # int("02") == 2, as in the authors' code
    huge = make(steps=("a", "b")).replace("### Step 2:", "### Step " + "9" * 5000 + ":")
    assert validity_reward(huge) == 0.0


# ---------------------------------------------------------------- never raise

@pytest.mark.parametrize("bad", [
    "", "\x00", "\ud800 lone surrogate", b"\xff\xfe bytes", None, 12345, "(((((" * 1000, "[" * 10000,
    "### Step 1:" * 2000, "\\frac{" * 300, "$" * 5000, "### The final answer is: " + "9^" * 2000 + "9",
])
def test_never_raises_on_hostile_input(bad):
    for variant in ("paper", "official"):
        r = accuracy_reward(bad, SOL, KS, variant=variant, timeout_s=1.0)
        assert 0.0 <= r <= 1.1 + 1e-9
        r = accuracy_reward(SOL, bad, bad, variant=variant, timeout_s=1.0)
        assert 0.0 <= r <= 1.1 + 1e-9
    assert validity_reward(bad) in (0.0, 1.0)


def test_pathological_maths_times_out_instead_of_hanging():
    sol = "### The final answer is: 1"
    r = accuracy_details("### The final answer is: $2^{2^{2^{30}}}$", sol, None, timeout_s=0.5)
    assert r.reward == 0.0 and r.timed_out


def test_megabyte_completion():
    big = make(steps=("4 and 3 " * 100_000, "4 + 3 = 7"), answer="7")
    assert accuracy_reward(big, SOL, KS) == pytest.approx(1.1)
    assert validity_reward(big) == 1.0


def test_integer_fast_path_agrees_with_math_verify():
    from r1vl.rewards.core import _CANONICAL_INT
    from r1vl.rewards.verify import math_equal

    values = ["0", "1", "-1", "7", "10", "-10", "100", "999999999999", "999999999998", "123456", "-123456"]
    for a in values:
        assert _CANONICAL_INT.match(a)
        for b in values:
            if a != b:
                assert math_equal(a, b, 5.0) == (False, False), (a, b)
    for not_plain in ("007", "-0", "+7", "7.0", "1e3", "٣", "1000000000000"):
        assert not _CANONICAL_INT.match(not_plain)


def test_math_equal_compares_a_pair_of_lines_once(monkeypatch):
    """A group's completions often give one answer: math-verify compares (gold, answer) once,
    and the cached result is the computed one; a comparison that ran out of time is not kept."""
    from r1vl.rewards import verify

    calls = []
    real = verify._verify

    def counted(g, p):
        calls.append(1)
        return real(g, p)

    monkeypatch.setattr(verify, "_verify", counted)
    verify._equal_cache.clear()
    try:
        first = [verify.math_equal("\\frac{1}{2}", "0.5"), verify.math_equal("3", "4")]
        again = [verify.math_equal("\\frac{1}{2}", "0.5"), verify.math_equal("3", "4")]
        assert first == again == [(True, False), (False, False)] and len(calls) == 2
        monkeypatch.setattr(verify, "_run", lambda work, t: (False, True))  # a deadline
        assert verify.math_equal("7", "7") == (False, True)
        monkeypatch.undo()
        assert verify.math_equal("7", "7") == (True, False)  # computed, not the timed-out value

        def broken(g, p):
            raise RecursionError("math-verify failed once")

        monkeypatch.setattr(verify, "_verify", broken)
        assert verify.math_equal("8", "8.0") == (False, False)  # an error: scored wrong, not kept
        monkeypatch.undo()
        assert verify.math_equal("8", "8.0") == (True, False)
    finally:
        verify._equal_cache.clear()


def test_key_steps_match_across_unicode_composition():
    """Qwen2's tokenizer normalises to NFC: a key step written with a combining accent comes
    back composed in a completion that reproduces it, and still matches (and the other way)."""
    from r1vl.rewards import key_step_fraction

    decomposed, composed = "cafe\u0301 sells 12", "caf\u00e9 sells 12"
    for step, written in ((decomposed, composed), (composed, decomposed)):
        completion = f"### Step 1:\nThe {written} cups.\n### The final answer is: 12"
        assert key_step_fraction(completion, [[step]]) == 1.0
    assert key_step_fraction("### Step 1:\nThe cafe sells 12 cups.", [[decomposed]]) == 0.0

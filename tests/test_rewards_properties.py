"""Property tests (hypothesis): the rewards never raise, stay in range, and follow the rules on random input."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r1vl.data import extract_final_answer, smart_resize
from r1vl.data.format import FINAL_ANSWER
from r1vl.rewards import accuracy_reward, key_step_fraction, score_batch, validity_reward
from r1vl.rewards.core import accuracy_details

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any code point, lone surrogates included
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=300)
HEADERS = ["### Image Description:", "### Rationales:", "### Let's think step by step.", "### Step 1:",
           "### Step 2:", "### Step 3:", "### Step 10:", FINAL_ANSWER, "\n", " ", "=", "$", "\\frac{", "}"]
words = st.sampled_from(["7", "x", "4 + 3 = 7", "the cat", "-1", "\\sqrt{2}", "1/2", "(", "0.5", "", "\n"])
# text assembled from the format's own pieces, so that the structured branches are exercised
structured = st.lists(st.one_of(st.sampled_from(HEADERS), words, any_text.map(lambda s: s[:20])),
                      max_size=14).map("".join)


@st.composite
def skeletons(draw):
    """Near-valid R1-VL responses: the sections in order, then random damage."""
    filler = st.one_of(words, any_text.map(lambda t: t[:15]))
    n = draw(st.integers(0, 4))
    numbers = list(range(1, n + 1))
    if draw(st.integers(0, 3)) == 0:
        numbers = draw(st.lists(st.integers(0, 11), max_size=5))
    parts = []
    if draw(st.integers(0, 9)):
        parts.append("### Image Description:\n" + draw(filler))
    if draw(st.integers(0, 9)):
        parts.append("### Rationales:\n" + draw(filler))
    if draw(st.booleans()):
        parts.append("### Let's think step by step.")
    parts += [f"### Step {k}:\n" + draw(filler) for k in numbers]
    final = FINAL_ANSWER + draw(st.sampled_from(["", " ", " 7", "\n7", " x"]))
    if draw(st.integers(0, 3)):
        parts.append(final)
    elif draw(st.booleans()):  # somewhere earlier
        parts.insert(draw(st.integers(0, len(parts))), final)
    text = draw(st.sampled_from(["\n", " ", ""])).join(parts)
    return text + draw(st.sampled_from(["", "\n", "  ", "\nmore"]))


structured = st.one_of(structured, skeletons())
completions = st.one_of(any_text, structured)
key_steps = st.one_of(
    st.none(), any_text, st.lists(st.lists(any_text, max_size=3), max_size=4),
    st.lists(st.one_of(any_text, st.lists(words, max_size=3)), max_size=4).map(lambda g: {"Steps": g}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), st.integers())


@SETTINGS
@given(completions, completions, key_steps, st.sampled_from(["paper", "official"]),
       st.floats(min_value=0.0, max_value=1.0))
def test_accuracy_never_raises_and_stays_in_range(c, s, ks, variant, alpha):
    r = accuracy_reward(c, s, ks, alpha=alpha, variant=variant, timeout_s=0.5)
    assert 0.0 <= r <= 1.0 + alpha + 1e-9


@SETTINGS
@given(completions)
def test_validity_is_zero_or_one(c):
    assert validity_reward(c) in (0.0, 1.0)


def _validity_oracle(text: str) -> float:
    """StepRVR written independently, straight from the spec, with str.find instead of regexes."""
    required = ["### Image Description:", "### Rationales:", "### Step 1:", FINAL_ANSWER]
    if not all(r in text for r in required):
        return 0.0
    headers = []  # (start, end, number string) of every "### Step N:" with N ASCII/Unicode digits
    i = 0
    while True:
        i = text.find("### Step ", i)
        if i < 0:
            break
        j = i + len("### Step ")
        k = j
        while k < len(text) and text[k].isdecimal():
            k += 1
        if k > j and k < len(text) and text[k] == ":":
            headers.append((i, k + 1, text[j:k]))
            i = k + 1
        else:
            i += 1
    if not text.strip().endswith(FINAL_ANSWER) and text.find(FINAL_ANSWER) < headers[-1][1]:
        return 0.0
    numbers = [int(n) if len(n) <= 12 else -1 for _, _, n in headers]
    return 1.0 if numbers == list(range(1, len(numbers) + 1)) else 0.0


@SETTINGS
@given(structured)
def test_validity_matches_an_independent_oracle(c):
    assert validity_reward(c) == _validity_oracle(c)


@SETTINGS
@given(completions, key_steps)
def test_key_step_fraction_in_unit_interval(c, ks):
    assert 0.0 <= key_step_fraction(c, ks) <= 1.0


@SETTINGS
@given(st.lists(st.text(alphabet="abc xyz=+1", min_size=1, max_size=12), min_size=1, max_size=4))
def test_phrases_taken_from_the_steps_always_match(phrases):
    c = "### Image Description:\nd\n### Rationales:\nr\n" + "".join(
        f"### Step {i}:\n{p}\n" for i, p in enumerate(phrases, start=1)) + "### The final answer is: 1"
    groups = [[p.strip().upper()] for p in phrases if p.strip()]  # case does not matter
    if groups:
        assert key_step_fraction(c, groups) == 1.0
        assert accuracy_reward(c, "### The final answer is: 1", groups) == pytest.approx(1.1)


@SETTINGS
@given(st.text(max_size=40).filter(lambda s: FINAL_ANSWER not in s),
       st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=30), st.text(max_size=40))
def test_extract_final_answer_reads_the_first_line_after_the_header(prefix, answer, rest):
    text = f"{prefix}{FINAL_ANSWER} {answer}\n{rest}"
    got = extract_final_answer(text)
    if answer.strip():
        assert got == answer.strip()
    else:  # nothing on the header line: the answer is the next non-blank line, if any
        assert got is None or got == got.strip() and got in rest


@SETTINGS
@given(completions, completions, key_steps)
def test_paper_variant_zero_without_answer_and_alpha_k_when_wrong(c, s, ks):
    d = accuracy_details(c, s, ks, timeout_s=0.5)
    if extract_final_answer(c) is None:
        assert d.reward == 0.0
    else:
        expected = (1.0 if d.correct else 0.0) + 0.1 * d.key_step_fraction
        assert d.reward == pytest.approx(expected)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(completions, completions, key_steps), min_size=1, max_size=8),
       st.sampled_from(["paper", "official"]), st.sampled_from([0, 2]))
def test_score_batch_equals_per_item(items, variant, workers):
    cs, ss, kss = map(list, zip(*items))
    res = score_batch(cs, ss, kss, workers=workers, variant=variant, timeout_s=0.5)
    for i, (c, s, k) in enumerate(items):
        d = accuracy_details(c, s, k, variant=variant, timeout_s=0.5)
        if not d.timed_out and not res["timed_out"][i]:
            assert res["accuracy"][i] == pytest.approx(d.reward)
        assert res["validity"][i] == validity_reward(c)
        assert res["total"][i] == pytest.approx(res["accuracy"][i] + res["validity"][i])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 200_000), st.integers(0, 2_000_000))
def test_smart_resize_bounds(h, w, mn, extra):
    mx = mn + extra
    try:
        gh, gw = smart_resize(h, w, min_pixels=mn, max_pixels=mx)
    except ValueError:
        assert max(h, w) / min(h, w) > 200 or mx // 784 < max(1, -(-mn // 784))
        return
    assert gh % 28 == 0 and gw % 28 == 0 and mn <= gh * gw <= mx

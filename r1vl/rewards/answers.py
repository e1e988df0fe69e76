"""How StepRAR's paper variant reads a final-answer line before comparing it with the reference's.

math-verify reads a line without math delimiters as plain text and keeps only a number of it:
`2\\sqrt{3}` reads 2 (so "2" and "2\\sqrt{5}" would be right), `\\dfrac{3}{4}` reads nothing,
`(-3)` nothing and `- 3` reads 3; a letter or yes/no answer reads nothing, so "A." against "A"
would be wrong. Here, in order:

1. `clean`: NFKC (full-width digits, ligatures), U+2212 minus as "-", markdown bold dropped.
2. A reference that is one choice letter ("A", "(B)", "C.") is matched by the letter the
   completion starts with ("(A)", "A.", "A) 12", "Option A", "The answer is A", "$A$",
   "\\text{A}", "\\boxed{A}", "a"), not a leading article ("A triangle"); a yes/no reference by the
   completion's first word, after such a lead-in ("Answer: no").
3. Otherwise math-verify compares them, each line read as LaTeX (`latex_form`: wrapped in
   `$...$`) when it carries mathematics -- a backslash, ^, _, =, +, -, *, /, parentheses,
   brackets, braces, a comma and a space ("2, 3": a list; "2,5" is a decimal comma), three
   numbers or more joined by commas that are no thousands groups ("1,2,3", not "1,250,000")
   or a ratio "2:3" -- and, once leading words ("The area is") and trailing units ("cm",
   "square units") are set aside, no other word, and is at most 500 characters long; as plain
   text otherwise ("12 cm", "50%", "12 or 13"; as plain text, math-verify reads "[1, 3]" as 3
   and "[1,3]" as nothing, so "[0, 3]" was right and "[1,3]" wrong against "[1, 3]"). A ratio
   or a time of day ("2:3", "3:45") must be written the same on both sides (`colon_groups`):
   math-verify reads "2:3" as 2, so "2:5" or "2" against "2:3" were right.

`r1vl.data.format.answer_line` (the final answer the rewards compare) also reads an answer given in display maths on the lines after the header
(`$$ ... $$`, `\\[ ... \\]`), where the header's own line holds only the opening delimiter.
"""
from __future__ import annotations

import re
import unicodedata

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm)\s*\{([^{}]*)\}(?:\^\{?\d\}?)?")
_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_CHOICE_GOLD = re.compile(r"\(?([A-Z])\)?\Z")
_CHOICE_LEAD = re.compile(r"(?:the\s+)?(?:correct\s+|final\s+|right\s+)?(?:answer|option|choice)\s*(?:is\s*)?[:：]?\s*",
                          re.IGNORECASE)
# a completion's choice letter: bracketed "(a)" / "[B]", an upper-case letter with its
# punctuation "B." / "B)" / "B:", "b)", or a lone letter; not a leading article ("A triangle")
_CHOICE_PRED = (re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]"), re.compile(r"([A-Z])\s*[.):](?!\w)"),
                # possessive: two backtracking \s* split a long whitespace run every way (quadratic:
                # 28 s at 64k spaces before a non-space, outside any reward deadline)
                re.compile(r"([a-z])\)"), re.compile(r"([A-Za-z])\s*+\.?\s*+\Z"))
_YES_NO = ("yes", "no")
_FIRST_WORD = re.compile(r"[A-Za-z]+")

_DELIMITED = ("$", "\\(", "\\[", "\\boxed")
# (a comma followed by a space lists values, "2, 3"; without one it may be a decimal comma, "2,5",
# or a thousands separator, "1,000", which math-verify reads as plain text; three or more numbers
# joined by commas that are not thousands groups are a list too, "1,2,3": _carries_maths)
_MATH_CHARS = re.compile(r"[\\^_=+\-*/(){}\[\]]|,\s")
_COMMA_RUN = re.compile(r"(?<![\d.,])\d+(?:,\d+){2,}(?![\d,])")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
# a ratio or a time of day, "2:3", "3:45", "1 : 2 : 4": math-verify reads it as its first number.
# Started only where a run of digits starts, possessive: linear in the line's length (a match tried
# from every digit of a 20,000-digit run took 28 s, outside any deadline)
_COLON_GROUP = re.compile(r"(?<!\d)\d++(?:\.\d++)?(?:\s*+:\s*+\d++(?:\.\d++)?)++")
_LEADING_WORDS = re.compile(r"(?:[A-Za-z]{2,}\s+)+(?=[-+(\[\d\\])")
_TRAILING_UNITS = re.compile(r"(?:\s*(?<![\\A-Za-z])[A-Za-z]{2,}(?:\^\{?\d\}?)?)+\Z")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_MAX_LATEX_CHARS = 500  # a longer line is no short expression: read as plain text (and no regex scan is quadratic)


def _carries_maths(s: str) -> bool:
    """A maths character, a ratio, or three numbers or more joined by commas that are no
    thousands groups ("1,2,3")."""
    return bool(_MATH_CHARS.search(s) or _COLON_GROUP.search(s)
                or any(not _THOUSANDS.fullmatch(m.group()) for m in _COMMA_RUN.finditer(s)))


def clean(answer: str) -> str:
    """NFKC, "−" (U+2212) as "-", markdown bold (** / __) dropped, stripped."""
    s = unicodedata.normalize("NFKC", answer).replace("\u2212", "-")
    return s.replace("**", "").replace("__", "").strip()


def _unwrapped(s: str) -> str:
    return _BOXED.sub(r"\1", _TEXT_MACRO.sub(r"\1", s)).replace("$", "").strip()


def gold_choice(gold: str) -> str | None:
    """The letter of a reference that is one choice letter ("A", "(B)", "C."), else None."""
    m = _CHOICE_GOLD.match(_unwrapped(gold).rstrip(".").strip())
    return m.group(1) if m else None


def pred_choice(pred: str) -> str | None:
    """The choice letter a completion's answer starts with, upper-cased, else None."""
    s = _unwrapped(pred)
    lead = _CHOICE_LEAD.match(s)
    if lead:
        s = s[lead.end():]
    for pattern in _CHOICE_PRED:
        m = pattern.match(s)
        if m:
            return m.group(1).upper()
    return None


def yes_no(answer: str) -> str | None:
    """"yes" / "no" when the answer's first word is one of them (any case), after a lead-in such as
    "Answer:" or "The answer is" (as for choice letters), else None."""
    s = _unwrapped(answer)
    lead = _CHOICE_LEAD.match(s)
    m = _FIRST_WORD.match(s[lead.end():] if lead else s)
    word = m.group(0).lower() if m else ""
    return word if word in _YES_NO else None


def colon_groups(answer: str) -> list[str]:
    """The ratios / times of day in an answer line, spaces dropped ("2 : 3" -> "2:3"), in order."""
    return [re.sub(r"\s+", "", m.group()) for m in _COLON_GROUP.finditer(answer)]


def unspaced_colons(answer: str) -> str:
    """The answer line with its ratios / times written without spaces (math-verify reads "2:3" as
    2 but "2 : 3" as 3)."""
    return _COLON_GROUP.sub(lambda m: re.sub(r"\s+", "", m.group()), answer)


def latex_form(answer: str) -> str | None:
    """The answer wrapped in `$...$` for math-verify to read as LaTeX, or None when it should be
    read as plain text (see the module docstring)."""
    s = answer.strip()
    if len(s) > _MAX_LATEX_CHARS or any(d in s for d in _DELIMITED) or not _carries_maths(s):
        return None
    s = _TEXT_MACRO.sub(" ", s)  # "\\text{ cm}": units, as math-verify would drop them
    lead = _LEADING_WORDS.match(s)
    if lead:
        s = s[lead.end():]
    s = _TRAILING_UNITS.sub("", s.rstrip(" .")).rstrip(" .")
    if not s or _WORD.search(s) or not _carries_maths(s):
        return None
    return "$" + re.sub(r"(?<!\\)%", r"\\%", s) + "$"

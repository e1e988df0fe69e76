"""Derive StepRAR key steps from reference solutions, by rules (the authors used GPT-4 offline).

    python -m r1vl.data.keysteps IN OUT [--overwrite] [--force] [--max-steps 5]

For every row without key steps (all rows with --overwrite), the `### Step N:`
sections of the row's `solution` are read clause by clause and three kinds of
key step are collected, in order:

* equations -- a maximal run of mathematical tokens (numbers, operators,
  single-letter variables, point names such as "AB" or "∠ABC", sqrt/frac/pi and
  LaTeX commands, a unit or a coefficient's letters after a number: "8 cm",
  "4ac") that contains "=" and a digit after it, e.g. "4 + 3 = 7" or
  "3^2 + 4^2 = 9 + 16 = 25" (a chain also offers its last link, "9 + 16 = 25",
  as an alternative). A line that starts with "=" continues the line before
  it; ", " outside brackets, or "," before a letter, separates two equations
  ("x = 3, y = 4", "x=3,y=4"). A bare
  number before "=" takes the word before it as its name ("angle 2 = 65°");
  when that word is not a name ("5% of 200 = 10") the number is not read whole
  and that side is dropped. Runs with unbalanced brackets, and equations whose
  sides are all bare numbers ("2 = 2"), are not key steps;
* named quantities -- "<name> is/are/was/were/equals/reaches/measures <value>",
  e.g. "the green bar reaches 4" -> "green bar reaches 4", "green bar is 4",
  "green bar = 4", ... The name is its last three words without leading
  articles and connectives ("the value for 2019"); a name made only of
  pronouns and fillers ("there are 4", "it is 12 cm", "both are 90°", "the
  answer is 7") or without a letter is not a key step;
* labelled results -- "<name>: <value>", e.g. "red shapes: 3".

A value is read whole or not at all: a sign, thousands separators, decimals,
a fraction "a/b" or "\\frac{a}{b}", a ratio "a:b", then a unit, "°" or "%"
("1,250,000", "-1/2", "2:3", "40 cm²"). A value that goes on ("3/4" cut at
"/", "8 cm × 5 cm", "4th", "5!", "5 m 20 cm", "3.5 million", "3:45 pm") makes no
key step rather than a truncated one.

Each key step becomes one group of equivalent phrasings: its spelling as
written in the reference (so a completion that copies the reference gets
k = 1), operators spaced and unspaced ("4 + 3 = 7", "4+3=7"), ASCII and Unicode
minus, products as "×", "*", "\\times", "x" or "·" (whichever was written),
division as "÷", "/" or "\\div" ("/" itself is kept: it is also a fraction
bar); "<=", ">=", "==" and "**" (a power, never a product) are one sign each, so that a
comparison makes no key step, as "≤" and "≥" do not. StepRAR lowercases both sides, so case needs no variant. A group holds
at most MAX_PHRASINGS phrasings; the spelling as written and the last link
(the whole equation unless it is a chain) spaced, unspaced and as written are
always kept, then its other spellings come first: a completion that writes a
whole chain writes its last link too. When a
solution yields more than --max-steps (at least 1) key steps, the last ones
(closest to the answer) are kept.

A row is without key steps when its `key_steps` is missing or reads as none
to the loader (`r1vl.data.loader.normalize_key_steps` gives []: null, "", [],
{"Steps": []}, {"Steps": null}, or a JSON string holding one of those, "null"
included); a value the loader rejects ({"steps": ...}, {"Steps": [[]]}) is an
error naming the row unless --overwrite replaces it. Other fields and rows
that have key steps are copied unchanged, except image paths: when OUT is in
another directory than IN, a relative `image_path` (or an `image` column that
is a relative path, or the path of an image struct without bytes) is
rewritten relative to OUT's directory (os.path.relpath of the resolved path),
so that load_dataset(OUT) finds the same images.

IN is read as the loader reads it: UTF-8 (a leading byte-order mark is
skipped), JSON Lines with rows numbered by line from 1, or, for a .json file
that starts with "[", a JSON array with rows numbered from 0. OUT is written
as a JSON array (one row per line) when it ends in .json, as JSON Lines
otherwise. Errors are one line naming the file and, where there is one, the
row. An existing OUT is refused unless --force is given; OUT may never be IN.
OUT is written to a temporary file beside it, then renamed: an error leaves it
as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from r1vl.data.format import step_sections
from r1vl.data.loader import normalize_key_steps
from r1vl.files import write_replace

DEFAULT_MAX_STEPS = 5
MAX_PHRASINGS = 8

_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "frac", "cdot", "times", "div", "circ",
              "left", "right", "mod"}
# two-character signs are one token ("!=" is not one: "4!=24" is a factorial, and "x != 3" a clause end)
_OPERATORS = set("+-−×*·/÷^=<>≤≥±≈≠") | {"<=", ">=", "==", "**"}
_LATEX_OPERATORS = {"\\times": "×", "\\cdot": "·", "\\div": "÷", "\\pm": "±"}
_SYMBOLS = set("()[]{}√π°%'.,∠△⊥∥²³")
_UNIT_WORDS = {"cm", "mm", "km", "kg", "mg", "ml", "min"}  # after a number, part of an equation
_ORDINALS = {"st", "nd", "rd", "th"}
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"  # 1,250,000 / 3.5 / 12
_TOKEN = re.compile(r"\\[A-Za-z]+|\d+(?::\d+)+|" + _NUM + r"|[A-Za-z]+|<=|>=|==|\*\*|\S")
# a clause ends at . ; ? ! and a new line (not "5!", a factorial; not a line that goes on with "=")
_CLAUSE_SPLIT = re.compile(r"(?<!\d)[.;!?](?!\d)|[.;?](?=\s|$)|(?<![\d)])!(?=\s|$)|\n(?!\s*[=<>≤≥])|,\s+(?=[A-Za-z]{2,})"
                           r"|\b(?:so|thus|therefore|hence|then)\b", re.IGNORECASE)
# a value, read whole (atomic: no shorter reading is tried) and not followed by more of a number or an expression
_UNIT = r"(?:cm|mm|km|kg|m|g|units?|degrees?)(?:²|³|\^[23])?(?:/(?:s|h))?(?![A-Za-z])"
_VALUE = (r"[-−]?(?:\\[dt]?frac\{[-−]?(?:" + _NUM + r")\}\{(?:" + _NUM + r")\}"
          r"|(?:" + _NUM + r")(?:\s?/\s?(?:" + _NUM + r")|(?::(?:" + _NUM + r"))+)?)"
          r"(?:\s?" + _UNIT + r"|°(?:[CF](?![A-Za-z]))?|%)?")
# after a value, what makes it go on: a factorial "5!", another number "5 m 20 cm", a scale or a
# time of day "3.5 million", "3:45 pm"
_GOES_ON = (r"!|\s+[-−]?\d|\s+(?:thousand|million|billion|trillion|hundred|dozen|[ap]\.?m\b\.?)(?![A-Za-z])")
_NUMBER = (r"(?>" + _VALUE + r")(?![\w.,:/]?\d|[A-Za-z_²³]|\s*[-−+×*/÷^=·<>≤≥]"
           r"|\s*,\s*[-−]?\d|\s+(?:and|or|to)\s+[-−]?\d|" + _GOES_ON + ")")  # nor by more values: "3, 4 and 5"
# after an equation, a bare number that makes its last value one of several: "x = 2 or 3"
_GOES_ON_AFTER = re.compile(_GOES_ON, re.IGNORECASE)  # after an equation's last value
_MORE_VALUES = re.compile(r"\s*(?:,|\s(?:and|or|to)\s)\s*[-−]?\d[\d.,/:]*\s*(?:°|%|[A-Za-z]+)?\s*"
                          r"(?:[.;,)!?]|\band\b|\bor\b|$)")
_NAME = r"(?<![\w'])(?P<name>(?:(?:[A-Za-z][A-Za-z0-9']*|\d+)\s+){0,3}[A-Za-z0-9][A-Za-z0-9']*)"
_VERBS = ("is", "are", "equals", "was", "were", "reaches", "measures")
_NAMED = re.compile(_NAME + r"\s+(?P<verb>" + "|".join(_VERBS) + r")\s+\$?(?P<value>" + _NUMBER + ")")
# (not a name that ends in a number before the colon and a number after it: a ratio, "the ratio
# 2:3 holds", "2 : 3", is no label "ratio 2" of value 3, nor is "Step 2: 3 apples" one "Step 2")
_LABELLED = re.compile(_NAME + r"(?!(?<=\d)\s*:\s*\$?[-−]?\d)\s*:\s*\$?(?P<value>" + _NUMBER + ")")
_LEADING_WORDS = {"the", "a", "an", "so", "thus", "therefore", "hence", "then", "and", "of", "count", "we",
                  "get", "find", "that", "this", "which", "its", "their", "at", "in", "on", "for", "to", "by",
                  "with", "from", "since", "because", "now", "also", "but", "or", "if", "when"}
# words that name nothing: a name made only of these (and leading words) makes no key step
_FILLERS = {"it", "they", "them", "there", "here", "these", "those", "both", "each", "every", "all", "one",
            "ones", "what", "who", "he", "she", "you", "i", "it's", "some", "any", "none", "either", "neither",
            "answer", "result", "remains", "other", "others", "another", "such", "same", "thing", "things",
            "everything", "something", "only", "just", "value"} | _LEADING_WORDS
# words before a bare number that do not name it ("5% of 200 = 10")
_NOT_NAMES = {"is", "are", "was", "were", "be", "gives", "give", "get", "gets", "got", "have", "has", "had",
              "makes", "make", "yields", "leaves", "equals", "plus", "minus", "times", "over", "into", "per",
              "than", "as", "where", "while", "not", "add", "subtract", "multiply", "divide"} | _FILLERS


class _Op(str):
    """An "x" read as a product sign ("3 x 4"), not as a variable."""


_PRODUCTS = {"×", "*", "·", "\\times", "\\cdot"}
_DIVISIONS = {"÷", "\\div"}
# sign styles of the phrasings, most useful first: (product, division, minus); None keeps what was written
_STYLES = ((None, None, "-"), ("×", "÷", "-"), ("*", "/", "-"), ("\\times", "\\div", "-"), (_Op("x"), "/", "-"),
           ("·", "÷", "-"), (None, None, "−"), ("×", "÷", "−"))


def _is_math(tok: str) -> bool:
    if tok[0].isdigit() or tok in _OPERATORS or tok in _SYMBOLS:
        return True
    if tok.startswith("\\"):
        return True
    if tok.isalpha():
        return len(tok) == 1 or tok.lower() in _FUNCTIONS or (tok.isupper() and len(tok) <= 3)  # AB, ABC
    return False


def _mark_products(tokens: list[str]) -> list[str]:
    """The tokens with an "x" between two numbers ("3 x 4", "3x4") marked as a product sign."""
    out = list(tokens)
    for i in range(1, len(tokens) - 1):
        if tokens[i] in ("x", "X") and tokens[i - 1][-1] in "0123456789)°%" and tokens[i + 1][0].isdigit():
            out[i] = _Op(tokens[i])
    return out


def _spaced(tokens: list[str]) -> str:
    out: list[str] = []
    prev = None
    for tok in tokens:
        unary = tok in "-−±" and (prev is None or prev in _OPERATORS or prev in "([{" or prev in _LATEX_OPERATORS
                                   or isinstance(prev, _Op))
        if isinstance(tok, _Op) or (tok in _OPERATORS and not unary and tok != "^") or tok in _LATEX_OPERATORS:
            out.append(f" {tok} ")
        elif (prev is not None and prev[-1].isalnum() and tok[0].isalnum() and tok not in "²³"
              and not (prev[0].isdigit() and tok.isalpha() and tok.lower() not in _UNIT_WORDS)):
            out.append(" " + tok)
        else:
            out.append(tok)
        prev = tok
    return re.sub(r"\s+", " ", "".join(out)).strip()


def _compact(tokens: list[str]) -> str:
    out: list[str] = []
    prev = None
    for tok in tokens:
        if prev is not None and prev[-1].isalpha() and tok[0].isalnum() and tok not in "²³" and type(prev) is str:
            out.append(" " + tok)  # "sqrt 25", "\\pi r": keep words apart (not "3x4", "cm²")
        else:
            out.append(tok)
        prev = tok
    return "".join(out)


def _restyled(tokens: list[str]) -> list[list[str]]:
    """The tokens in each sign style of _STYLES (product, division and minus signs replaced)."""
    out = []
    for product, division, minus in _STYLES:
        alt = []
        for tok in tokens:
            if product is not None and (tok in _PRODUCTS or isinstance(tok, _Op)):
                tok = product
            elif division is not None and tok in _DIVISIONS:
                tok = division
            elif tok in ("-", "−"):
                tok = minus
            alt.append(tok)
        out.append(alt)
    return out


def _bare_number(side: list[str]) -> bool:
    core = [t for t in side if t not in ("°", "%")]
    return len(core) == 1 and core[0][0].isdigit()


def _sides(tokens: list[str]) -> list[list[str]]:
    sides: list[list[str]] = [[]]
    for tok in tokens:
        if tok == "=":
            sides.append([])
        else:
            sides[-1].append(tok)
    return sides


def _trivial(tokens: list[str]) -> bool:
    """An equation of bare numbers ("2 = 2", "200 = 10"): no context, never a key step."""
    return all(_bare_number(s) for s in _sides(tokens))


def _unique(items) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
    return out


def phrasings(text: str) -> list[str]:
    """Equivalent spellings of one equation (see the module docstring), at most MAX_PHRASINGS.

    `text` as written and its last link (the whole equation unless it is a chain)
    spaced, unspaced and as written are always kept; the last link's sign
    variants come next (any completion that writes a whole chain writes its last
    link too), then the whole chain's other spellings."""
    spans = [(m.group(), m.start()) for m in _TOKEN.finditer(text)]
    tokens = _mark_products([t for t, _ in spans])
    parts = [(tokens, text.strip())]  # (tokens, as written)
    eqs = [i for i, t in enumerate(tokens) if t == "="]
    if len(eqs) >= 2 and eqs[-2] + 1 < len(tokens) and not _trivial(tokens[eqs[-2] + 1:]):
        parts.append((tokens[eqs[-2] + 1:], text[spans[eqs[-2] + 1][1]:].strip()))
    forms = []  # per part: spaced, unspaced, as written, spaced and unspaced in each sign style
    for toks, written in parts:
        styled = _restyled(toks)
        forms.append((_spaced(toks), _compact(toks), written, [_spaced(s) for s in styled],
                      [_compact(s) for s in styled]))
    (spaced, compact, written, spaced_styles, compact_styles), last = forms[0], forms[-1]
    required = [written, last[0], last[1], last[2]]
    extra = last[3] + last[4] + [spaced, compact] + spaced_styles + compact_styles
    display = [p for f in forms for p in [f[0], *f[3], f[1], *f[4], f[2]]]
    keep = _unique(required)
    keep += [p for p in _unique(extra) if p not in keep][:max(0, MAX_PHRASINGS - len(keep))]
    return [p for p in _unique(display) if p in keep]


def _balanced(tokens: list[str]) -> bool:
    stack = []
    for tok in tokens:
        if tok in "([{":
            stack.append(")]}"["([{".index(tok)])
        elif tok in ")]}":
            if not stack or stack.pop() != tok:
                return False
    return not stack


def _math_at(toks: list[tuple[str, int, int]], i: int) -> bool:
    tok, start, _ = toks[i]
    if _is_math(tok):
        return True
    if tok.isalpha() and i > 0 and toks[i - 1][0][-1].isdigit():  # a unit, or a coefficient's letters ("4ac")
        return tok.lower() in _UNIT_WORDS or (toks[i - 1][2] == start and tok.lower() not in _ORDINALS)
    return False


def _equation(clause: str, toks: list[tuple[str, int, int]], lo: int, hi: int) -> list[str]:
    """The phrasings of the equation in toks[lo:hi], or [] when it is not a key step."""
    def words():
        return [t for t, _, _ in toks[lo:hi]]

    # trim punctuation and dangling operators at the ends of the run
    while hi > lo and (toks[hi - 1][0] in ".,:'" or toks[hi - 1][0] in _OPERATORS):
        hi -= 1
    while lo < hi and toks[lo][0] in ".,:'=":
        lo += 1
    w = words()
    if w and not _balanced(w):  # a bracket opened before the run or closed after it: "(so x = 4)"
        if w[0] in "([{" and _balanced(w[1:]):
            lo += 1
        elif w[-1] in ")]}" and _balanced(w[:-1]):
            hi -= 1
    elif len(w) > 2 and w[0] + w[-1] in ("()", "[]") and _balanced(w[1:-1]):  # "(x = 4)"
        lo, hi = lo + 1, hi - 1
    w = words()
    if "=" not in w or not _balanced(w):
        return []
    if hi < len(toks) and toks[hi][1] == toks[hi - 1][2] and toks[hi][0][0].isalnum():
        return []  # the last value goes on ("x = 4th")
    if _MORE_VALUES.match(clause, toks[hi - 1][2]):
        return []  # "x = 2 or 3": one of several values
    if _GOES_ON_AFTER.match(clause, toks[hi - 1][2]):
        return []  # "n = 5!", "n = 3.5 million": the value goes on
    first = w.index("=")
    if _bare_number(w[:first]) and lo > 0:  # "angle 2 = 65°": the bare number is a name's
        word, _, end = toks[lo - 1]
        if word.isalpha() and not clause[end:toks[lo][1]].strip():
            if word.lower() in _NOT_NAMES:  # "5% of 200 = 10": not read whole; drop that side
                lo += first + 1
            else:
                lo -= 1
    w = words()
    if "=" not in w or not any(t[0].isdigit() for t in w[w.index("=") + 1:]) or _trivial(w):
        return []
    return phrasings(clause[toks[lo][1]:toks[hi - 1][2]])


def _equations(clause: str) -> list[list[str]]:
    toks = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(clause)]
    groups = []
    lo = 0
    for i in range(len(toks) + 1):
        if i < len(toks) and _math_at(toks, i):
            tok, _, end = toks[i]
            depth = sum((t[0] in "([{") - (t[0] in ")]}") for t in toks[lo:i])
            # "x = 3, y = 4" and "x=3,y=4": two (a comma inside brackets or a number, "1,250", is not)
            if not (tok == "," and depth == 0 and (clause[end:end + 1].isspace()
                                                   or (i + 1 < len(toks) and toks[i + 1][0][0].isalpha()))):
                continue
        if i > lo:
            g = _equation(clause, toks, lo, i)
            if g:
                groups.append(g)
        lo = i + 1
    return groups


def _name_start(clause: str, m: re.Match) -> int | None:
    """Where the name of a named-quantity match starts once cut to its last three words without
    leading words; None when it names nothing (only pronouns and fillers, or no letter)."""
    spans = [(w.group(), w.start()) for w in re.finditer(r"\S+", m.group("name"))]
    verbs = [i for i, (w, _) in enumerate(spans) if w.lower() in _VERBS]
    spans = spans[verbs[-1] + 1 if verbs else 0:][-3:]  # "... girls is 2: 3" names nothing
    while spans and spans[0][0].lower() in _LEADING_WORDS:
        spans = spans[1:]
    names = [w.lower() for w, _ in spans]
    if not any(w[0].isalpha() for w in names) or all(w in _FILLERS for w in names):
        return None
    return m.start("name") + spans[0][1]


def _named(clause: str) -> list[list[str]]:
    groups = []
    for pattern in (_NAMED, _LABELLED):
        for m in pattern.finditer(clause):
            start = _name_start(clause, m)
            if start is None:
                continue
            name, value = " ".join(clause[start:m.end("name")].split()), m.group("value").strip()
            written = clause[start:m.end("value")]
            if pattern is _NAMED:
                alts = [written, f"{name} {m.group('verb')} {value}", f"{name} is {value}", f"{name} = {value}",
                        f"{name}: {value}"]
            else:
                alts = [written, f"{name}: {value}", f"{name} is {value}", f"{name} = {value}"]
            groups.append(_dedupe_minus(alts))
    return groups


def _dedupe_minus(alts: list[str]) -> list[str]:
    return _unique(v for a in alts for v in (a, a.replace("−", "-")))[:MAX_PHRASINGS]


def derive_key_steps(solution: str, max_steps: int = DEFAULT_MAX_STEPS) -> list[list[str]]:
    """Key-step groups for a reference solution, from its Step sections (see the module docstring)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    groups: list[list[str]] = []
    for section in step_sections(solution):
        for clause in _CLAUSE_SPLIT.split(section):
            if not clause or not clause.strip():
                continue
            found = _equations(clause)
            if not found:
                found = _named(clause)
            for g in found:
                if g and g not in groups:
                    groups.append(g)
    return groups[-max_steps:]


def _has_key_steps(value) -> bool:
    """Whether a row's key_steps holds a key step, as the loader reads it (normalize_key_steps);
    ValueError (the loader's reason) for a value the loader rejects."""
    return bool(normalize_key_steps(value))


def _rebased(value, src_dir: Path, out_dir: Path):
    """A relative image path read from IN's directory, made relative to OUT's directory (os.path.relpath
    of the resolved path); anything else unchanged."""
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    target = (src_dir / value).resolve()
    try:
        return os.path.relpath(target, out_dir)
    except ValueError:  # another drive (Windows): no relative path
        return str(target)


def _rebase_images(row: dict, src_dir: Path, out_dir: Path) -> bool:
    """Rewrite the row's relative image paths for OUT's directory; whether any changed."""
    before = (row.get("image_path"), row.get("image"))
    if "image_path" in row:
        row["image_path"] = _rebased(row["image_path"], src_dir, out_dir)
    img = row.get("image")
    if isinstance(img, str):
        row["image"] = _rebased(img, src_dir, out_dir)
    elif isinstance(img, dict) and not img.get("bytes") and isinstance(img.get("path"), str):
        row["image"] = {**img, "path": _rebased(img["path"], src_dir, out_dir)}
    return (row.get("image_path"), row.get("image")) != before


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """IN's rows as (row number, parsed value), read and numbered by the loader's reader (a line
    at a time); ValueError naming the file (and row) for what the loader would not read."""
    from r1vl.data.loader import _jsonl_rows

    if path.is_dir():
        raise ValueError(f"{path}: a directory; expected a .jsonl (or .json array) file")
    if not path.exists():
        raise ValueError(f"IN {path} does not exist")
    if path.suffix == ".parquet":
        raise ValueError(f"{path}: parquet input is not supported; convert it to JSON Lines first")
    rows = []
    for number, obj in _jsonl_rows(path):
        if isinstance(obj, Exception):  # (the loader would leave it out with data.skip_bad_rows=true)
            raise ValueError(f"{path}:{number}: {obj}")
        rows.append((number, obj))
    return rows


def _dumped(row: dict, where: str) -> str:
    text = json.dumps(row, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: a string holds a lone surrogate (U+{ord(e.object[e.start]):04X}), which "
                         "UTF-8 cannot encode; fix the row") from None
    return text


def _check_output(inp: Path, out: Path, force: bool) -> str:
    """Why OUT may not be written ("" when it may): it is IN, a directory, or exists without --force."""
    same = out.resolve() == inp.resolve()
    if not same and out.exists() and inp.exists():
        try:
            same = os.path.samefile(inp, out)  # hard links
        except OSError:
            pass
    if same:
        return f"OUT {out} is the input file {inp}: it would be destroyed while being read; pick another OUT"
    if out.is_dir():
        return f"OUT {out} is a directory; expected a file path (e.g. {out / inp.name})"
    if out.exists() and not force:
        return f"OUT {out} exists; pass --force to replace it"
    if not out.parent.is_dir():  # found before the rows are derived (the error named the temporary file)
        return f"OUT {out}: its folder {out.parent} does not exist"
    return ""


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


class _Progress:
    """A line on stderr every `every_s` seconds of a long conversion (260,000 rows took 9 minutes of
    CPU time, printing nothing until the end): rows done, their rate and the time left."""

    def __init__(self, total: int, every_s: float = 10.0):
        self.total, self.every_s, self.done = total, every_s, 0
        self.t0 = self.last = time.monotonic()

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.every_s and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"r1vl.data.keysteps: {self.done} of {self.total} rows ({100 * self.done / self.total:.0f}%), "
                  f"{rate:.0f} rows/s, about {(self.total - self.done) / rate / 60:.1f} min left", file=sys.stderr,
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r1vl.data.keysteps",
                                 description="Add rule-derived key_steps to an R1-VL JSON Lines (or .json array) file.")
    ap.add_argument("input", help="input .jsonl (or .json array)")
    ap.add_argument("output", help="output .jsonl, or .json for a JSON array (may not be the input)")
    ap.add_argument("--overwrite", action="store_true", help="re-derive key steps for rows that have them")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--max-steps", type=_at_least_one, default=DEFAULT_MAX_STEPS,
                    help="most key steps per row (at least 1)")
    args = ap.parse_args(argv)
    inp, out = Path(args.input), Path(args.output)
    problem = _check_output(inp, out, args.force)
    if problem:
        print(f"r1vl.data.keysteps: error: {problem}", file=sys.stderr)
        return 2
    counts = {"rows": 0, "derived": 0, "kept": 0, "none_found": 0, "rebased": 0}
    try:
        src_dir = Path(os.path.abspath(inp)).parent
        out_dir = Path(os.path.abspath(out)).parent.resolve()
        rebase = src_dir.resolve() != out_dir
        rows = _read_rows(inp)
        progress = _Progress(len(rows))

        def converted():  # each row's output line as it is derived (written as it comes, not held)
            for number, row in rows:
                where = f"{inp}:{number}"
                if not isinstance(row, dict):
                    raise ValueError(f"{where}: a row must be a JSON object")
                counts["rows"] += 1
                try:
                    has = not args.overwrite and _has_key_steps(row.get("key_steps"))
                except ValueError as e:
                    raise ValueError(f"{where}: malformed key_steps ({e}); fix it, or pass --overwrite to "
                                     "replace it") from None
                if has:
                    counts["kept"] += 1
                else:
                    solution = row.get("solution")
                    if not isinstance(solution, str):
                        raise ValueError(f"{where}: missing or non-string field 'solution'")
                    groups = derive_key_steps(solution, args.max_steps)
                    row["key_steps"] = {"Steps": groups}
                    counts["derived" if groups else "none_found"] += 1
                if rebase and _rebase_images(row, src_dir, out_dir):
                    counts["rebased"] += 1
                yield _dumped(row, where)
                progress.step()

        if out.suffix == ".json":  # "[\n" row ",\n" row ... "\n]\n", or "[]\n"
            def parts():
                n = 0
                for n, line in enumerate(converted(), start=1):
                    yield ("[\n" if n == 1 else ",\n") + line
                yield "\n]\n" if n else "[]\n"
        else:
            def parts():
                for line in converted():
                    yield line + "\n"
        write_replace(out, parts())
    except (OSError, ValueError) as e:
        print(f"r1vl.data.keysteps: error: {e}", file=sys.stderr)
        return 2
    print(f"{counts['rows']} rows: {counts['derived']} derived, {counts['kept']} kept, "
          f"{counts['none_found']} with no key step found (key_steps set to empty)")
    if counts["rebased"]:
        print(f"{counts['rebased']} rows' relative image paths rewritten for OUT's directory {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

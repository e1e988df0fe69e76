"""Derive StepRAR key steps from reference solutions, by rules (the authors used GPT-4 offline).

    python -m r1vl.data.keysteps IN.jsonl OUT.jsonl [--overwrite] [--force] [--max-steps 5]

For every row whose `key_steps` is missing or empty (all rows with
--overwrite), the `### Step N:` sections of the row's `solution` are read
clause by clause and three kinds of key step are collected, in order:

* equations -- a maximal run of mathematical tokens (numbers, operators,
  single-letter variables, sqrt/frac/pi and LaTeX commands) that contains "="
  and a digit, e.g. "4 + 3 = 7" or "3^2 + 4^2 = 9 + 16 = 25" (a chain also
  offers its last link, "9 + 16 = 25", as an alternative);
* named quantities -- "<name> is/are/equals/reaches <number>", e.g.
  "the green bar reaches 4" -> "green bar is 4", "green bar = 4", ...;
* labelled results -- "<name>: <number>", e.g. "red shapes: 3".

Each key step becomes one group of equivalent phrasings: operators spaced and
unspaced ("4 + 3 = 7", "4+3=7"), ASCII and Unicode minus, "*" and "x"/"×" for
products. StepRAR lowercases both sides, so case needs no variant. When a
solution yields more than --max-steps key steps, the last ones (closest to
the answer) are kept. Other fields and rows that already have key steps are
copied unchanged.

An existing OUT is refused unless --force is given; OUT may never be IN. OUT is
written to a temporary file beside it, then renamed: an error leaves it as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from r1vl.data.format import step_sections

DEFAULT_MAX_STEPS = 5
MAX_PHRASINGS = 8

_FUNCTIONS = {"sqrt", "sin", "cos", "tan", "log", "ln", "exp", "pi", "frac", "cdot", "times", "div", "circ",
              "left", "right", "mod"}
_OPERATORS = set("+-−×*·/÷^=<>≤≥")
_LATEX_OPERATORS = {"\\times": "×", "\\cdot": "·", "\\div": "÷", "\\pm": "±"}
_SYMBOLS = set("()[]{}√π°%'.,")
_TOKEN = re.compile(r"\\[A-Za-z]+|[A-Za-z]+|\d+(?:\.\d+)?|\S")
_CLAUSE_SPLIT = re.compile(r"(?<!\d)[.;!?](?!\d)|[.;!?](?=\s|$)|\n|,\s+(?=[A-Za-z]{2,})|\b(?:so|thus|therefore|hence|then)\b",
                           re.IGNORECASE)
_NUMBER = r"[-−]?\d+(?:\.\d+)?(?:\s?(?:°|%|cm|mm|km|kg|units?|degrees?)\b|°|%)?"
_NAMED = re.compile(
    r"(?P<name>(?:[A-Za-z][A-Za-z0-9']*\s+){0,3}[A-Za-z][A-Za-z0-9']*)\s+"
    r"(?P<verb>is|are|equals|was|reaches|measures)\s+(?P<value>" + _NUMBER + r")(?![\w.])")
_LABELLED = re.compile(r"(?P<name>(?:[A-Za-z][A-Za-z0-9']*\s+){0,3}[A-Za-z][A-Za-z0-9']*)\s*:\s*"
                       r"(?P<value>" + _NUMBER + r")(?![\w.])")
_LEADING_WORDS = {"the", "a", "an", "so", "thus", "therefore", "hence", "then", "and", "of", "count", "we",
                  "get", "find", "that", "this", "which", "its", "their"}


def _is_math(tok: str) -> bool:
    if tok[0].isdigit() or tok in _OPERATORS or tok in _SYMBOLS:
        return True
    if tok.startswith("\\"):
        return True
    if tok.isalpha():
        return len(tok) == 1 or tok.lower() in _FUNCTIONS
    return False


def _spaced(tokens: list[str]) -> str:
    out: list[str] = []
    prev = None
    for tok in tokens:
        unary = tok in "-−" and (prev is None or prev in _OPERATORS or prev in "([{")
        if (tok in _OPERATORS and not unary and tok != "^") or tok in _LATEX_OPERATORS:
            out.append(f" {tok} ")
        elif prev is not None and prev[-1].isalnum() and tok[0].isalnum() and not (prev[0].isdigit() and tok.isalpha()):
            out.append(" " + tok)
        else:
            out.append(tok)
        prev = tok
    return re.sub(r"\s+", " ", "".join(out)).strip()


def _compact(tokens: list[str]) -> str:
    out: list[str] = []
    prev = None
    for tok in tokens:
        if prev is not None and prev[-1].isalpha() and tok[0].isalnum():
            out.append(" " + tok)  # "sqrt 25", "\\pi r": keep words apart
        else:
            out.append(tok)
        prev = tok
    return "".join(out)


def phrasings(text: str) -> list[str]:
    """Equivalent spellings of one key step: spaced/unspaced operators, minus and product signs."""
    tokens = _TOKEN.findall(text)
    base = [_spaced(tokens), _compact(tokens)]
    if any(t in _LATEX_OPERATORS for t in tokens):  # also with \\times -> ×, \\cdot -> · ...
        plain = [_LATEX_OPERATORS.get(t, t) for t in tokens]
        base += [_spaced(plain), _compact(plain)]
    out: list[str] = []
    for b in base:
        for v in (b, b.replace("−", "-"), b.replace("-", "−"), b.replace("×", "*"), b.replace("*", "×"),
                  b.replace("*", "x"), b.replace("·", "*")):
            if v and v not in out:
                out.append(v)
    return out[:MAX_PHRASINGS]


def _strip_name(name: str) -> str:
    words = name.split()[-3:]  # "the measure of angle ABC" -> "angle ABC"
    while words and words[0].lower() in _LEADING_WORDS:
        words = words[1:]
    return " ".join(words)


def _equations(clause: str) -> list[list[str]]:
    tokens = _TOKEN.findall(clause)
    groups = []
    run: list[str] = []
    for tok in tokens + ["<end>"]:
        if tok != "<end>" and _is_math(tok):
            run.append(tok)
            continue
        # trim punctuation and dangling operators at the ends of the run
        while run and (run[-1] in ".,:'" or (run[-1] in _OPERATORS and run[-1] not in "%°")):
            run.pop()
        while run and run[0] in ".,:'=":
            run.pop(0)
        if "=" in run and any(t[0].isdigit() for t in run[run.index("=") + 1:]):
            sides = " ".join(run).split("=")
            if all(s.strip() for s in sides):
                alts = phrasings(" ".join(run))
                if len(sides) > 2:  # a chain: its last link is a key step on its own
                    last = _TOKEN.findall(sides[-2] + "=" + sides[-1])
                    alts += [p for p in phrasings(" ".join(last)) if p not in alts]
                groups.append(alts[:MAX_PHRASINGS])
        run = []
    return groups


def _named(clause: str) -> list[list[str]]:
    groups = []
    for m in _NAMED.finditer(clause):
        name, value = _strip_name(m.group("name")), m.group("value").strip()
        if not name or name.lower() in _LEADING_WORDS:
            continue
        alts = [f"{name} {m.group('verb')} {value}", f"{name} is {value}", f"{name} = {value}", f"{name}: {value}"]
        groups.append(_dedupe_minus(alts))
    for m in _LABELLED.finditer(clause):
        name, value = _strip_name(m.group("name")), m.group("value").strip()
        if not name:
            continue
        groups.append(_dedupe_minus([f"{name}: {value}", f"{name} is {value}", f"{name} = {value}"]))
    return groups


def _dedupe_minus(alts: list[str]) -> list[str]:
    out: list[str] = []
    for a in alts:
        for v in (a, a.replace("−", "-")):
            if v not in out:
                out.append(v)
    return out[:MAX_PHRASINGS]


def derive_key_steps(solution: str, max_steps: int = DEFAULT_MAX_STEPS) -> list[list[str]]:
    """Key-step groups for a reference solution, from its Step sections (see the module docstring)."""
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
    return groups[-max_steps:] if max_steps > 0 else groups


def _has_key_steps(value) -> bool:
    if value is None:
        return False
    if isinstance(value, dict):
        value = value.get("Steps")
    if isinstance(value, str):
        return bool(value.strip()) and value.strip() not in ("[]", '{"Steps": []}')
    return bool(value)


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
    return ""


def _write_replace(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (a failure
    leaves `path` as it was); a replaced file keeps its permissions."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r1vl.data.keysteps",
                                 description="Add rule-derived key_steps to an R1-VL JSON Lines file.")
    ap.add_argument("input", help="input .jsonl")
    ap.add_argument("output", help="output .jsonl (may not be the input)")
    ap.add_argument("--overwrite", action="store_true", help="re-derive key steps for rows that have them")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="most key steps per row")
    args = ap.parse_args(argv)
    problem = _check_output(Path(args.input), Path(args.output), args.force)
    if problem:
        print(f"r1vl.data.keysteps: error: {problem}", file=sys.stderr)
        return 2
    counts = {"rows": 0, "derived": 0, "kept": 0, "none_found": 0}
    try:
        with open(args.input, encoding="utf-8", newline="") as fin:
            lines = fin.read().split("\n")  # not splitlines(): JSON strings may hold U+2028
        out_lines = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.input}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{args.input}:{lineno}: a row must be a JSON object")
            counts["rows"] += 1
            if _has_key_steps(row.get("key_steps")) and not args.overwrite:
                counts["kept"] += 1
            else:
                solution = row.get("solution")
                if not isinstance(solution, str):
                    raise ValueError(f"{args.input}:{lineno}: missing or non-string field 'solution'")
                groups = derive_key_steps(solution, args.max_steps)
                row["key_steps"] = {"Steps": groups}
                counts["derived" if groups else "none_found"] += 1
            out_lines.append(json.dumps(row, ensure_ascii=False))
        _write_replace(Path(args.output), "\n".join(out_lines) + ("\n" if out_lines else ""))
    except (OSError, ValueError) as e:
        print(f"r1vl.data.keysteps: error: {e}", file=sys.stderr)
        return 2
    print(f"{counts['rows']} rows: {counts['derived']} derived, {counts['kept']} kept, "
          f"{counts['none_found']} with no key step found (key_steps set to empty)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rule-based key-step derivation (python -m r1vl.data.keysteps)."""
import json
import subprocess
import sys

import pytest

from r1vl.data.keysteps import derive_key_steps, main, phrasings
from r1vl.rewards import key_step_fraction


def sol(*steps, answer="1"):
    body = "".join(f"### Step {i}:\n{s}\n" for i, s in enumerate(steps, start=1))
    return f"### Image Description:\nA figure.\n### Rationales:\nWhy.\n{body}### The final answer is: {answer}"


def test_equation_with_spacing_variants():
    assert derive_key_steps(sol("Add them: 4 + 3 = 7.")) == [["4 + 3 = 7", "4+3=7"]]
    assert derive_key_steps(sol("4+3=7")) == [["4 + 3 = 7", "4+3=7"]]


def test_equation_chain_offers_its_last_link():
    (group,) = derive_key_steps(sol("3^2 + 4^2 = 9 + 16 = 25."))
    assert group[:2] == ["3^2 + 4^2 = 9 + 16 = 25", "3^2+4^2=9+16=25"]
    assert "9 + 16 = 25" in group and "9+16=25" in group


def test_unicode_minus_and_products():
    (g,) = derive_key_steps(sol("x = 10 − 4 = 6"))
    assert {"x = 10 − 4 = 6", "x = 10 - 4 = 6", "x=10-4=6"} <= set(g)
    (g,) = derive_key_steps(sol("6 × 8 = 48"))
    assert {"6 × 8 = 48", "6 * 8 = 48", "6*8=48"} <= set(g)
    (g,) = derive_key_steps(sol("x = -2.5"))
    assert g[:2] == ["x = -2.5", "x = −2.5"]  # a unary minus stays attached
    (g,) = derive_key_steps(sol("\\frac{1}{2} \\times 6 \\times 8 = 24"))
    assert "\\frac{1}{2} × 6 × 8 = 24" in g


def test_named_quantities_and_labelled_results():
    assert derive_key_steps(sol("The green bar reaches 4.")) == [
        ["green bar reaches 4", "green bar is 4", "green bar = 4", "green bar: 4"]]
    assert derive_key_steps(sol("Count the red shapes: 3.")) == [["red shapes: 3", "red shapes is 3", "red shapes = 3"]]
    assert derive_key_steps(sol("The measure of angle ABC is 40°.")) == [
        ["angle ABC is 40°", "angle ABC = 40°", "angle ABC: 40°"]]


def test_only_step_sections_are_read_and_order_and_limit():
    text = ("### Image Description:\n1 + 1 = 2\n### Rationales:\n2 + 2 = 4\n"
            "### Step 1:\na = 1\n### Step 2:\nb = a + 1 = 2, so c = 3\n### The final answer is: 3")
    assert [g[0] for g in derive_key_steps(text)] == ["a = 1", "b = a + 1 = 2", "c = 3"]
    assert [g[0] for g in derive_key_steps(text, max_steps=2)] == ["b = a + 1 = 2", "c = 3"]
    assert derive_key_steps("no steps at all") == []
    assert derive_key_steps(sol("Nothing numeric here.")) == []


def test_prose_words_do_not_leak_into_equations():
    (g,) = derive_key_steps(sol("So the total is 4 + 3 = 7 apples."))
    assert g[0] == "4 + 3 = 7"


def test_derived_key_steps_match_their_own_solution():
    for s in (sol("3^2 + 4^2 = 9 + 16 = 25.", "sqrt(25) = 5."), sol("The blue bar reaches 2."),
              sol("Let x be the width. Then 2x + 3 = 11, so x = 4.")):
        ks = derive_key_steps(s)
        assert ks and key_step_fraction(s, ks) == 1.0


def test_phrasings_are_unique_and_bounded():
    p = phrasings("a*b-c = 1")
    assert len(p) == len(set(p)) <= 8


def test_cli(tmp_path):
    rows = [
        {"problem": "Q1", "solution": sol("4 + 3 = 7", answer="7"), "image_path": "a.png"},
        {"problem": "Q2", "solution": sol("x = 2"), "key_steps": {"Steps": [["keep me"]]}},
        {"problem": "Q3", "solution": sol("No maths."), "key_steps": []},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = subprocess.run([sys.executable, "-m", "r1vl.data.keysteps", str(inp), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "3 rows: 1 derived, 1 kept, 1 with no key step found" in res.stdout
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got[0]["key_steps"] == {"Steps": [["4 + 3 = 7", "4+3=7"]]} and got[0]["image_path"] == "a.png"
    assert got[1]["key_steps"] == {"Steps": [["keep me"]]}
    assert got[2]["key_steps"] == {"Steps": []}
    assert main([str(inp), str(out), "--overwrite", "--force"]) == 0  # OUT exists: --force
    assert json.loads(out.read_text().splitlines()[1])["key_steps"] == {"Steps": [["x = 2", "x=2"]]}


@pytest.mark.parametrize("content,match", [("{bad json\n", "in.jsonl:1: invalid JSON"),
                                           ('{"problem": "q"}\n', "in.jsonl:1: missing .*'solution'"),
                                           ("[1]\n", "must be a JSON object")])
def test_cli_errors(tmp_path, capsys, content, match):
    inp = tmp_path / "in.jsonl"
    inp.write_text(content)
    assert main([str(inp), str(tmp_path / "out.jsonl")]) == 2
    import re

    assert re.search(match, capsys.readouterr().err)
    assert main([str(inp), str(inp)]) == 2


def test_cli_refuses_to_replace_out_or_in(tmp_path, capsys):
    """An existing OUT is kept unless --force; OUT == IN (any spelling, a symlink, a hard
    link) is refused even with --force; the write goes through a temporary file."""
    import os

    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps({"problem": "Q", "solution": sol("4 + 3 = 7")}) + "\n")
    out.write_text("precious\n")
    assert main([str(inp), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"OUT {out} exists" in err and "--force" in err and out.read_text() == "precious\n"
    out.chmod(0o640)
    assert main([str(inp), str(out), "--force"]) == 0
    assert json.loads(out.read_text())["key_steps"] == {"Steps": [["4 + 3 = 7", "4+3=7"]]}
    assert (out.stat().st_mode & 0o777) == 0o640 and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.jsonl", "out.jsonl"]
    (tmp_path / "link.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    before = inp.read_text()
    for same in (inp, tmp_path / "sub" / ".." / "in.jsonl", tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        assert main([str(inp), str(same), "--force"]) == 2
        assert "is the input file" in capsys.readouterr().err and inp.read_text() == before
    assert main([str(inp), str(tmp_path / "sub")]) == 2 and "is a directory" in capsys.readouterr().err

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


def test_two_character_operators_stay_whole():
    """"<=", ">=", "==" and "**" are one sign each: they were split ("4 < = 9", an "equation" with
    "= 9" as its last link) and "**", a power, was restyled as a doubled product ("3 × × 2 = 9"),
    taking phrasing slots. A comparison makes no key step, as with "≤"; "4!=24" stays a factorial."""
    assert phrasings("4 <= 9") == ["4 <= 9", "4<=9"]
    for cmp in ("x <= 9.", "x ≤ 9.", "y == 4."):
        assert derive_key_steps(sol(cmp)) == [], cmp
    unicode = derive_key_steps(sol("a ≥ b = 4."))
    assert derive_key_steps(sol("a >= b = 4.")) == [[p.replace("≥", ">=") for p in g] for g in unicode]
    assert derive_key_steps(sol("4!=24 = 4 * 6."))[0][0] == "24 = 4 * 6"
    assert phrasings("3 ** 2 = 9") == ["3 ** 2 = 9", "3**2=9"]
    assert phrasings("2*3 ** 2 = 18")[:3] == ["2 * 3 ** 2 = 18", "2 × 3 ** 2 = 18", "2 \\times 3 ** 2 = 18"]
    s = sol("The square: 3 ** 2 = 9.")
    ks = derive_key_steps(s)
    assert ks == [["3 ** 2 = 9", "3**2=9"]] and key_step_fraction(s, ks) == 1.0


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
    capsys.readouterr()
    assert main([str(tmp_path / "none.jsonl"), str(tmp_path / "out.jsonl")]) == 2  # was: "[Errno 2] No such file"
    assert f"error: IN {tmp_path / 'none.jsonl'} does not exist" in capsys.readouterr().err


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
    assert main([str(inp), str(tmp_path / "nowhere" / "o.jsonl")]) == 2
    assert f"its folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


# --- values are read whole (a cut value makes no key step) -----------------------------------

@pytest.mark.parametrize("step,first,wrong", [
    ("The probability of drawing a red ball is 3/4.", "red ball is 3/4", "a red ball is 3/8"),
    ("The slope of the line is -1/2.", "line is -1/2", "the line is -1."),
    ("The population of city A is 1,250,000.", "city A is 1,250,000", "city A is 1,900,000"),
    ("The ratio of boys to girls is 2:3.", "boys to girls is 2:3", "boys to girls is 2:5"),
    ("The area is 8 cm × 5 cm = 40 cm².", "8 cm × 5 cm = 40 cm²", "the area is 8 cm × 6 cm = 48 cm²"),
    ("The probability is \\frac{3}{4}.", "probability is \\frac{3}{4}", "the probability is \\frac{3}{8}"),
])
def test_values_are_read_whole(step, first, wrong):
    ks = derive_key_steps(sol(step))
    assert [g[0] for g in ks] == [first]
    assert key_step_fraction(sol(step), ks) == 1.0 and key_step_fraction(sol(wrong), ks) == 0.0


@pytest.mark.parametrize("step", ["The area is 8 cm × 5 cm.", "Then x = 4th.", "The sides are 3, 4 and 5.",
                                  "x = 2 or 3", "The values are 3 to 5.",
                                  "The ratio 2:3 holds.",  # was "ratio 2: 3", "ratio 2 = 3": a label cut in two
                                  # each was cut to a key step a wrong value matches ("n = 5", "3.5 thousand")
                                  "n = 5!", "The length is 5 m 20 cm.", "The total is 3.5 million.",
                                  "The time is 3:45 pm.", "Total: 3.5 million", "Then t = 3:45 pm.",
                                  # a spaced ratio and a numbered heading were labels ("ratio 2 = 3", "Step 2 = 3")
                                  "The ratio 2 : 3 holds.", "Step 2: 3 apples remain."])
def test_a_value_that_goes_on_makes_no_key_step(step):
    assert derive_key_steps(sol(step)) == derive_key_steps(sol("The height is 40².")) == []


def test_equations_apart_by_a_bare_comma():
    """"x=5,y=6" was one equation "x = 5,y = 6" (with a meaningless last link "5,y = 6"), which
    the reference's own "x = 5, y = 6" did not match (k = 0); a comma in a number or inside
    brackets still is no separator."""
    ks = derive_key_steps(sol("Therefore, x=5,y=6."))
    assert ks == [["x = 5", "x=5"], ["y = 6", "y=6"]]
    assert key_step_fraction(sol("So x = 5, y = 6."), ks) == 1.0
    assert derive_key_steps(sol("So f(1,2) = 7.")) == [["f(1,2) = 7", "f(1,2)=7"]]
    assert derive_key_steps(sol("So x = 1,250.")) == [["x = 1,250", "x=1,250"]]


# --- names that name nothing -------------------------------------------------------------------

def test_pronoun_and_filler_names_make_no_key_step():
    for step in ("There are 4 red cubes.", "They are 2 apart.", "It is 12 cm long.", "Both are 90°.",
                 "Each one is 3 units.", "Here it is 5.", "What remains is 6.", "The answer is 7.", "Answer: 7"):
        assert derive_key_steps(sol(step)) == [], step
    assert [g[0] for g in derive_key_steps(sol("The number of cubes is 2.", "Each side measures 4 cm."))] == [
        "number of cubes is 2", "Each side measures 4 cm"]  # a name with a content word still counts


# --- the reference copied verbatim gets k = 1; product and division signs ----------------------

@pytest.mark.parametrize("step", [
    "Half of it: x/2 = 4.", "The increase is (50-40)/40 × 100% = 25%.", "f(2) = 2·2 + 1 = 5",
    "We get x = 3, y = 4.", "Total = 3 x 4 = 12.", "Convert: 1 m = 100 cm.", "3/4 + 1/4 = 1.",
    "The speed is 120 km / 2 h = 60 km/h.", "a^2 + b^2 = c^2, 3^2+4^2 = 25.", "y = 2×9 − 4 = 14"])
def test_copying_the_reference_gives_full_credit(step):
    ks = derive_key_steps(sol(step))
    assert ks and all(len(g) <= 8 for g in ks) and key_step_fraction(sol(step), ks) == 1.0


def test_product_and_division_spellings():
    ks = derive_key_steps(sol("Total = 3 × 4 = 12."))
    for written in ("3 x 4 = 12", "3 * 4 = 12", "$3 \\times 4 = 12$", "3 · 4 = 12", "3×4=12"):
        assert key_step_fraction(sol(written), ks) == 1.0, written
    ks = derive_key_steps(sol("f(2) = 2·2 + 1 = 5"))
    assert key_step_fraction(sol("f(2) = 2 × 2 + 1 = 5"), ks) == 1.0
    assert key_step_fraction(sol("2 * 2 + 1 = 5"), ks) == 1.0
    ks = derive_key_steps(sol("Each friend gets 24 ÷ 6 = 4 cookies."))
    for written in ("24 / 6 = 4", "24/6=4", "24 \\div 6 = 4"):
        assert key_step_fraction(sol(written), ks) == 1.0, written


def test_the_cap_keeps_the_written_spelling_and_a_chains_last_link():
    (g,) = derive_key_steps(sol("y = 2×9 − 4 = 14"))  # mixed spacing, a product and a minus
    assert len(g) == 8 and {"y = 2×9 − 4 = 14", "2×9 − 4 = 14", "2 × 9 − 4 = 14", "2×9−4=14"} <= set(g)
    assert "2 × 9 - 4 = 14" in g  # an ASCII minus
    (g,) = derive_key_steps(sol("A = \\frac{1}{2} \\times 6 \\times 4 = 12"))
    assert len(g) == 8 and "\\frac{1}{2} \\times 6 \\times 4 = 12" in g and "\\frac{1}{2} × 6 × 4 = 12" in g


# --- multi-line steps, point names, chart readings, no trivial equations ----------------------

def test_multiline_chains_point_names_and_chart_readings():
    step = "First compute the perimeter:\nP = 2 × (6 + 4)\n= 2 × 10\n= 20"
    (g,) = derive_key_steps(sol(step))
    assert {"P = 2 × (6 + 4)\n= 2 × 10\n= 20", "2 × 10\n= 20", "2 × 10 = 20"} <= set(g)  # one chain
    for written in (step, "P = 2 × (6 + 4) = 2 × 10 = 20", "So 2 × 10 = 20."):
        assert key_step_fraction(sol(written), [g]) == 1.0
    assert [g[0] for g in derive_key_steps(sol("AB = 5 and BC = 12."))] == ["AB = 5", "BC = 12"]
    assert [g[0] for g in derive_key_steps(sol("∠ABC = 40°, so ∠ACB = 180° − 90° − 40° = 50°."))] == [
        "∠ABC = 40°", "∠ACB = 180° − 90° − 40° = 50°"]
    assert [g[0] for g in derive_key_steps(sol("From the chart, the value for 2019 is 45."))] == [
        "value for 2019 is 45"]


def test_no_trivial_equations():
    assert derive_key_steps(sol("There are 2 cubes and 2 spheres, 2 = 2.")) == []
    assert derive_key_steps(sol("So 5% of 200 = 10.")) == []  # "200 = 10": its left side is cut
    ks = derive_key_steps(sol("Since AB is parallel to CD, angle 1 = angle 2 = 65°.",
                              "Angle 3 = 180° - 65° = 115°."))
    assert [g[0] for g in ks] == ["angle 2 = 65°", "Angle 3 = 180° - 65° = 115°"]
    assert key_step_fraction(sol("angle 12 = 65°"), ks[:1]) == 0.0
    with pytest.raises(ValueError, match="max_steps"):
        derive_key_steps(sol("x = 1"), max_steps=0)


# --- CLI: which rows have key steps, image paths, input ---------------------------------------

def _rows_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_cli_rows_without_key_steps_are_those_the_loader_reads_as_none(tmp_path, capsys):
    s = sol("x = 3 + 4 = 7", answer="7")
    empty = ['{"Steps":[]}', '{"Steps": null}', "null", " ", "[]", None, [], {"Steps": None}]
    rows = [{"problem": "q", "solution": s, "key_steps": v} for v in empty + ['{"Steps": [["mine"]]}']]
    inp, out = _rows_file(tmp_path / "in.jsonl", rows), tmp_path / "o.jsonl"
    assert main([str(inp), str(out)]) == 0
    got = [json.loads(line)["key_steps"] for line in out.read_text().splitlines()]
    assert got[:-1] == [{"Steps": [["x = 3 + 4 = 7", "x=3+4=7", "3 + 4 = 7", "3+4=7"]]}] * len(empty)
    assert got[-1] == '{"Steps": [["mine"]]}'
    for bad in ({"steps": [["curated"]]}, {"Steps": [[]]}):
        _rows_file(inp, [{"problem": "q", "solution": s, "key_steps": [["k"]]},
                         {"problem": "q", "solution": s, "key_steps": bad}])
        assert main([str(inp), str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"{inp}:2: malformed key_steps" in err and "--overwrite" in err and len(err.splitlines()) == 1
        assert json.loads(out.read_text().splitlines()[0])["key_steps"] == {"Steps": [["x = 3 + 4 = 7", "x=3+4=7",
                                                                                        "3 + 4 = 7", "3+4=7"]]}
        assert main([str(inp), str(out), "--force", "--overwrite"]) == 0


def test_cli_rebases_relative_image_paths(tmp_path):
    from PIL import Image

    from r1vl.data import load_dataset

    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    Image.new("RGB", (32, 32), "white").save(tmp_path / "data" / "images" / "a.png")
    absolute = str(tmp_path / "data" / "images" / "a.png")
    s = sol("3 + 4 = 7", answer="7")
    rows = [{"problem": "q", "solution": s, "image_path": "images/a.png"},
            {"problem": "q", "solution": s, "image": "images/../images/a.png"},
            {"problem": "q", "solution": s, "image": {"bytes": None, "path": "images/a.png"}},
            {"problem": "q", "solution": s, "image_path": absolute}]
    inp = _rows_file(tmp_path / "data" / "in.jsonl", rows)
    assert main([str(inp), str(tmp_path / "out" / "o.jsonl")]) == 0
    got = [json.loads(line) for line in (tmp_path / "out" / "o.jsonl").read_text().splitlines()]
    assert [got[0]["image_path"], got[1]["image"], got[2]["image"]["path"], got[3]["image_path"]] == [
        "../data/images/a.png", "../data/images/a.png", "../data/images/a.png", absolute]
    assert len(load_dataset(tmp_path / "out" / "o.jsonl")) == 4
    assert main([str(inp), str(tmp_path / "data" / "same.jsonl")]) == 0  # same directory: as written
    same = [json.loads(line) for line in (tmp_path / "data" / "same.jsonl").read_text().splitlines()]
    assert same[1]["image"] == "images/../images/a.png"


def test_cli_reads_input_as_the_loader_does(tmp_path, capsys):
    from PIL import Image

    from r1vl.data import load_dataset

    row = {"problem": "q", "solution": sol("x = 3 + 4 = 7", answer="7"), "image_path": "a.png"}
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    assert main([str(tmp_path / "bom.jsonl"), str(tmp_path / "bom_out.jsonl")]) == 0
    (tmp_path / "arr.json").write_text(json.dumps([row, row], indent=2))
    assert main([str(tmp_path / "arr.json"), str(tmp_path / "arr_out.json")]) == 0
    assert (tmp_path / "arr_out.json").read_text().startswith("[\n")
    assert [s.key_steps[0][0] for s in load_dataset(tmp_path / "arr_out.json")] == ["x = 3 + 4 = 7"] * 2
    capsys.readouterr()
    cases = [("bad.json", json.dumps([row, 5]).encode(), "bad.json:1: a row must be a JSON object"),
             ("latin.jsonl", json.dumps(row).encode() + b'\n{"problem": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
             ("sur.jsonl", json.dumps(row).encode() + b'\n{"problem": "\\ud800", "solution": "s"}\n',
              "sur.jsonl:2: a string holds a lone surrogate"),
             ("t.parquet", b"PAR1", "t.parquet: parquet input is not supported")]
    for name, content, message in cases:
        (tmp_path / name).write_bytes(content)
        assert main([str(tmp_path / name), str(tmp_path / "x.jsonl")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, err
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit) as e:
            main([str(tmp_path / "bom.jsonl"), str(tmp_path / "ms.jsonl"), "--max-steps", bad])
        assert e.value.code == 2 and "--max-steps" in capsys.readouterr().err


def test_cli_says_its_progress_and_writes_rows_as_they_come(tmp_path, capsys, monkeypatch):
    """260,000 rows took 9 minutes of CPU time with nothing printed until the end: a line on
    stderr every 10 s (here every row) says the rows done, the rate and the time left. The
    output, now written a row at a time, is the same text as before (JSON Lines and a .json
    array); a bad row still leaves no OUT."""
    from r1vl.data import keysteps

    real = keysteps._Progress
    monkeypatch.setattr(keysteps, "_Progress", lambda total: real(total, every_s=0.0))
    rows = [{"problem": f"q{i}", "solution": sol(f"x = {i} + 4 = {i + 4}", answer=str(i + 4)), "key_steps": None}
            for i in range(5)]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(inp), str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in err] == [f"r1vl.data.keysteps: {i} of 5 rows" for i in range(1, 5)]
    assert all("rows/s, about " in line and line.endswith(" min left") for line in err)
    out = [{**r, "key_steps": {"Steps": derive_key_steps(r["solution"], keysteps.DEFAULT_MAX_STEPS)}} for r in rows]
    dumped = [keysteps._dumped(dict(r), "") for r in out]
    assert (tmp_path / "o.jsonl").read_text() == "\n".join(dumped) + "\n"
    assert main([str(inp), str(tmp_path / "o.json")]) == 0
    assert (tmp_path / "o.json").read_text() == "[\n" + ",\n".join(dumped) + "\n]\n"
    (tmp_path / "empty.json").write_text("[]")
    assert main([str(tmp_path / "empty.json"), str(tmp_path / "e.json")]) == 0
    assert (tmp_path / "e.json").read_text() == "[]\n"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows) + "5\n")
    capsys.readouterr()
    assert main([str(inp), str(tmp_path / "bad.jsonl")]) == 2
    assert "in.jsonl:6: a row must be a JSON object" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "empty.json", "in.jsonl", "o.json", "o.jsonl"]

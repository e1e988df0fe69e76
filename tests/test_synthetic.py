"""The built-in synthetic task: deterministic, disjoint splits, loadable, and scored as designed."""
import hashlib
import json
import subprocess
import sys

import pytest
from PIL import Image

from r1vl.data import load_dataset
from r1vl.data.format import step_sections
from r1vl.data.synthetic import FAMILIES, generate
from r1vl.rewards import accuracy_reward, key_step_fraction, validity_reward


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    train, test = generate(out, 300, 60, seed=7)
    return out, train, test


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def digest(out):
    h = hashlib.sha1()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(out).as_posix().encode())
            h.update(Image.open(p).tobytes() if p.suffix == ".png" else p.read_bytes())
    return h.hexdigest()


def test_layout_and_fields(task):
    out, train, test = task
    assert train == str(out / "train.jsonl") and test == str(out / "test.jsonl")
    tr, te = rows(train), rows(test)
    assert len(tr) == 300 and len(te) == 60
    assert {r["family"] for r in tr} == set(FAMILIES)
    for r in tr + te:
        assert set(r) == {"id", "image_path", "problem", "solution", "key_steps", "answer", "family"}
        img = Image.open(out / r["image_path"])
        assert img.size[0] <= 112 and img.size[1] <= 112 and img.mode == "RGB"


def test_deterministic(task, tmp_path):
    out, _, _ = task
    generate(tmp_path, 300, 60, seed=7)
    assert digest(tmp_path) == digest(out)
    other = tmp_path / "other"
    generate(other, 300, 60, seed=8)
    assert rows(other / "train.jsonl") != rows(tmp_path / "train.jsonl")


def test_splits_are_disjoint(task):
    out, train, test = task

    def keys(path):
        return {(Image.open(out / r["image_path"]).tobytes(), r["problem"]) for r in rows(path)}

    assert not keys(train) & keys(test)


def test_reference_solutions_are_compact_complete_and_score_full_marks(task):
    _, train, test = task
    for r in rows(train) + rows(test):
        sol, ks = r["solution"], r["key_steps"]
        assert len(sol) <= 350
        assert 1 <= len(step_sections(sol)) <= 3
        assert validity_reward(sol) == 1.0
        assert key_step_fraction(sol, ks) == 1.0
        # every key step group has a phrasing verbatim in the Step sections
        steps = " ".join(step_sections(sol))
        assert all(any(alt in steps for alt in g) for g in ks["Steps"])
        assert accuracy_reward(sol, sol, ks) == pytest.approx(1.1)
        assert sol.rstrip().endswith(f"### The final answer is: {r['answer']}")


def test_answers_stay_in_documented_ranges(task):
    _, train, _ = task
    allowed = {"count": {1, 2, 3, 4}, "add": set(range(2, 11)), "compare": {2, 3, 4, 5},
               "bar": {1, 2, 3, 4}, "triangle": {5, 10, 13, 17, 6, 24, 30, 60}}
    for r in rows(train):
        assert int(r["answer"]) in allowed[r["family"]]


def test_a_wrong_answer_scores_below_the_reference(task):
    _, train, _ = task
    r = rows(train)[0]
    wrong = r["solution"].replace(f"is: {r['answer']}", f"is: {int(r['answer']) + 100}")
    assert accuracy_reward(wrong, r["solution"], r["key_steps"]) == pytest.approx(0.1)


def test_loader_reads_the_task(task):
    _, train, test = task
    ds = load_dataset(train, min_pixels=56 * 56, max_pixels=112 * 112)
    assert len(ds) == 300
    s = ds[5]
    assert s.image.size == (84, 84) and s.answer == rows(train)[5]["answer"] and s.meta["family"]
    assert len(load_dataset(test)) == 60


def test_family_subset_and_errors(tmp_path):
    train, _ = generate(tmp_path, 20, 1, seed=0, families=["bar"])
    assert {r["family"] for r in rows(train)} == {"bar"}
    with pytest.raises(ValueError, match="unknown families"):
        generate(tmp_path, 1, 1, 0, families=["nope"])


def test_cli(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "r1vl.data.synthetic", "--out", str(out), "--n", "12",
                          "--seed", "3", "--n-test", "4"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(rows(out / "train.jsonl")) == 12 and len(rows(out / "test.jsonl")) == 4
    assert len(list((out / "images").glob("*.png"))) == 16
    res = subprocess.run([sys.executable, "-m", "r1vl.data.synthetic", "--out", str(out), "--n", "2",
                          "--families", "zzz"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown families" in res.stderr


def test_prepare_task_generates_only_when_the_stamp_differs(tmp_path):
    from r1vl.data.synthetic import STAMP, prepare_task

    assert prepare_task(tmp_path, 12, 3, 0) is True
    first = (tmp_path / "train.jsonl").read_text()
    assert json.loads((tmp_path / STAMP).read_text()) == {"n_train": 12, "n_test": 3, "seed": 0}
    assert prepare_task(tmp_path, 12, 3, 0) is False
    assert prepare_task(tmp_path, 12, 3, 1) is True
    assert (tmp_path / "train.jsonl").read_text() != first
    (tmp_path / "train.jsonl").unlink()
    assert prepare_task(tmp_path, 12, 3, 1) is True

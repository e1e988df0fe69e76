"""python -m r1vl.utils_report: the default-run table from finished runs' summary.json."""
import json

import pytest

from r1vl import utils_report


def _run(tmp_path, name, **summary):
    d = tmp_path / name
    d.mkdir()
    base = {"seed": 0, "accuracy_after_warmup": 0.45, "accuracy_final": 0.5, "eval_n": 400,
            "paired": {"fixed": 30, "broken": 10, "p_value": 0.002, "stderr_before": 0.025, "stderr_after": 0.025}}
    (d / "summary.json").write_text(json.dumps({**base, **summary}))
    return d


def test_the_table_and_runs_without_an_evaluation(tmp_path, capsys):
    """A run with train.eval_before=false (or eval_after=false) has a null accuracy: "n/a" in
    the table (it was a TypeError after the JSON was written, and no Markdown)."""
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b", seed=1, accuracy_after_warmup=None, paired=None)
    c = _run(tmp_path, "c", seed=2, accuracy_final=None, paired=None)
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    assert utils_report.main([str(a), str(b), str(c), "--md", str(md), "--json", str(js)]) == 0
    lines = md.read_text().splitlines()
    assert "| 0 | 0.450 ± 0.025 | 0.500 ± 0.025 | +0.050 | 30 / 10 | 0.002 | n/a |" in lines
    assert "| 1 | n/a | 0.500 | n/a | n/a | n/a | n/a |" in lines
    assert "| 2 | 0.450 | n/a | n/a | n/a | n/a | n/a |" in lines
    assert [r["seed"] for r in json.loads(js.read_text())["runs"]] == [0, 1, 2]


def test_a_run_without_a_summary_is_one_line(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(SystemExit) as e:
        utils_report.main([str(tmp_path / "unfinished")])
    assert e.value.code == 2
    assert f"no such file: {tmp_path / 'unfinished' / 'summary.json'}" in capsys.readouterr().err
    a = _run(tmp_path, "a")
    with pytest.raises(SystemExit):
        utils_report.main([str(a), "--plot", str(tmp_path / "p.png")])
    assert "plot.png" in capsys.readouterr().err

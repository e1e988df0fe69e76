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
    assert f"| {a} | 0 | 0.450 ± 0.025 | 0.500 ± 0.025 | +0.050 | 30 / 10 | 0.002 | n/a |" in lines
    assert f"| {b} | 1 | n/a | 0.500 | n/a | n/a | n/a | n/a |" in lines
    assert f"| {c} | 2 | 0.450 | n/a | n/a | n/a | n/a | n/a |" in lines
    assert [r["seed"] for r in json.loads(js.read_text())["runs"]] == [0, 1, 2]


def test_custom_runs_are_named_and_not_called_the_default_run(tmp_path, capsys):
    """Runs of one's own data: the table was titled "The default run, three seeds" with the
    default run's command, two seed-0 runs could not be told apart, a resumed run's wall time
    was its last segment's, a time log that is not GNU time's was taken, and an empty
    "Per task family" heading was printed."""
    a = _run(tmp_path, "a", wall_seconds=7.6, wall_seconds_total=32.0)
    b = _run(tmp_path, "b", wall_seconds=60.0)
    md = tmp_path / "t.md"
    assert utils_report.main([str(a), str(b), "--md", str(md)]) == 0
    text = md.read_text()
    assert "default run" not in text and "torchrun" not in text and "Per task family" not in text
    assert f"| {a} | 0 |" in text and f"| {b} | 0 |" in text and "| 0.5 min |" in text and "| 1.0 min |" in text
    log = tmp_path / "run.log"
    log.write_text("just the trainer's log\n")
    with pytest.raises(SystemExit):
        utils_report.main([str(a), "--time-logs", str(log)])
    assert "not the output of /usr/bin/time -v" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        utils_report.main([str(a), str(b), "--time-logs", str(log)])
    assert "1 file(s) for 2 run(s)" in capsys.readouterr().err


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

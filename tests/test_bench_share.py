"""bench/bench_share.py end to end at a tiny CPU shape: three settings, equal results."""
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_bench_share_tiny(tmp_path, capsys):
    sys.path.insert(0, str(BENCH))
    try:
        import bench_share
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "share.json"
    assert bench_share.main(["--device", "cpu", "--layers", "1", "--vision-layers", "1", "--vocab", "1100",
                             "--prompts", "2", "--G", "3", "--completion", "6", "--image", "56", "--reps", "1",
                             "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert [r["setting"] for r in d["rows"]] == list(bench_share.SETTINGS)
    assert d["config"]["visual_tokens"] == 4 and d["device"].startswith("cpu")
    for r in d["rows"]:
        assert r["update_seconds"] > 0 and r["logprobs_seconds"] > 0
        assert r["logprobs_max_abs_err_vs_whole"] < 1e-4 and r["grad_max_rel_err_vs_whole"] < 1e-4
    assert "dedup + shared prompts" in capsys.readouterr().out

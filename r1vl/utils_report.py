"""Collect finished runs (their summary.json, and the wall time `/usr/bin/time -v` measured
around the launcher) into one JSON file and a Markdown table:

    python -m r1vl.utils_report runs/seed0 runs/seed1 runs/seed2 \\
        --time-logs logs/seed0.time logs/seed1.time logs/seed2.time \\
        --command "torchrun --nproc-per-node 4 -m r1vl.train seed=S output_dir=runs/seedS" \\
        --json bench/results/default_runs.json --md /tmp/default_runs.md --plot docs/default_run_seed0.png

The plot is copied from the first run (its plot.png). Rows are named by their run directory and
seed; the wall time is the trainer's own (all resumed segments) unless a --time-logs file gives
the launcher's. Without --command (the default), no command line is printed."""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import sys
from pathlib import Path


def parse_time_log(path: str | Path) -> dict:
    """Elapsed wall, user and system seconds from GNU time's -v output."""
    text = Path(path).read_text(errors="replace")
    out = {}
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        secs = 0.0
        for p in parts:
            secs = secs * 60 + p
        out["wall_seconds"] = secs
    for key, name in (("User time (seconds)", "user_seconds"), ("System time (seconds)", "system_seconds")):
        m = re.search(re.escape(key) + r": ([\d.]+)", text)
        if m:
            out[name] = float(m.group(1))
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        out["exit_status"] = int(m.group(1))
    return out


def collect(run_dirs: list[str], time_logs: list[str]) -> list[dict]:
    rows = []
    for i, rd in enumerate(run_dirs):
        s = json.loads((Path(rd) / "summary.json").read_text())
        row = {"run": str(rd), "seed": s.get("seed"), "accuracy_after_warmup": s["accuracy_after_warmup"],
               "accuracy_final": s["accuracy_final"], "reward_after_warmup": s.get("reward_after_warmup"),
               "reward_final": s.get("reward_final"), "eval_n": s.get("eval_n"),
               "paired": s.get("paired"), "by_family_after_warmup": s.get("accuracy_by_family_after_warmup"),
               "by_family_final": s.get("accuracy_by_family_final"),
               # a resumed run: every segment's wall time, not the last one's
               "trainer_wall_seconds": s.get("wall_seconds_total", s.get("wall_seconds")),
               "process_seconds": s.get("process_seconds")}
        if i < len(time_logs):
            row["launcher"] = parse_time_log(time_logs[i])
        rows.append(row)
    return rows


def to_markdown(rows: list[dict], command: str, machine: str) -> str:
    launcher = any(r.get("launcher") for r in rows)
    lines = ["# r1vl runs", ""] + ([f"Command: `{command}`", ""] if command else []) + [
        f"Machine: {machine}. Wall time: " + ("GNU time's elapsed time around the launcher (every rank, "
                                              "start-up and the evaluations included)." if launcher else
                                              "the trainer's own (summary.json; resumed segments added up)."),
        "",
        "| run | seed | held-out accuracy after warm-up | after StepGRPO | change | items fixed / broken | "
        "sign-test p | wall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("paired") or {}
        se0, se1 = p.get("stderr_before"), p.get("stderr_after")
        # a run without one of the evaluations (train.eval_before / eval_after false) has null there
        acc0, acc1 = r.get("accuracy_after_warmup"), r.get("accuracy_final")
        a0 = "n/a" if acc0 is None else f"{acc0:.3f}" + (f" ± {se0:.3f}" if se0 is not None else "")
        a1 = "n/a" if acc1 is None else f"{acc1:.3f}" + (f" ± {se1:.3f}" if se1 is not None else "")
        change = "n/a" if acc0 is None or acc1 is None else f"{acc1 - acc0:+.3f}"
        wall = (r.get("launcher") or {}).get("wall_seconds") if launcher else r.get("trainer_wall_seconds")
        wall_s = f"{wall / 60:.1f} min" if wall else "n/a"
        fb = f"{p['fixed']} / {p['broken']}" if p else "n/a"
        pv = f"{p['p_value']:.2g}" if p else "n/a"
        lines.append(f"| {r['run']} | {r['seed']} | {a0} | {a1} | {change} | "
                     f"{fb} | {pv} | {wall_s} |")
    lines += ["", "± is the standard error of each accuracy over the n held-out items; the sign test",
              "compares the two evaluations item by item (items right only after StepGRPO vs only before)."]
    fams = sorted({f for r in rows for f in (r.get("by_family_final") or {})})
    if fams:  # rows with a `family` field (the built-in task's)
        lines += ["", "Per task family (after warm-up → after StepGRPO):", ""]
        lines.append("| run | " + " | ".join(fams) + " |")
        lines.append("|---|" + "---|" * len(fams))
        for r in rows:
            b, a = r.get("by_family_after_warmup") or {}, r.get("by_family_final") or {}
            cells = [f"{b.get(f, float('nan')):.2f} → {a.get(f, float('nan')):.2f}" for f in fams]
            lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r1vl.utils_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories (each with summary.json)")
    ap.add_argument("--time-logs", nargs="*", default=[],
                    help="one `/usr/bin/time -v` output per run, in the same order (the launcher's wall time)")
    ap.add_argument("--command", default="", help="the command line the runs were made with, for the table's header")
    ap.add_argument("--machine", default=f"{platform.machine()}, {platform.processor() or 'CPU'}",
                    help="the machine, for the table's header (default: this one)")
    ap.add_argument("--json", default="", help="also write the collected rows here")
    ap.add_argument("--md", default="", help="also write the Markdown table here")
    ap.add_argument("--plot", default="", help="copy the first run's plot.png here")
    args = ap.parse_args(argv)
    if args.time_logs and len(args.time_logs) != len(args.runs):
        ap.error(f"--time-logs: {len(args.time_logs)} file(s) for {len(args.runs)} run(s); give one per run, in order")
    for log_path in args.time_logs:
        if not Path(log_path).is_file():
            ap.error(f"--time-logs: no such file: {log_path}")
        if "wall_seconds" not in parse_time_log(log_path):
            ap.error(f"--time-logs {log_path}: no 'Elapsed (wall clock) time' line: not the output of /usr/bin/time -v")
    missing = [str(Path(rd) / name) for rd in args.runs for name in ("summary.json",) + (
        ("plot.png",) if args.plot and rd == args.runs[0] else ()) if not (Path(rd) / name).is_file()]
    if missing:  # a run that has not finished (or wrote no plot: logging.plot=false, no matplotlib)
        ap.error("no such file: " + ", ".join(missing))
    rows = collect(args.runs, args.time_logs)
    doc = {"command": args.command, "machine": args.machine, "runs": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    md = to_markdown(rows, args.command, args.machine)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    if args.plot:
        shutil.copyfile(Path(args.runs[0]) / "plot.png", args.plot)
    sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU memory timeline of a StepGRPO run, from its metrics.jsonl.

On CUDA the trainer writes, into every StepGRPO record of metrics.jsonl, the key
"memory": rank 0's GPU memory at each phase boundary of that step, in order —

    sleep     after the colocated vLLM engine went to sleep (level 1: weights to host
              RAM, KV cache dropped; level 2: both dropped)
    wake      after its weights came back (before the push)
    sync      after the policy weights were pushed and the caches reset
    generate  after the rollout (the KV cache was woken for it)
    train     after the reference/old log-probs and the μ optimizer steps

each with "allocated" and "reserved" (torch's caching allocator: the trainer's own
tensors) and "device_used" (the whole device as the driver sees it, which also counts
vLLM's memory pool and the CUDA context). With the HF engine only "train" is there.

    python bench/bench_memory.py runs/qwen2vl_7b            # or .../metrics.jsonl
    python bench/bench_memory.py RUN --out bench/results/memory_7b.png

Prints a per-phase table (peak and last value, GiB), writes the plot (PNG) and the
table as JSON next to it (default bench/results/memory_timeline.{png,json}), with the
run's device, world size and model taken from its summary.json / config.yaml when
they are there. Without CUDA the trainer records no timeline and the script says so
(exit code 1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

GiB = float(1 << 30)
RESULTS = Path(__file__).resolve().parent / "results"
SERIES = (("allocated", "torch allocated", "tab:blue"), ("reserved", "torch reserved", "tab:orange"),
          ("device_used", "device used (incl. vLLM pool)", "tab:red"))
PHASE_COLORS = {"sleep": "tab:gray", "wake": "tab:olive", "sync": "tab:purple", "generate": "tab:green",
                "train": "tab:brown"}


def read_timeline(metrics: Path) -> list[dict]:
    """Flattened [{"step", "phase", "allocated", "reserved", "device_used"}] in run order."""
    events = []
    for line in metrics.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if rec.get("phase") != "grpo":
            continue
        for ev in rec.get("memory") or []:
            events.append({"step": rec.get("step"), **ev})
    return events


def phase_table(events: list[dict]) -> dict[str, dict[str, float]]:
    """Per phase: peak and last value (GiB) of each series, and how often it occurred."""
    table: dict[str, dict[str, float]] = {}
    for ev in events:
        row = table.setdefault(ev["phase"], {"count": 0})
        row["count"] += 1
        for key, _, _ in SERIES:
            if key in ev:
                v = ev[key] / GiB
                row[f"{key}_peak_gib"] = max(row.get(f"{key}_peak_gib", 0.0), v)
                row[f"{key}_last_gib"] = v
    return table


def run_info(run_dir: Path) -> dict:
    info: dict = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        info.update({k: s[k] for k in ("world_size", "device", "steps") if k in s})
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            import yaml

            c = yaml.safe_load(config.read_text())
            info.update(model=c["model"]["path"], dtype=c["model"]["dtype"], deepspeed=c.get("deepspeed") or None,
                        engine=c["rollout"]["engine"],
                        vllm={k: c["rollout"].get("vllm", {}).get(k) for k in ("sleep_level", "gpu_memory_utilization")})
        except Exception:  # an older or hand-edited config: the plot does not need it
            pass
    return info


def plot(events: list[dict], out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = list(range(len(events)))
    fig, ax = plt.subplots(figsize=(max(10.0, min(26.0, 0.25 * len(events) + 6)), 4.5))
    for key, label, color in SERIES:
        if any(key in ev for ev in events):
            ax.plot(xs, [ev.get(key, float("nan")) / GiB for ev in events], marker=".", color=color, label=label)
    seen = set()
    for x, ev in enumerate(events):  # phase of each point along the bottom
        c = PHASE_COLORS.get(ev["phase"], "black")
        ax.axvspan(x - 0.5, x + 0.5, ymin=0, ymax=0.03, color=c, lw=0,
                   label=None if ev["phase"] in seen else f"phase: {ev['phase']}")
        seen.add(ev["phase"])
        if x and ev["step"] != events[x - 1]["step"]:
            ax.axvline(x - 0.5, color="lightgray", lw=0.8, zorder=0)
    ax.set_xlabel("phase boundary (run order; gray lines separate StepGRPO steps)")
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = _cli.ArgumentParser(prog="python bench/bench_memory.py", description=__doc__.split("\n\n")[0],
                             epilog="Exit codes: 0 written, 1 no timeline in the run (not a CUDA run), "
                                    "2 a bad argument.")
    ap.add_argument("run", help="a run's output_dir, or its metrics.jsonl")
    ap.add_argument("--out", default=str(RESULTS / "memory_timeline.png"),
                    help="PNG path, the JSON goes beside it (same name, .json); missing folders are created "
                         "(default: bench/results/memory_timeline.png)")
    args = ap.parse_args(argv)
    src = Path(args.run)
    metrics = src / "metrics.jsonl" if src.is_dir() else src
    if not metrics.is_file():
        ap.error(f"{metrics}: no such file")
    _cli.out_file(ap, "--out", args.out, suffix=".png")
    events = read_timeline(metrics)
    if not events:
        print(f"bench_memory: {metrics} has no GPU memory timeline (the trainer records it on CUDA only)",
              file=sys.stderr)
        return 1
    info = run_info(metrics.parent)
    table = phase_table(events)
    print(f"{'phase':<10}{'n':>5}{'alloc peak':>12}{'reserved peak':>15}{'device peak':>13}   (GiB)")
    for phase, row in table.items():
        print(f"{phase:<10}{row['count']:>5}{row.get('allocated_peak_gib', float('nan')):>12.2f}"
              f"{row.get('reserved_peak_gib', float('nan')):>15.2f}{row.get('device_used_peak_gib', float('nan')):>13.2f}")
    out_png = Path(args.out)
    title = "GPU memory per phase (rank 0)" + (f": {info['model']}" if info.get("model") else "")
    plot(events, out_png, title)
    out_json = out_png.with_suffix(".json")
    out_json.write_text(json.dumps({"source": str(metrics), "run": info, "events": len(events),
                                    "steps": len({e['step'] for e in events}), "phases": table}, indent=2) + "\n")
    print(f"wrote {out_png} and {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

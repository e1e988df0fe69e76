"""Plot bench_loss.py results: time and peak memory against tokens, one line per
implementation and LM head (fused backends, the materialised reference, liger's
chunked loss and the GEMM floor by default). A row measured untimed (bench_loss.py's
reference, by default) is drawn in the memory panel only; an auto row recorded as
another row's alias is not drawn.

    python bench/plot_loss.py bench/results/loss_h100.json                 # -> loss_h100.png beside it
    python bench/plot_loss.py a.json b.json --merge-out bench/results/loss_h100.json \\
        --png bench/results/loss_h100.png                                   # merge runs, then plot

Several JSON files (e.g. one per GPU call) are merged row by row: a later file's row
replaces an earlier one with the same impl, device, shape and dtype. --merge-out
writes the merged rows (the last file's config, every file's targets and autotune
choices) in the same schema.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402

DEFAULT_IMPLS = ("fused_*", "reference", "liger_chunked", "floor")
COLORS = {"reference": "tab:red", "liger_chunked": "tab:orange", "liger_triton": "tab:brown",
          "floor": "black", "floor_fwd": "dimgray"}
FUSED_COLORS = ["tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive"]


def merge(paths: list[Path]) -> dict:
    rows: dict[tuple, dict] = {}
    config, targets, tuned = {}, [], {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        for r in data["rows"]:
            rows[(r["impl"], r["device"], r["hidden"], r["vocab"], r["tokens"], r["dtype"])] = r
        config = data.get("config", config)
        targets += data.get("targets", [])
        tuned.update(data.get("triton_autotune", {}))
    return {"rows": list(rows.values()), "config": config, "targets": targets, "triton_autotune": tuned}


def _wanted(impl: str, patterns) -> bool:
    return any(impl.startswith(p[:-1]) if p.endswith("*") else impl == p for p in patterns)


def plot(paths: list[Path], png: Path, impls=DEFAULT_IMPLS) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = merge(paths)
    # time: timed rows; memory: every row with a peak (the reference is measured untimed)
    rows = [r for r in data["rows"] if _wanted(r["impl"], impls) and not r.get("alias_of")
            and (r.get("ms_median") is not None or r.get("peak_mem_bytes") is not None)]
    gib = max((r["peak_mem_bytes"] or 0 for r in rows), default=0) >= 2**30
    unit, scale = ("GiB", 2**30) if gib else ("MiB", 2**20)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    heads = sorted({(r["hidden"], r["vocab"]) for r in rows})
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]  # per head too: with one token count a line is one point, and style shows nothing
    fused = sorted({r["impl"] for r in rows if r["impl"].startswith("fused_")})
    color = dict(COLORS, **{f: FUSED_COLORS[i % len(FUSED_COLORS)] for i, f in enumerate(fused)})
    for hi, head in enumerate(heads):
        for impl in sorted({r["impl"] for r in rows}):
            mine = [r for r in rows if r["impl"] == impl and (r["hidden"], r["vocab"]) == head]
            kw = dict(color=color.get(impl, "gray"), linestyle=styles[hi % len(styles)], marker=markers[hi % len(markers)],
                      label=f"{impl}, H={head[0]} V={head[1]}")
            for ax, key, div in ((ax_t, "ms_median", 1), (ax_m, "peak_mem_bytes", scale)):
                pts = sorted((r["tokens"], r[key] / div) for r in mine if r.get(key) is not None)
                if pts:
                    ax.plot([q[0] for q in pts], [q[1] for q in pts], **kw)
    devices = sorted({r["device"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    for ax, ylabel in ((ax_t, "forward+backward, median ms"), (ax_m, f"peak memory above inputs, {unit}")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_title("time")
    ax_m.set_title("peak memory")
    handles, labels = [], []
    for ax in (ax_t, ax_m):                   # a row drawn in one panel only (untimed) still gets a label
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"fused linear GRPO loss: {', '.join(devices)}, {', '.join(dtypes)}", fontsize=10)
    rows_of_legend = (len(labels) + 3) // 4
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="A bad argument (a missing or non-bench_loss.py JSON file, --impls matching "
                                    "no row, an unwritable output) is one error line and exit code 2.")
    ap.add_argument("json", nargs="+", type=Path, help="bench_loss.py JSON file(s), merged in order")
    ap.add_argument("--png", type=Path, default=None,
                    help="output .png; missing folders are created (default: the --merge-out file's or else the "
                         "first JSON's name, .png)")
    ap.add_argument("--merge-out", type=Path, default=None, help="write the merged JSON here (default: no file)")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                    help="comma-separated impls to draw ('prefix*' matches a prefix) (default: %(default)s)")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    for path in args.json:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            ap.error(f"{path}: no such file")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            ap.error(f"{path}: not a JSON file ({e})")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            ap.error(f"{path}: not a bench_loss.py result (no \"rows\" list)")
        keys = ("impl", "device", "hidden", "vocab", "tokens", "dtype", "ms_median", "peak_mem_bytes")
        for r in data["rows"]:
            missing = [k for k in keys if k not in r] if isinstance(r, dict) else list(keys)
            if missing:
                ap.error(f"{path}: a row lacks {', '.join(missing)}: not a bench_loss.py result")
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    have = sorted({r["impl"] for r in merge(args.json)["rows"]
                   if r.get("ms_median") is not None or r.get("peak_mem_bytes") is not None})
    if not any(_wanted(i, impls) for i in have):
        ap.error(f"--impls {args.impls!r} matches no measured row; the files have {', '.join(have) or 'none'}")
    png = args.png or (args.merge_out or args.json[0]).with_suffix(".png")
    _cli.out_file(ap, "--png", png, suffix=".png")
    if args.merge_out:
        _cli.out_file(ap, "--merge-out", args.merge_out)
        args.merge_out.write_text(json.dumps(merge(args.json), indent=2) + "\n")
        print(f"wrote {args.merge_out}")
    plot(args.json, png, impls)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

"""The start-up cost of data.verify_images: milliseconds per image of the decode check
(r1vl.train.image_problems: each image file once, R1VLDataset.image_problem's open, decode, EXIF turn,
RGB, resize), next to the header read
that loading does anyway. Images are made here, smooth like photos: half 640x480 JPEGs
(quality 90), half 448x448 PNGs, resized within --max-pixels as training would. The check
one image after another, then as the trainer runs it (r1vl.train.image_problems: threads,
as many as torch's, at most 8; --threads sets torch's).

    python bench/bench_decode.py              # 200 images in a temporary directory
    python bench/bench_decode.py --threads 8  # a node's rank with 8 cores to spare
    python bench/bench_decode.py --n 40 --jpeg-size 4000x3000   # 12-megapixel photos
    python bench/bench_decode.py --rows-per-image 4             # 4 questions about each image
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def write_images(folder: Path, n: int, seed: int = 0, jpeg_size: tuple[int, int] = (640, 480),
                 rows_per_image: int = 1) -> Path:
    """n rows and a JSONL data file naming their images (a low-resolution noise field upsampled:
    photo-like, compressible), each image named by `rows_per_image` rows in a row; returns the
    file."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        j = i // rows_per_image
        name = f"{j}.jpg" if j % 2 else f"{j}.png"
        if i % rows_per_image == 0:
            img = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
                jpeg_size if j % 2 else (448, 448), Image.Resampling.BICUBIC)
            img.save(folder / name, **({"quality": 90} if j % 2 else {}))
        rows.append({"image_path": name, "problem": "q", "solution": "### The final answer is: 1", "key_steps": None})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 4000x3000, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected positive sides, got {text!r}")
    return w, h


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="Prints two lines only (no file). A bad argument is one error line and "
                                    "exit code 2.")
    ap.add_argument("--n", type=_cli.positive_int, default=200, help="images (default: %(default)s)")
    ap.add_argument("--max-pixels", type=_cli.positive_int, default=200704,
                    help="data.max_pixels of the resize (default: %(default)s, configs/qwen2vl_2b.yaml and _7b.yaml)")
    ap.add_argument("--jpeg-size", type=_size, default=(640, 480),
                    help="WxH of the JPEG half (default: 640x480; 4000x3000 is a 12-megapixel photo)")
    ap.add_argument("--rows-per-image", type=_cli.positive_int, default=1,
                    help="rows naming each image, in a row (default: %(default)s)")
    ap.add_argument("--threads", type=_cli.positive_int, default=None,
                    help="torch's thread count for the threaded check (default: this machine's cores)")
    args = ap.parse_args(argv)
    import os

    import torch

    from r1vl.data import load_dataset
    from r1vl.train import image_problems

    with tempfile.TemporaryDirectory() as tmp:
        path = write_images(Path(tmp), args.n, jpeg_size=args.jpeg_size, rows_per_image=args.rows_per_image)
        t = time.perf_counter()
        ds = load_dataset(path, max_pixels=args.max_pixels)
        header = (time.perf_counter() - t) / len(ds)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            t = time.perf_counter()
            bad = sum(1 for why in image_problems(ds, range(len(ds))) if why)
            decode = (time.perf_counter() - t) / len(ds)
            torch.set_num_threads(args.threads or os.cpu_count() or 1)
            files = len({ds.image_file_key(i) for i in range(len(ds))})  # image_problems decodes each once
            threads = min(8, torch.get_num_threads(), files // 4)
            t = time.perf_counter()
            bad_threaded = sum(1 for why in image_problems(ds, range(len(ds))) if why)
            threaded = (time.perf_counter() - t) / len(ds)
        finally:
            torch.set_num_threads(before)
    w, h = args.jpeg_size
    print(f"{args.n} rows, {args.rows_per_image} per image ({w}x{h} JPEG / 448x448 PNG), one process: load with "
          f"header check "
          f"{header * 1e3:.2f} ms/row, decode check {decode * 1e3:.2f} ms/row ({bad} unreadable); "
          f"in {max(threads, 1)} thread(s) as the trainer runs it {threaded * 1e3:.2f} ms/row "
          f"({bad_threaded} unreadable)")
    print(f"decode check for 10,000 rows: {decode * 1e4:.0f} s in one process one image at a time, "
          f"{threaded * 1e4:.0f} s in {max(threads, 1)} thread(s); shared by the ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The built-in visual-reasoning task: seeded image + question + R1-VL reference solution + key steps.

    python -m r1vl.data.synthetic --out DIR --n N --seed S [--n-test M] [--families count,add,...]

writes DIR/train.jsonl, DIR/test.jsonl and DIR/images/*.png in the layout
`r1vl.data.load_dataset` reads. The held-out split is disjoint from the
train split: no test item has the same image pixels and question as a train
item. Output is a deterministic function of (n_train, n_test, seed, families).

It is made for the embedded default run -- a tiny, randomly initialised
Qwen2-VL trained on a CPU in minutes -- so everything is small and regular:
84x84 images laid out on a 3x3 grid of 28-pixel cells (one Qwen2-VL visual
token per cell), digits drawn with PIL's built-in bitmap font scaled up with
nearest-neighbour (identical pixels on every machine), small answer ranges,
and short reference solutions (every section present, 1-2 steps, about 200
characters) whose Step sections contain the key steps verbatim.

Families (chance = accuracy of always giving the most frequent answer):

=========  =====================================================  ==============  ======
family     question                                               answers         chance
=========  =====================================================  ==============  ======
count      How many <colour> shapes are in the image?             1-4 (uniform)   25%
           (1-4 shapes of the asked colour among red/green/blue,
           plus 0-3 of the other colours; circles, squares,
           triangles)
add        What is the sum of the two numbers in the image?       2-10            20%
           (two digits 1-5)                                       (mode 6)
compare    Which of the two numbers in the image is larger?       2-5             40%
           (two different digits 1-5)                             (mode 5)
bar        What is the value of the <colour> bar?                 1-4 (uniform)   25%
           (red, green and blue bars of height 1-4 on a grid)
triangle   What is the length of the hypotenuse? / What is the    5,10,13,17 /    25%
           area of the triangle? (right triangle, legs labelled   6,24,30,60      (per
           from the triples 3-4-5, 6-8-10, 5-12-13, 8-15-17)                      question)
=========  =====================================================  ==============  ======

With all five families mixed uniformly (the default), always answering "4"
(the most frequent answer of the mix) scores about 18%, and answering the mode
of whichever question is asked scores 27% -- the floor a model must beat by
actually reading the image.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 84
CELL = 28
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
GRID = (200, 200, 200)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220)}
FAMILIES = ("count", "add", "compare", "bar", "triangle")
TRIPLES = ((3, 4, 5), (6, 8, 10), (5, 12, 13), (8, 15, 17))


@dataclass
class Item:
    image: Image.Image
    problem: str
    solution: str
    key_steps: list[list[str]]
    answer: str
    family: str


def _solution(description: str, rationale: str, steps: list[str], answer) -> str:
    parts = [f"### Image Description:\n{description}", f"### Rationales:\n{rationale}",
             "### Let's think step by step."]
    parts += [f"### Step {i}:\n{s}" for i, s in enumerate(steps, start=1)]
    parts.append(f"### The final answer is: {answer}")
    return "\n".join(parts)


# ------------------------------------------------------------------------------ drawing

_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        # the bitmap font built into Pillow (not the FreeType one): same pixels everywhere
        load = getattr(ImageFont, "load_default_imagefont", None)
        _FONT = load() if load is not None else ImageFont.load_default()
    return _FONT


def _text_mask(text: str, scale: int) -> Image.Image:
    font = _font()
    canvas = Image.new("L", (8 * len(text) + 4, 16), 0)
    ImageDraw.Draw(canvas).text((1, 1), text, fill=255, font=font)
    canvas = canvas.crop(canvas.getbbox())
    return canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)


def _draw_text(img: Image.Image, text: str, center: tuple[int, int], scale: int, colour=BLACK) -> None:
    mask = _text_mask(text, scale)
    x = round(center[0] - mask.width / 2)
    y = round(center[1] - mask.height / 2)
    img.paste(Image.new("RGB", mask.size, colour), (x, y), mask)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: int, cy: int, size: int, colour) -> None:
    h = size // 2
    if kind == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=colour)
    elif kind == "square":
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    else:  # triangle
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=colour)


def _cell_center(cell: int, rng: random.Random, jitter: int = 2) -> tuple[int, int]:
    r, c = divmod(cell, 3)
    return (c * CELL + CELL // 2 + rng.randint(-jitter, jitter),
            r * CELL + CELL // 2 + rng.randint(-jitter, jitter))


# ------------------------------------------------------------------------------ families

def _count(rng: random.Random) -> Item:
    colour = rng.choice(list(COLOURS))
    n = rng.randint(1, 4)
    others = [c for c in COLOURS if c != colour]
    extra = [rng.choice(others) for _ in range(rng.randint(0, 3))]
    colours = [colour] * n + extra
    cells = rng.sample(range(9), len(colours))
    img = Image.new("RGB", (SIZE, SIZE), WHITE)
    draw = ImageDraw.Draw(img)
    for cell, col in zip(cells, colours):
        cx, cy = _cell_center(cell, rng)
        _draw_shape(draw, rng.choice(("circle", "square", "triangle")), cx, cy, rng.randint(16, 20),
                    COLOURS[col])
    counts = {c: colours.count(c) for c in COLOURS}
    description = f"There are {counts['red']} red, {counts['green']} green and {counts['blue']} blue shapes."
    steps = [f"Count the {colour} shapes: {n}."]
    key = [[f"{colour} shapes: {n}", f"{n} {colour} shapes", f"{n} {colour} shape"]]
    return Item(img, f"How many {colour} shapes are in the image?",
                _solution(description, f"Count only the {colour} shapes.", steps, n), key, str(n), "count")


def _two_digits(rng: random.Random, distinct: bool) -> tuple[Image.Image, int, int]:
    a = rng.randint(1, 5)
    b = rng.choice([d for d in range(1, 6) if d != a]) if distinct else rng.randint(1, 5)
    left_col = rng.randint(0, 1)
    right_col = rng.randint(left_col + 1, 2)
    img = Image.new("RGB", (SIZE, SIZE), WHITE)
    for digit, col in ((a, left_col), (b, right_col)):
        cx, cy = _cell_center(rng.randint(0, 2) * 3 + col, rng, jitter=1)
        _draw_text(img, str(digit), (cx, cy), scale=3)
    return img, a, b


def _add(rng: random.Random) -> Item:
    img, a, b = _two_digits(rng, distinct=False)
    s = a + b
    steps = [f"The numbers are {a} and {b}.", f"{a} + {b} = {s}."]
    key = [[f"{a} and {b}", f"{b} and {a}"],
           [f"{a} + {b} = {s}", f"{a}+{b}={s}", f"{b} + {a} = {s}", f"{b}+{a}={s}"]]
    sol = _solution(f"Two numbers: {a} on the left and {b} on the right.", "Add the two numbers.", steps, s)
    return Item(img, "What is the sum of the two numbers in the image?", sol, key, str(s), "add")


def _compare(rng: random.Random) -> Item:
    img, a, b = _two_digits(rng, distinct=True)
    hi, lo = max(a, b), min(a, b)
    steps = [f"The numbers are {a} and {b}.", f"{hi} > {lo}."]
    key = [[f"{a} and {b}", f"{b} and {a}"], [f"{hi} > {lo}", f"{hi}>{lo}", f"{lo} < {hi}", f"{lo}<{hi}"]]
    sol = _solution(f"Two numbers: {a} on the left and {b} on the right.",
                    "Compare the two numbers.", steps, hi)
    return Item(img, "Which of the two numbers in the image is larger?", sol, key, str(hi), "compare")


def _bar(rng: random.Random) -> Item:
    order = list(COLOURS)
    rng.shuffle(order)
    values = [rng.randint(1, 4) for _ in order]
    unit, base = 18, SIZE - 4
    img = Image.new("RGB", (SIZE, SIZE), WHITE)
    draw = ImageDraw.Draw(img)
    for k in range(1, 5):
        draw.line((0, base - k * unit, SIZE - 1, base - k * unit), fill=GRID)
    for i, (col, v) in enumerate(zip(order, values)):
        x0 = i * CELL + 6 + rng.randint(-1, 1)
        draw.rectangle((x0, base - v * unit, x0 + 15, base), fill=COLOURS[col])
    draw.line((0, base, SIZE - 1, base), fill=BLACK)
    asked = rng.choice(order)
    v = values[order.index(asked)]
    description = "Bars from left to right: " + ", ".join(f"{c} {x}" for c, x in zip(order, values)) + "."
    steps = [f"The {asked} bar reaches {v}."]
    key = [[f"{asked} bar reaches {v}", f"{asked} bar is {v}", f"{asked} bar: {v}", f"{asked} bar has value {v}"]]
    sol = _solution(description, f"Read the height of the {asked} bar on the grid.", steps, v)
    return Item(img, f"What is the value of the {asked} bar?", sol, key, str(v), "bar")


def _triangle(rng: random.Random) -> Item:
    p, q, c = rng.choice(TRIPLES)
    a, b = (p, q) if rng.random() < 0.5 else (q, p)  # a: vertical leg, b: horizontal leg
    img = Image.new("RGB", (SIZE, SIZE), WHITE)
    draw = ImageDraw.Draw(img)
    span = 50  # the longer leg, in pixels
    ha, wb = round(span * a / max(a, b)), round(span * b / max(a, b))
    x0, y0 = 28 + rng.randint(-2, 2), 60 + rng.randint(-2, 2)  # the right angle
    draw.polygon([(x0, y0), (x0, y0 - ha), (x0 + wb, y0)], outline=BLACK)
    draw.rectangle((x0, y0 - 5, x0 + 5, y0), outline=BLACK)  # right-angle mark
    _draw_text(img, str(a), (x0 - 14, y0 - ha // 2), scale=2)
    _draw_text(img, str(b), (x0 + wb // 2, y0 + 12), scale=2)
    description = f"A right triangle with legs {a} and {b}."
    if rng.random() < 0.5:
        a2, b2, c2 = a * a, b * b, c * c
        steps = [f"{a}^2 + {b}^2 = {a2} + {b2} = {c2}.", f"sqrt({c2}) = {c}."]
        key = [[f"{a2} + {b2} = {c2}", f"{a2}+{b2}={c2}", f"{b2} + {a2} = {c2}", f"{b2}+{a2}={c2}"],
               [f"sqrt({c2}) = {c}", f"sqrt({c2})={c}", f"√{c2} = {c}", f"\\sqrt{{{c2}}} = {c}"]]
        sol = _solution(description, "Use the Pythagorean theorem.", steps, c)
        return Item(img, "What is the length of the hypotenuse?", sol, key, str(c), "triangle")
    ab, area = a * b, a * b // 2
    steps = [f"{a} * {b} = {ab}.", f"{ab} / 2 = {area}."]
    key = [[f"{a} * {b} = {ab}", f"{a}*{b}={ab}", f"{a} x {b} = {ab}", f"{a} × {b} = {ab}", f"{b} * {a} = {ab}"],
           [f"{ab} / 2 = {area}", f"{ab}/2={area}"]]
    sol = _solution(description, "The area is half the product of the legs.", steps, area)
    return Item(img, "What is the area of the triangle?", sol, key, str(area), "triangle")


_MAKERS = {"count": _count, "add": _add, "compare": _compare, "bar": _bar, "triangle": _triangle}


def make_item(rng: random.Random, families: tuple[str, ...] = FAMILIES) -> Item:
    """One item of a family drawn uniformly from `families`."""
    return _MAKERS[rng.choice(families)](rng)


def _key(item: Item) -> str:
    return hashlib.sha1(item.image.tobytes() + b"\0" + item.problem.encode()).hexdigest()


# ------------------------------------------------------------------------------ writing

def _write_split(out: Path, split: str, items: list[Item]) -> Path:
    path = out / f"{split}.jsonl"
    tmp = out / f".{split}.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, it in enumerate(items):
            rel = f"images/{split}_{i:06d}.png"
            it.image.save(out / rel, format="PNG")
            row = {"id": f"{split}-{i:06d}", "image_path": rel, "problem": it.problem,
                   "solution": it.solution, "key_steps": {"Steps": it.key_steps}, "answer": it.answer,
                   "family": it.family}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written split
    return path


def generate(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int,
             families: tuple[str, ...] | list[str] = FAMILIES) -> tuple[str, str]:
    """Write the task to out_dir; returns (train.jsonl path, test.jsonl path).

    Deterministic in (n_train, n_test, seed, families); test items never repeat a
    train item's (image, question).
    """
    families = tuple(families)
    unknown = [f for f in families if f not in _MAKERS]
    if unknown or not families:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)

    train = [make_item(random.Random(f"r1vl-synthetic:{seed}:train:{i}"), families) for i in range(n_train)]
    seen = {_key(it) for it in train}
    test: list[Item] = []
    for i in range(n_test):
        for attempt in range(1000):
            it = make_item(random.Random(f"r1vl-synthetic:{seed}:test:{i}:{attempt}"), families)
            if _key(it) not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a held-out item unlike the {n_train} train items")
        test.append(it)
    return str(_write_split(out, "train", train)), str(_write_split(out, "test", test))


STAMP = "r1vl_synthetic.json"
log = logging.getLogger(__name__)


def prepare_task(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int) -> bool:
    """The task with these sizes and seed in out_dir, generated only when the directory's
    stamp (STAMP: the sizes and seed it was written with) differs or train.jsonl is
    missing. Returns whether it generated. Raises OSError when out_dir is not writable."""
    out = Path(out_dir)
    stamp = out / STAMP
    want = {"n_train": n_train, "n_test": n_test, "seed": seed}
    have = json.loads(stamp.read_text()) if stamp.is_file() else None
    if have == want and (out / "train.jsonl").is_file():
        return False
    log.info("generating the synthetic task into %s (%d train, %d held-out)", out, n_train, n_test)
    generate(out, n_train, n_test, seed)
    stamp.write_text(json.dumps(want))
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r1vl.data.synthetic",
                                 description="Write the built-in synthetic visual-reasoning task.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, required=True, help="number of train items")
    ap.add_argument("--n-test", type=int, default=None, help="number of held-out items (default: n/10, at least 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated subset of {','.join(FAMILIES)}")
    args = ap.parse_args(argv)
    n_test = args.n_test if args.n_test is not None else max(1, args.n // 10)
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    try:
        train, test = generate(args.out, args.n, n_test, args.seed, families)
    except (ValueError, OSError) as e:
        print(f"r1vl.data.synthetic: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} train items to {train} and {n_test} held-out items to {test}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

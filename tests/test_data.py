"""Loader, image sizing and bad-row handling."""
import json
import logging
import math
import os
import random

import pytest
from PIL import Image

from r1vl.data import DataError, Sample, load_dataset, normalize_key_steps, resize_image, smart_resize
from r1vl.data.images import check_pixel_bounds

SOL = "### Image Description:\nx\n### Rationales:\ny\n### Step 1:\n2 + 2 = 4\n### The final answer is: 4"


def write_rows(tmp_path, rows, name="data.jsonl", image_size=(60, 40), mode="RGB"):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new(mode, image_size, "red" if mode == "RGB" else None).save(tmp_path / "img" / "a.png")
    path = tmp_path / name
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def row(**over):
    r = {"image_path": "img/a.png", "problem": "What is 2 + 2?", "solution": SOL,
         "key_steps": {"Steps": [["2 + 2 = 4", "2+2=4"]]}, "family": "add"}
    r.update(over)
    return {k: v for k, v in r.items() if v is not ...}


# ------------------------------------------------------------------------------ image sizing

@pytest.mark.parametrize("h,w,mn,mx,expected", [
    (84, 84, 56 * 56, 112 * 112, (84, 84)),
    (100, 100, 56 * 56, 112 * 112, (112, 112)),     # rounds to multiples of 28
    (10, 10, 56 * 56, 112 * 112, (56, 56)),         # scaled up to min_pixels
    (1000, 500, 56 * 56, 112 * 112, (140, 56)),     # scaled down to max_pixels, aspect kept
    (10, 1000, 56 * 56, 12845056, (28, 560)),       # 10 px rounds to 0: scaled up to min_pixels
])
def test_smart_resize_examples(h, w, mn, mx, expected):
    assert smart_resize(h, w, min_pixels=mn, max_pixels=mx) == expected


def test_smart_resize_bounds_multiples_and_fixed_point_of_qwen_processor():
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    rng = random.Random(0)
    for _ in range(3000):
        h, w = rng.randint(1, 2000), rng.randint(1, 2000)
        if max(h, w) / min(h, w) > 200:
            continue
        mn = rng.choice([784, 3136, rng.randint(1, 50000)])
        mx = rng.choice([112 * 112, 1003520, mn + rng.randint(0, 50000)])
        try:
            got = smart_resize(h, w, min_pixels=mn, max_pixels=mx)
        except ValueError:
            with pytest.raises(ValueError):
                check_pixel_bounds(mn, mx)
            continue
        gh, gw = got
        assert gh % 28 == 0 and gw % 28 == 0 and mn <= gh * gw <= mx
        # the Qwen2-VL processor leaves our size alone, and where its own rule stays within
        # the bounds (and an aspect of 200, which it refuses as an input) we agree with it
        assert tuple(hf(gh, gw, min_pixels=mn, max_pixels=mx)) == got
        theirs = tuple(hf(h, w, min_pixels=mn, max_pixels=mx))
        if theirs[0] >= 28 and theirs[1] >= 28 and mn <= theirs[0] * theirs[1] <= mx \
                and max(theirs) <= 200 * min(theirs):
            assert theirs == got


@pytest.mark.parametrize("mn,mx", [(3136, 12544), (3136, 200704), (3136, 12845056), (200704, 401408)])
def test_elongated_images_resize_to_sizes_the_qwen_processor_accepts(mn, mx):
    """Qwen2-VL's rule can push an accepted aspect (<= 200) past 200: a 10000x50 image goes
    to 6328x28 at the recipes' max_pixels, a 5617x41 one to 5628x28. Given that resized image,
    the processor (HF's, and vLLM's through it) refused it, so the run died at the first batch
    holding the row, with a traceback naming none."""
    hf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl").smart_resize
    rng = random.Random(1)
    sizes = [(50, 10000), (41, 5617)] + [(s, rng.randint(100 * s, 200 * s)) for s in
                                        (rng.randint(1, 120) for _ in range(3000))]
    for short, long in sizes:
        for h, w in ((short, long), (long, short)):
            got = smart_resize(h, w, min_pixels=mn, max_pixels=mx)
            assert max(got) <= 200 * min(got) and mn <= got[0] * got[1] <= mx, (h, w, got)
            assert tuple(hf(*got, min_pixels=mn, max_pixels=mx)) == got, (h, w, got)
    assert smart_resize(50, 10000, min_pixels=3136, max_pixels=200704) == (28, 5600)


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect"):
        smart_resize(1, 300)
    with pytest.raises(ValueError, match="min_pixels"):
        smart_resize(50, 50, min_pixels=1000, max_pixels=1500)  # no multiple of 784 in range
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 10)


def test_smart_resize_keeps_aspect_roughly():
    h, w = smart_resize(300, 900, min_pixels=3136, max_pixels=100_000)
    assert abs(math.log((w / h) / 3.0)) < 0.25


def test_resize_image_rgb_and_transparency_on_white():
    img = Image.new("RGBA", (50, 30), (0, 0, 0, 0))
    out = resize_image(img, min_pixels=3136, max_pixels=112 * 112)
    assert out.mode == "RGB" and out.size[0] % 28 == 0 and out.size[1] % 28 == 0
    assert out.getpixel((5, 5)) == (255, 255, 255)
    grey = resize_image(Image.new("L", (56, 56), 7), min_pixels=3136, max_pixels=3136)
    assert grey.mode == "RGB" and grey.size == (56, 56) and grey.getpixel((0, 0)) == (7, 7, 7)
    p = Image.new("P", (56, 56))
    assert resize_image(p, min_pixels=3136, max_pixels=3136).mode == "RGB"


def test_high_bit_depth_greyscale_keeps_its_range():
    """16-bit, 32-bit integer and float greyscale (scans, medical images) are scaled onto 0..255;
    a plain convert("RGB") clips them to black and white."""
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 56), (56, 1))
    cases = [(Image.fromarray(ramp.astype(np.uint16)), "I;16"),
             (Image.fromarray(ramp.astype(np.int32)), "I"),
             (Image.fromarray((ramp / 65535).astype(np.float32)), "F"),
             (Image.fromarray((ramp / 65535 * 10 - 5).astype(np.float32)), "F")]  # any range: min-max
    for img, mode in cases:
        assert img.mode == mode
        out = np.asarray(resize_image(img, min_pixels=3136, max_pixels=3136))
        assert out[:, :, 0].tolist() == out[:, :, 2].tolist()
        row = out[28, :, 0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and abs(row[28] - 130) <= 2, (mode, row)
        assert len(set(row.tolist())) > 50 and (np.diff(row) >= 0).all()
    small = Image.fromarray(np.full((56, 56), 7, dtype=np.int32))  # 0..255 in mode I: as it is
    assert resize_image(small, min_pixels=3136, max_pixels=3136).getpixel((0, 0)) == (7, 7, 7)


def test_constant_and_non_finite_greyscale_convert():
    """A constant float / 32-bit image outside 0..255 has no range to scale (it raised
    ZeroDivisionError, past skip_bad_rows): clipped. A NaN pixel in a 0..1 float image left the
    image unscaled (min/max NaN: almost black); it takes the darkest value and the rest scales."""
    import numpy as np

    for arr, want in ((np.full((56, 56), 300.0, np.float32), 255), (np.full((56, 56), -4.0, np.float32), 0),
                      (np.full((56, 56), 70000, np.int32), 255), (np.full((56, 56), np.nan, np.float32), 0)):
        assert resize_image(Image.fromarray(arr), min_pixels=3136, max_pixels=3136).getpixel((5, 5)) == (want,) * 3
    a = np.full((56, 56), 0.5, np.float32)
    a[0, 0], a[0, 1], a[0, 2] = np.nan, np.inf, 1.0
    a[0, 3] = 0.0
    out = np.asarray(resize_image(Image.fromarray(a), min_pixels=3136, max_pixels=3136))[:, :, 0]
    assert out[30, 30] == 128 and out[0, 0] == 0 and out[0, 1] == 0


@pytest.mark.parametrize("mode,colour", [("L", 200), ("RGB", (200, 0, 0))])
def test_colour_key_transparency_is_white(tmp_path, mode, colour):
    """A PNG tRNS colour key (L and RGB images) is transparency too: white, as an alpha channel is."""
    img = Image.new(mode, (56, 56), 0 if mode == "L" else (0, 0, 0))
    img.paste(colour, (20, 20, 40, 40))
    img.save(tmp_path / "k.png", transparency=0 if mode == "L" else (0, 0, 0))
    out = resize_image(Image.open(tmp_path / "k.png"), min_pixels=3136, max_pixels=3136)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    assert out.getpixel((30, 30)) == ((200,) * 3 if mode == "L" else (200, 0, 0))


# ------------------------------------------------------------------------------ loader

def test_load_jsonl(tmp_path):
    path = write_rows(tmp_path, [row(), "", row(problem="Q2")])
    ds = load_dataset(path, min_pixels=56 * 56, max_pixels=112 * 112)
    assert len(ds) == 2
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.problem == "What is 2 + 2?" and s.answer == "4" and s.solution == SOL
    assert s.key_steps == [["2 + 2 = 4", "2+2=4"]]
    assert s.source == f"{path}:1" and ds[1].source == f"{path}:3"  # line numbers
    assert s.meta == {"family": "add"}
    assert s.image.mode == "RGB" and s.image.size == (84, 56)  # 60x40 -> 84x56 (>= 3136 pixels)
    assert [x.problem for x in ds[0:2]] == ["What is 2 + 2?", "Q2"]
    assert list(ds)[1].problem == "Q2"
    # an answer in display maths below the header: the whole display, as the rewards read it (was "$$")
    display = SOL.replace("is: 4", "is:\n$$\n\\frac{1}{2}\n$$")
    assert load_dataset(write_rows(tmp_path, [row(solution=display)], name="d.jsonl"))[0].answer == "$$ \\frac{1}{2} $$"


@pytest.mark.parametrize("bad,match", [
    (row(problem=...), "missing field 'problem'"),
    (row(solution=...), "missing field 'solution'"),
    (row(problem=""), "'problem' must be a non-empty string"),
    (row(key_steps=...), "missing field 'key_steps'"),
    (row(key_steps={"steps": []}), "malformed key_steps.*'Steps'"),
    (row(key_steps=[["ok"], []]), "malformed key_steps.*group 1"),
    (row(key_steps=[["ok", ""]]), "malformed key_steps.*empty"),
    (row(key_steps="not json"), "malformed key_steps"),
    (row(key_steps=5), "malformed key_steps"),
    (row(solution="no answer line"), "final answer"),
    (row(solution="### The final answer is:   "), "final answer"),
    (row(image_path="img/missing.png"), "does not exist"),
    # was: "<folder>/https:/example.com/a.png does not exist"
    (row(image_path="https://example.com/a.png"), r"image_path 'https://example.com/a.png' is a URL: images are "
                                                  "read from local files only"),
    (row(image_path="img"), r"image \S*img is a directory, not an image file"),
    (row(image_path=..., image=...), "missing field 'image_path'"),
    (row(image_path="notimage.txt"), "not a readable image"),
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object"),
    # a pre-rendered prompt: the processor would want a second image (a training-time failure)
    (row(problem="<|vision_start|><|image_pad|><|vision_end|>What is 2 + 2?"), r"'problem' holds <\|vision_start\|>, one of"),
    (row(solution=SOL + "<|im_end|>"), r"'solution' holds <\|im_end\|>"),
    # an emoji cut in half: the tokenizer's TypeError at the first batch, or at the first evaluation
    (row(problem="Count \ud83d the shapes"), r"field 'problem' holds a lone surrogate \(U\+D83D\)"),
    (row(key_steps=[["a \udfff"]]), "field 'key_steps' holds a lone surrogate"),
    (row(family={"note": ["x\ud800"]}), "field 'family' holds a lone surrogate"),
])
def test_bad_rows_name_file_row_and_problem(tmp_path, bad, match):
    (tmp_path / "notimage.txt").write_text("hello")
    path = write_rows(tmp_path, [row(), bad])
    with pytest.raises(DataError, match=match) as ei:
        load_dataset(path)
    assert f"{path}:2" in str(ei.value)


def test_skip_bad_rows_counts_and_reports_once(tmp_path, caplog):
    path = write_rows(tmp_path, [row(), row(solution="none"), "{oops", row(problem="Q3")])
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path, skip_bad_rows=True)
    assert len(ds) == 2 and [s.problem for s in ds] == ["What is 2 + 2?", "Q3"]
    assert [src for src, _ in ds.skipped] == [f"{path}:2", f"{path}:3"]
    warnings = [r for r in caplog.records if "skipped 2 bad row" in r.getMessage()]
    assert len(warnings) == 1


def test_key_steps_forms(tmp_path):
    assert normalize_key_steps(None) == []
    assert normalize_key_steps({"Steps": []}) == []
    assert normalize_key_steps('{"Steps": [["a"], "b"]}') == [["a"], ["b"]]
    assert normalize_key_steps([["a", 3]]) == [["a", "3"]]
    path = write_rows(tmp_path, [row(key_steps=None), row(key_steps=[["x"]])])
    assert [s.key_steps for s in load_dataset(path)] == [[], [["x"]]]


def test_image_unreadable_after_load_is_a_data_error(tmp_path):
    path = write_rows(tmp_path, [row()])
    ds = load_dataset(path)
    (tmp_path / "img" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=f"{path}:1"):
        ds[0]


@pytest.mark.parametrize("fmt", ["jpg", "png"])
@pytest.mark.parametrize("orientation,turned", [(1, False), (3, False), (6, True), (8, True)])
def test_exif_orientation_is_applied(tmp_path, orientation, turned, fmt):
    """A phone's portrait photo: landscape pixels + an EXIF orientation. The model sees it upright,
    as viewers (and transformers' load_image) show it; the header-based size agrees (a PNG's
    eXIf chunk before its image data, where PIL writes it)."""
    stored = Image.new("RGB", (112, 56), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 56, 56))  # the left half red
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / f"img.{fmt}", exif=exif, **({"quality": 95} if fmt == "jpg" else {}))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(image_path=f"img.{fmt}")) + "\n")
    ds = load_dataset(path, min_pixels=56 * 56, max_pixels=112 * 56)
    img = ds[0].image
    upright = __import__("PIL.ImageOps").ImageOps.exif_transpose(Image.open(tmp_path / f"img.{fmt}"))
    assert img.size == upright.size == ((56, 112) if turned else (112, 56))
    assert ds.prompt_parts(0)[1] == (img.height, img.width)
    for xy in [(5, 5), (img.width - 5, img.height - 5)]:
        assert max(abs(a - b) for a, b in zip(img.getpixel(xy), upright.getpixel(xy))) < 8, xy


def test_the_header_check_decodes_no_png(tmp_path, monkeypatch):
    """Loading reads each image's header only: PIL's getexif() decoded every PNG without EXIF to
    look for an eXIf chunk after the image data (11 s of 12 s for 20,000 rows)."""
    from PIL import ImageFile

    for i, mode in enumerate(("RGB", "RGBA", "P", "L")):
        Image.new(mode, (40 + i, 30)).save(tmp_path / f"i{i}.png")
    path = write_rows(tmp_path, [row(image_path=f"i{i}.png") for i in range(4)])
    calls = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: calls.append(1) or real(self))
    ds = load_dataset(path)
    assert len(ds) == 4 and calls == []
    assert ds[0].image.size and calls  # the access decodes


def test_the_load_reads_each_files_header_once(tmp_path, monkeypatch, caplog):
    """Rows naming one file (R1-VL data: ~52 rows a file) have its header read once; it was read
    per row (80 s of a 119 s load at 260,000 rows naming 5,000 files). A file's failing header
    fails each row naming it, with its own message; a file rewritten between two loads is read again."""
    from r1vl.data import loader

    Image.new("RGB", (70, 30), "blue").save(tmp_path / "img_b.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    rows = [row() for _ in range(30)] + [row(image_path="img_b.png")] * 3 + [row(image_path="bad.png")] * 2
    path = write_rows(tmp_path, rows)
    opened = []
    real = loader._ImageRef.open
    monkeypatch.setattr(loader._ImageRef, "open", lambda self: opened.append(self.path) or real(self))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path, skip_bad_rows=True)
    assert len(ds) == 33 and sorted(set(opened)) == sorted(opened)  # each file once
    assert len(opened) == 3
    assert [ds.image_sizes()[i] for i in (0, 29, 30, 32)] == [(60, 40)] * 2 + [(70, 30)] * 2
    assert len(ds.skipped) == 2 and all("bad.png is not a readable image" in why for _, why in ds.skipped)
    assert [where for where, _ in ds.skipped] == [f"{path}:34", f"{path}:35"]
    Image.new("RGB", (90, 30)).save(tmp_path / "img_b.png")
    os.utime(tmp_path / "img_b.png", ns=(1, 1))  # (another size and time: another file_key)
    assert load_dataset(path, skip_bad_rows=True).image_sizes()[30] == (90, 30)


def test_a_json_lines_file_is_read_a_line_at_a_time(tmp_path):
    """The loader held the file's bytes, its text and its list of lines at once while it parsed
    (about 6x the file's size at its peak: 2.8 GB for a 487 MB file); read a line at a time the
    peak is the rows kept plus one line. Python's own allocations, traced."""
    import gc
    import tracemalloc

    long = "### Step 1: " + "x = 1 + 1; " * 150 + "\n" + SOL  # a ~1.7 KB solution, as R1-VL's
    path = write_rows(tmp_path, [row(solution=long, problem=f"Question {i}?") for i in range(3000)])
    size = path.stat().st_size
    gc.collect()
    tracemalloc.start()
    try:
        ds = load_dataset(path, check_images=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == 3000 and ds[2999].problem.startswith("Question 2999?")
    assert peak < 3.0 * size, (peak / size)


def test_decompression_bomb_is_a_bad_row(tmp_path, monkeypatch):
    """An image over PIL's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS; PIL raises an
    Exception subclass, not an OSError) is a bad row like any other, not a crash."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 40 = 2400 pixels > 2000
    path = write_rows(tmp_path, [row(), row(image_path="img/b.png")])
    Image.new("RGB", (20, 20)).save(tmp_path / "img" / "b.png")
    with pytest.raises(DataError, match=r"data.jsonl:1: image .*a.png has too many pixels to decode safely"):
        load_dataset(path)
    assert len(load_dataset(path, skip_bad_rows=True)) == 1
    ds = load_dataset(path, check_images=False)
    with pytest.raises(DataError, match="data.jsonl:1: cannot load image"):
        ds[0]
    assert "downscale the file" in ds.image_problem(0) and ds.image_problem(1) is None


def test_truncated_image_is_found_by_decoding_only(tmp_path):
    """A file cut short (a failed download) keeps a readable header: loading passes, decoding
    fails; image_problem says why."""
    path = write_rows(tmp_path, [row(), row()], image_size=(200, 200))
    Image.effect_noise((200, 200), 60).convert("RGB").save(tmp_path / "img" / "a.png")
    raw = (tmp_path / "img" / "a.png").read_bytes()
    (tmp_path / "img" / "a.png").write_bytes(raw[: len(raw) // 2])
    ds = load_dataset(path)
    assert len(ds) == 2
    assert "truncated" in ds.image_problem(1)
    with pytest.raises(DataError, match="data.jsonl:2: cannot load image"):
        ds[1]


def test_the_decode_check_reads_each_file_once_and_a_large_jpeg_at_a_reduced_scale(tmp_path, monkeypatch):
    """The start-up decode check decoded a file once per row naming it, and every JPEG in full:
    a 4000x3000 photo took ~100 ms, 4 rows about one image 4 decodes. Now each file is decoded
    once, a JPEG at the smallest DCT scale still covering its resized size (PIL's draft); the
    training access still decodes in full, and a cut JPEG still fails the check."""
    from PIL import ImageFile

    from r1vl.train import image_problems

    write_rows(tmp_path, [])
    noise = Image.effect_noise((60, 45), 80).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    noise.save(tmp_path / "img" / "a.jpg", quality=90)
    Image.new("RGB", (40, 30)).save(tmp_path / "img" / "b.png")
    path = write_rows(tmp_path, [row(image_path="img/a.jpg")] * 3 + [row(image_path="img/b.png")])
    sizes = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",  # each decode (a later load() of a decoded image: none)
                        lambda self: (sizes.append(self.size) if self.tile else None) or real(self))
    ds = load_dataset(path, max_pixels=200704)
    assert image_problems(ds, range(4)) == [None] * 4
    assert sizes == [(600, 450), (40, 30)]  # 2400/4 >= 504, 1800/4 >= 364 (the resized 504x364); /8 not
    sizes.clear()
    assert ds[1].image.size == (504, 364) and sizes == [(2400, 1800)]  # training's pixels: a full decode
    raw = (tmp_path / "img" / "a.jpg").read_bytes()
    (tmp_path / "img" / "a.jpg").write_bytes(raw[: len(raw) * 2 // 3])
    ds = load_dataset(path, max_pixels=200704)
    problems = [ds.image_problem(i) for i in range(4)]
    assert all("truncated" in p for p in problems[:3]) and problems[3] is None, problems


def test_the_trainers_decode_check_decodes_each_file_once_in_threads(tmp_path, monkeypatch):
    """r1vl.train.image_problems (the trainer's and the eval CLI's check, in threads): rows about
    one image file share one decode, a cut file's rows all report it, in row order. In threads,
    neighbouring rows about the same image were each decoded, side by side."""
    import torch

    from r1vl.train import image_problems

    write_rows(tmp_path, [])
    for name in ("a", "b", "c"):
        Image.effect_noise((120, 90), 60).convert("RGB").save(tmp_path / "img" / f"{name}.png")
    raw = (tmp_path / "img" / "b.png").read_bytes()
    (tmp_path / "img" / "b.png").write_bytes(raw[: len(raw) // 2])
    names = ["a", "a", "b", "b", "b", "c", "a", "c"] * 2
    path = write_rows(tmp_path, [row(image_path=f"img/{n}.png") for n in names])
    ds = load_dataset(path)
    calls = []
    real = ds.image_problem
    monkeypatch.setattr(ds, "image_problem", lambda i: calls.append(i) or real(i))
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        problems = image_problems(ds, range(len(ds)))
    finally:
        torch.set_num_threads(before)
    assert sorted(calls) == [0, 2, 5]
    assert [p is not None and "truncated" in p for p in problems] == [n == "b" for n in names]


def test_a_line_that_is_not_utf8_is_a_bad_row(tmp_path, caplog):
    """One Latin-1 byte in one row: that row is bad, named by its line (skip_bad_rows leaves it
    out); it rejected the whole file, by byte offset, even with skip_bad_rows. A .json array
    cannot be read row by row: the file is refused, naming the line."""
    write_rows(tmp_path, [])
    rows = [json.dumps(row(problem=f"Q{i}")).encode() for i in range(4)]
    rows[2] = rows[2].replace(b"Q2", b"caf\xe9")
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(rows) + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(byte 0xe9 at byte \d+ of the line"):
        load_dataset(path)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(path, skip_bad_rows=True)
    assert [s.problem for s in ds] == ["Q0", "Q1", "Q3"] and [src for src, _ in ds.skipped] == [f"{path}:3"]
    arr = tmp_path / "d.json"
    arr.write_bytes(b"[\n" + b",\n".join(rows) + b"\n]")
    with pytest.raises(DataError, match=rf"^{arr}:4: not UTF-8 text \(byte 0xe9"):
        load_dataset(arr, skip_bad_rows=True)


def test_a_run_directory_given_as_data_suggests_its_test_split(tmp_path):
    """data.test=runs/X: the hint named the run's metrics.jsonl / rollouts.jsonl as data files."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("metrics.jsonl", "rollouts.jsonl", "skipped_rows.jsonl"):
        (run / name).write_text("{}\n")
    with pytest.raises(DataError) as e:
        load_dataset(run)
    assert "metrics.jsonl" not in str(e.value) and "rollouts" not in str(e.value) and "pass a data file" in str(e.value)
    write_rows(run / "data", [row()], name="test.jsonl")
    with pytest.raises(DataError, match=f"such as {run / 'data' / 'test.jsonl'}$"):
        load_dataset(run)


def test_a_file_url_image_path_is_read_as_its_path(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), "red").save(tmp_path / "a b.png")
    path = write_rows(tmp_path, [row(image_path=(tmp_path / "a b.png").as_uri())])  # file:///.../a%20b.png
    assert load_dataset(path)[0].image.size[0] > 0
    with pytest.raises(DataError, match="a file URL names a host \\('images'\\)"):  # a mistyped relative path
        load_dataset(write_rows(tmp_path, [row(image_path="file://images/a.png")], name="h.jsonl"))


def test_an_image_path_that_is_not_utf8_is_read(tmp_path):
    """A file name in another encoding reads as a str with a surrogate (os.fsdecode); the
    surrogate check of the text fields left image_path alone."""
    import os

    write_rows(tmp_path, [])
    name = os.fsdecode(b"caf\xe9.png")
    Image.new("RGB", (60, 40), "red").save(tmp_path / "img" / name)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row(image_path="img/" + name)) + "\n")
    assert load_dataset(path)[0].image.size == (84, 56)


def test_joined_files_keep_their_byte_order_marks(tmp_path):
    """`cat a.jsonl b.jsonl`, each saved with a UTF-8 BOM: the second file's first row is a row."""
    write_rows(tmp_path, [])
    text = "\ufeff" + json.dumps(row()) + "\n" + "\ufeff" + json.dumps(row(problem="Q2")) + "\n"
    (tmp_path / "joined.jsonl").write_text(text, encoding="utf-8")
    assert [s.problem for s in load_dataset(tmp_path / "joined.jsonl")] == ["What is 2 + 2?", "Q2"]


def test_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "nope.jsonl")
    write_rows(tmp_path, [row()], name="train.jsonl")
    with pytest.raises(DataError, match="train.jsonl"):
        load_dataset(tmp_path)  # a plain directory is not implicit
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_dataset(tmp_path / "x.csv")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no usable rows"):
        load_dataset(empty)
    with pytest.raises(DataError, match="min_pixels"):
        load_dataset(tmp_path / "train.jsonl", min_pixels=2000, max_pixels=1000)


def test_json_array_file(tmp_path):
    write_rows(tmp_path, [])
    (tmp_path / "d.json").write_text(json.dumps([row(), row(problem="Q2")]))
    ds = load_dataset(tmp_path / "d.json")
    assert [s.problem for s in ds] == ["What is 2 + 2?", "Q2"] and ds[1].source.endswith("d.json:1")


def test_parquet_with_embedded_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    buf = io.BytesIO()
    Image.new("RGB", (84, 84), "blue").save(buf, format="PNG")
    table = pa.table({
        "image": [{"bytes": buf.getvalue(), "path": None}, {"bytes": b"junk", "path": None}],
        "problem": ["Q1", "Q2"], "solution": [SOL, SOL],
        "key_steps": ['{"Steps": [["2 + 2 = 4"]]}', None],
    })
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet:1: .*not a readable image"):
        load_dataset(tmp_path / "d.parquet")
    ds = load_dataset(tmp_path / "d.parquet", skip_bad_rows=True)
    assert len(ds) == 1 and ds[0].image.size == (84, 84) and ds[0].key_steps == [["2 + 2 = 4"]]
    assert ds[0].source.endswith("d.parquet:0")
    # the embedded bytes are read from the table when opened, not copied into every row
    assert all(r.image.data is None and r.image.fetch is not None for r in ds._rows)


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    Image.new("RGB", (84, 84), "green").save(tmp_path / "g.png")
    ds = datasets.Dataset.from_dict({
        "image": [str(tmp_path / "g.png")], "problem": ["Q"], "solution": [SOL],
        "key_steps": [{"Steps": [["2 + 2 = 4"]]}],
    }).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    loaded = load_dataset(tmp_path / "hf")
    assert len(loaded) == 1 and loaded[0].image.size == (84, 84) and loaded[0].answer == "4"
    embedded = datasets.Dataset.from_dict({
        "image": [{"bytes": (tmp_path / "g.png").read_bytes(), "path": None}], "problem": ["Q"],
        "solution": [SOL], "key_steps": [None]}).cast_column("image", datasets.Image())
    embedded.save_to_disk(str(tmp_path / "hf_bytes"))
    loaded = load_dataset(tmp_path / "hf_bytes")
    assert loaded[0].image.size == (84, 84) and loaded._rows[0].image.data is None  # read on access
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hfdict"))
    with pytest.raises(DataError, match="pass one split") as e:
        load_dataset(tmp_path / "hfdict")
    assert f"{tmp_path / 'hfdict' / 'train'}, {tmp_path / 'hfdict' / 'test'}" in str(e.value)  # each one named
    assert len(load_dataset(tmp_path / "hfdict" / "train")) == 1


def test_jsonl_line_separators_inside_strings_and_crlf(tmp_path):
    r = row(problem="first\u2028second\x85third")
    path = write_rows(tmp_path, [])
    path.write_bytes((json.dumps(r, ensure_ascii=False) + "\r\n" + json.dumps(row()) + "\r\n").encode())
    ds = load_dataset(path)
    assert len(ds) == 2 and ds[0].problem == "first\u2028second\x85third" and ds[1].source.endswith(":2")


# ------------------------------------------------------------------------------ start-up decode check

def _truncated_rows(tmp_path, n=6, bad=(1, 4)):
    """n rows with their own 120x120 noise PNG each; rows `bad` cut to half their bytes."""
    (tmp_path / "img").mkdir(exist_ok=True)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(n):
            Image.effect_noise((120, 120), 60).convert("RGB").save(tmp_path / "img" / f"{i}.png")
            if i in bad:
                raw = (tmp_path / "img" / f"{i}.png").read_bytes()
                (tmp_path / "img" / f"{i}.png").write_bytes(raw[: len(raw) // 2])
            f.write(json.dumps(row(image_path=f"img/{i}.png", problem=f"Q{i}")) + "\n")
    return tmp_path / "d.jsonl"


def _cfg(skip=False, verify=True):
    import types

    return types.SimpleNamespace(data=types.SimpleNamespace(skip_bad_rows=skip, verify_images=verify))


def test_startup_decode_check_stops_or_leaves_out(tmp_path, caplog):
    """r1vl.train.check_images: a truncated image (header intact) stops the run at start-up
    naming the row, or with data.skip_bad_rows=true is left out, instead of failing the step
    that first samples it; data.verify_images=false leaves the set as it is."""
    from r1vl.train import UserError, check_images

    ds = load_dataset(_truncated_rows(tmp_path))
    assert len(ds) == 6  # the headers read
    with pytest.raises(UserError) as e:
        check_images(ds, _cfg(), "data.train")
    msg = str(e.value)
    assert msg.startswith(f"data.train: 2 of 6 images cannot be decoded (first {ds.source(1)}: cannot load image")
    assert "data.skip_bad_rows=true" in msg
    assert check_images(ds, _cfg(verify=False), "data.train") is ds
    with caplog.at_level(logging.INFO):
        kept = check_images(ds, _cfg(skip=True), "data.train")
    assert [s.problem for s in kept] == ["Q0", "Q2", "Q3", "Q5"]  # every one decodes
    assert [s for s, _ in kept.skipped] == [ds.source(1), ds.source(4)]
    assert "the images of 6 rows decoded, 2 unreadable" in caplog.text


def test_startup_decode_check_of_the_evaluated_rows(tmp_path):
    """The held-out split: only the evaluated rows (data.eval_size) are decoded; with
    skip_bad_rows the rows moving up in place of a bad one are decoded too."""
    from r1vl.train import UserError, check_images

    ds = load_dataset(_truncated_rows(tmp_path, bad=(1, 3, 4)))
    assert check_images(ds, _cfg(), "data.test", rows=1) is ds  # row 0 alone: fine
    with pytest.raises(UserError, match="1 of 2 images"):
        check_images(ds, _cfg(), "data.test", rows=2)
    kept = check_images(ds, _cfg(skip=True), "data.test", rows=3)
    # rows 0, 2 kept; 1 out; then 3 (moved up) out, then 4 out, then 5 kept
    assert [s.problem for s in kept][:3] == ["Q0", "Q2", "Q5"]
    assert [s for s, _ in kept.skipped] == [ds.source(1), ds.source(3), ds.source(4)]


def test_check_and_eval_report_a_truncated_image_before_any_work(tmp_path, capsys, monkeypatch):
    """`python -m r1vl.train --check` decodes the images; `python -m r1vl.eval` does before it
    loads the model."""
    import r1vl.eval as ev
    import r1vl.models
    from r1vl.train import main

    path = _truncated_rows(tmp_path, bad=(2,))
    args = ["--check", f"output_dir={tmp_path / 'o'}", f"data.train={path}", f"data.test={path}",
            "model.tiny.tokenizer_corpus_size=6", "model.tiny.vocab_size=300", "data.max_pixels=50000"]
    assert main(args) == 2
    assert f"data.train: 1 of 6 images cannot be decoded (first {path}:3: cannot load image" in capsys.readouterr().err
    assert main(args + ["data.skip_bad_rows=true"]) == 0
    capsys.readouterr()

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(r1vl.models, "load_pretrained", no_model)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert ev.main(["--model", str(tmp_path / "m"), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"r1vl.eval: error: 1 of the 6 evaluated images cannot be decoded (first {path}:3: ")


def test_key_steps_json_string_null_is_none():
    """A table column holding the JSON text "null" (what some exporters write for a missing value)."""
    from r1vl.data import normalize_key_steps

    assert normalize_key_steps("null") == normalize_key_steps(" null ") == []
    assert normalize_key_steps('{"Steps": null}') == []


def test_a_bad_image_met_during_training_names_the_start_up_check(tmp_path):
    """With data.verify_images=false a truncated file is met when sampled: the error names
    the row and the setting that would have found it at start-up."""
    import types

    from r1vl.train import UserError, take_samples

    ds = load_dataset(_truncated_rows(tmp_path, n=3, bad=(1,)))
    cfg = types.SimpleNamespace(data=types.SimpleNamespace(verify_images=False))
    assert [s.problem for s in take_samples(ds, [0, 2], cfg)] == ["Q0", "Q2"]
    with pytest.raises(UserError, match=r"d.jsonl:2: cannot load image .* \(data.verify_images=true"):
        take_samples(ds, [0, 1], cfg)
    cfg.data.verify_images = True  # checked at start-up: a DataError here is a plain error
    with pytest.raises(DataError):
        take_samples(ds, [1], cfg)

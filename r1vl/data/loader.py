"""Loaders for the R1-VL RL format: JSON Lines, a Hugging Face `datasets` directory, or parquet.

Every row has
  image_path  the image file, relative to the data file's directory (or absolute);
              tabular sources may carry an `image` column instead (PIL image,
              {"bytes", "path"} struct as Hugging Face writes it, raw bytes, or a path)
  problem     the question (the trainer adds the R1-VL instruction with `format_prompt`)
  solution    a reference response containing `### The final answer is: X`
  key_steps   {"Steps": [[phrasing, ...], ...]}, a list of such groups, or null /
              empty for none (derive them with `python -m r1vl.data.keysteps`);
              a JSON string holding one of those is accepted too
Other columns are kept in `Sample.meta`.

Rows are validated when the data set is loaded (every field, the key-step
structure, the final answer, and that each image exists and has a readable
header); images are decoded, turned upright by their EXIF orientation, converted
to RGB and resized only when an item is accessed (`image_problem(i)` decodes one
to find a file that is truncated or corrupt past its header). A bad row raises `DataError` naming the file, the row and what is
wrong; with `skip_bad_rows=True` bad rows are skipped, counted, and reported
once (a warning, and `dataset.skipped`). Rows are numbered from 1 in JSON
Lines files (line numbers) and from 0 in .json arrays and parquet / `datasets`
tables (their index).
"""
from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageOps, UnidentifiedImageError

from r1vl.data.format import FINAL_ANSWER, answer_line
from r1vl.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    MAX_ASPECT,
    check_pixel_bounds,
    resize_image,
    smart_resize,
)

logger = logging.getLogger(__name__)

_KNOWN = ("image_path", "image", "problem", "solution", "key_steps")

# Qwen2-VL's chat and image markers: the processor reads them in a row's text as markers (an
# <|image_pad|> wants an image, an <|im_end|> ends the turn); the prompt format adds its own
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


class DataError(ValueError):
    """A data file or row is not in the expected format (the message names the file and row)."""


class RowError(DataError):
    """One row of a data file is bad (skip_bad_rows=True would have left it out)."""


@dataclass
class Sample:
    problem: str
    solution: str
    key_steps: list[list[str]]  # groups of equivalent phrasings; [] for none
    answer: str  # the solution's final answer, as the rewards read it (a display-maths block whole)
    source: str  # "file:row"
    image: Any = None  # PIL.Image.Image (RGB, resized) or None
    meta: dict = field(default_factory=dict)  # the row's other fields (e.g. "family", "id")


def normalize_key_steps(value: Any) -> list[list[str]]:
    """Validate key steps and return them as a list of groups of non-empty strings.

    Raises ValueError (with what is wrong) for anything else.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError("key_steps is a string that is not JSON; expected "
                             '{"Steps": [[phrasing, ...], ...]} or a list of groups') from None
        if value is None:  # the JSON string "null", as a table column may hold it: none
            return []
    if isinstance(value, dict):
        if "Steps" not in value:
            raise ValueError(f"key_steps object has no 'Steps' key (keys: {sorted(map(str, value))})")
        value = value["Steps"]
        if value is None:
            return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"key_steps must be a list of groups, got {type(value).__name__}")
    groups = []
    for gi, group in enumerate(value):
        if isinstance(group, str):
            group = [group]
        if not isinstance(group, (list, tuple)) or not group:
            raise ValueError(f"key_steps group {gi} must be a non-empty list of strings, got {group!r}")
        alts = []
        for alt in group:
            if isinstance(alt, (int, float)) and not isinstance(alt, bool):
                alt = str(alt)
            if not isinstance(alt, str) or not alt.strip():
                raise ValueError(f"key_steps group {gi} has an empty or non-string phrasing {alt!r}")
            alts.append(alt)
        groups.append(alts)
    return groups


# ------------------------------------------------------------------------------ images

class _ImageRef:
    """Where an image comes from: a file path or in-memory bytes (or an already-open PIL image)."""

    __slots__ = ("path", "data", "pil", "fetch", "size")

    def __init__(self, path: str | None = None, data: bytes | None = None, pil: Any = None,
                 fetch: Callable[[], bytes] | None = None):
        # fetch: reads the bytes from the table when needed (a datasets / parquet column),
        # so that a data set of embedded images is not copied into every rank's memory
        self.path, self.data, self.pil, self.fetch = path, data, pil, fetch
        self.size: tuple[int, int] | None = None  # (width, height) once check() has read the header

    def describe(self) -> str:
        return self.path if self.path else "embedded image"

    def file_key(self) -> tuple | None:
        """(path, size, modification time) of a file image: rows naming the same unchanged file
        decode alike (None: not a file, or unreadable)."""
        if not self.path or self.data is not None or self.pil is not None or self.fetch is not None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return self.path, st.st_size, st.st_mtime_ns

    def open(self) -> Image.Image:
        if self.pil is not None:
            return self.pil
        if self.fetch is not None:
            return Image.open(io.BytesIO(self.fetch()))
        if self.data is not None:
            return Image.open(io.BytesIO(self.data))
        return Image.open(self.path)

    def check(self) -> None:
        """Header check: the file exists and PIL recognises it; raises ValueError otherwise."""
        if self.path and self.data is None and self.pil is None and self.fetch is None \
                and not os.path.isfile(self.path):
            if os.path.isdir(self.path):
                raise ValueError(f"image {self.path} is a directory, not an image file")
            if os.path.exists(self.path):
                raise ValueError(f"image {self.path} is not a regular file")
            raise ValueError(f"image {self.path} does not exist")
        try:
            if self.pil is not None:
                w, h = self.pil.size
                turned = _orientation(self.pil, decode=False) >= 5
            else:
                with self.open() as img:
                    w, h = img.size
                    turned = _orientation(img, decode=False) >= 5
        except _IMAGE_ERRORS as e:
            raise ValueError(_unreadable(self, e)) from None
        if turned:  # EXIF orientation 5..8: a quarter turn, width and height swap once decoded
            w, h = h, w
        self.size = (w, h)
        if w <= 0 or h <= 0:
            raise ValueError(f"image {self.describe()} is empty ({w}x{h})")
        if max(w, h) / min(w, h) > MAX_ASPECT:
            raise ValueError(f"image {self.describe()} is {w}x{h}: aspect ratio above {MAX_ASPECT}, "
                             "which Qwen2-VL cannot take")


# what PIL raises for a file it cannot decode; DecompressionBombError (an image above twice
# PIL.Image.MAX_IMAGE_PIXELS) derives from Exception alone
_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


_BOMB_HINT = "; downscale the file (it is resized to data.max_pixels anyway)"


def _unreadable(ref: _ImageRef, e: Exception) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return f"image {ref.describe()} has too many pixels to decode safely ({e}){_BOMB_HINT}"
    return f"image {ref.describe()} is not a readable image ({e})"


def _orientation(img: Image.Image, decode: bool = True) -> int:
    """img's EXIF orientation: 1 upright, 2 to 8 mirrored and/or turned (5 to 8: a quarter turn).
    decode=False (the header check): PIL looks for a PNG's eXIf chunk after the image data by
    decoding the whole image (0.5 ms of every row's 0.6 ms at load, for every PNG without EXIF);
    such a chunk counts as upright there. The decode applies it, which can only swap width and
    height: the same image tokens."""
    try:
        if not decode and img.format == "PNG" and "exif" not in img.info:
            return 1
        o = img.getexif().get(0x0112, 1)
        return o if isinstance(o, int) and 1 <= o <= 8 else 1
    except Exception:  # noqa: BLE001 -- a malformed EXIF block: taken as upright, as PIL shows it
        return 1


@dataclass
class _Embedded:
    """A table row's embedded image, read again from the table when it is opened."""

    fetch: Callable[[], bytes]
    path: str | None


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # http://, https://, s3://, file://, ...


def _local_path(p: str, key: str, base: Path) -> str:
    """`p` relative to the data file's folder (or absolute; a file:// URL is read as its path); another
    URL is refused by name, not joined onto that folder ("<folder>/https:/host/a.png does not exist")."""
    if p.startswith("file://"):
        from urllib.parse import unquote, urlparse

        url = urlparse(p)
        if url.netloc not in ("", "localhost"):  # file://images/a.png: "images" would be a host, dropped
            raise ValueError(f"{key} {p!r}: a file URL names a host ({url.netloc!r}); write a local path "
                             "(relative to the data file, or absolute: file:///abs/path)")
        return unquote(url.path)
    if _URL.match(p):
        raise ValueError(f"{key} {p!r} is a URL: images are read from local files only (a path relative to the "
                         "data file, or absolute); download them first")
    return str(base / p)


def _image_ref(row: dict, base: Path) -> _ImageRef:
    if row.get("image_path") not in (None, ""):
        p = row["image_path"]
        if not isinstance(p, str):
            raise ValueError(f"image_path must be a string, got {type(p).__name__}")
        return _ImageRef(path=_local_path(p, "image_path", base))
    img = row.get("image")
    if img is None:
        raise ValueError("missing field 'image_path' (or an 'image' column)")
    if isinstance(img, Image.Image):
        return _ImageRef(pil=img)
    if isinstance(img, (bytes, bytearray)):
        return _ImageRef(data=bytes(img))
    if isinstance(img, str):
        return _ImageRef(path=_local_path(img, "image", base))
    if isinstance(img, _Embedded):
        return _ImageRef(fetch=img.fetch, path=img.path)
    if isinstance(img, dict):  # Hugging Face's {"bytes": ..., "path": ...}
        if img.get("bytes"):
            return _ImageRef(data=bytes(img["bytes"]), path=img.get("path") or None)
        if img.get("path"):
            return _ImageRef(path=_local_path(img["path"], "image path", base))
    raise ValueError(f"cannot read the 'image' column value of type {type(img).__name__}")


# ------------------------------------------------------------------------------ rows

@dataclass
class _Row:
    problem: str
    solution: str
    key_steps: list[list[str]]
    answer: str
    source: str
    image: _ImageRef
    meta: dict


def _lone_surrogate(value: Any, field: str, depth: int = 0) -> str | None:
    """Where `value` (a row's field, walked through lists and objects) holds a string UTF-8
    cannot encode (a lone surrogate: JSON's "\\ud83d" of an emoji cut in half), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"field '{field}' holds a lone surrogate (U+{ord(value[e.start]):04X}), which UTF-8 cannot encode"
    elif depth < 20 and isinstance(value, dict):
        for k, v in value.items():
            why = _lone_surrogate(k, field, depth + 1) or _lone_surrogate(v, field, depth + 1)
            if why:
                return why
    elif depth < 20 and isinstance(value, (list, tuple)):
        for v in value:
            why = _lone_surrogate(v, field, depth + 1)
            if why:
                return why
    return None


def _validate(row: Any, base: Path, source: str, check_images: bool, headers: dict | None = None) -> _Row:
    """headers: the header checks so far, by file_key (a file many rows name is read once: 5,000
    files named by 260,000 rows took 80 s of a 119 s load read per row)."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    for key in ("problem", "solution"):
        if key not in row or row[key] is None:
            raise ValueError(f"missing field '{key}'")
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"field '{key}' must be a non-empty string")
        marker = next((t for t in CONTROL_TOKENS if t in row[key]), None)
        if marker:
            raise ValueError(f"field '{key}' holds {marker}, one of the model's chat / image markers, which the "
                             "processor would read as a marker; the prompt format adds the image and chat markers "
                             "itself: remove it from the row")
    for key, value in row.items():
        if key in ("image_path", "image"):  # a file name not in UTF-8 reads as one (surrogateescape): fine
            continue
        why = _lone_surrogate(value, str(key))
        if why:
            raise ValueError(f"{why}; fix the row")
    if "key_steps" not in row:
        raise ValueError("missing field 'key_steps' (derive it with `python -m r1vl.data.keysteps IN OUT` from a "
                         "JSON Lines / .json file, or set it to null for none)")
    try:
        key_steps = normalize_key_steps(row["key_steps"])
    except ValueError as e:
        raise ValueError(f"malformed key_steps: {e}") from None
    answer = answer_line(row["solution"])
    if answer is None:
        raise ValueError(f"the solution has no non-empty '{FINAL_ANSWER}' line")
    ref = _image_ref(row, base)
    if check_images:
        key = None if headers is None else ref.file_key()
        if key is None:
            ref.check()
        else:
            if key not in headers:
                try:
                    ref.check()
                    headers[key] = ref.size
                except ValueError as e:
                    headers[key] = str(e)
            if isinstance(headers[key], str):
                raise ValueError(headers[key])
            ref.size = headers[key]
    meta = {k: v for k, v in row.items() if k not in _KNOWN}
    return _Row(row["problem"], row["solution"], key_steps, answer, source, ref, meta)


class R1VLDataset(Sequence):
    """A read-only sequence of `Sample`s; images are opened and resized on access."""

    def __init__(self, path: str, rows: list[_Row], *, min_pixels: int, max_pixels: int,
                 skipped: list[tuple[str, str]] | None = None):
        self.path = path
        self._rows = rows
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.skipped = skipped or []  # (source, reason) of every skipped bad row
        # rows may be decoded in threads at once (train.map_images): no in-memory PIL image, which
        # two rows could share (PIL's lazy load of one object is not thread-safe)
        self.threadsafe_images = not any(r.image.pil is not None for r in rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r = self._rows[i]
        return Sample(problem=r.problem, solution=r.solution, key_steps=r.key_steps, answer=r.answer,
                      source=r.source, image=self._load_image(r), meta=dict(r.meta))

    def source(self, i: int) -> str:
        """Where row i comes from ("file:line" / "file:index")."""
        return self._rows[i].source

    def prompt_parts(self, i: int) -> tuple[str, tuple[int, int] | None]:
        """Row i's problem and the (height, width) its image is resized to, read from the image
        header alone (no decode): what the prompt's length depends on."""
        r = self._rows[i]
        if r.image.size is None:  # loaded with check_images=False
            try:
                r.image.check()
            except ValueError as e:
                raise DataError(f"{r.source}: {e}") from None
        w, h = r.image.size
        return r.problem, smart_resize(h, w, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def image_sizes(self) -> list[tuple[int, int] | None]:
        """Each row's image (width, height) as its header gives it (upright), None where the
        header has not been read (loaded with check_images=False)."""
        return [r.image.size for r in self._rows]

    def text_only(self, n: int | None = None) -> list[Sample]:
        """The first n rows (all: None) as Samples without their images (nothing decoded)."""
        return [Sample(problem=r.problem, solution=r.solution, key_steps=r.key_steps, answer=r.answer,
                       source=r.source, meta=dict(r.meta)) for r in self._rows[:n]]

    def without(self, drop: dict[int, str]) -> "R1VLDataset":
        """A copy without rows `drop` ({index: reason}); they join `skipped`."""
        rows = [r for i, r in enumerate(self._rows) if i not in drop]
        skipped = self.skipped + [(self._rows[i].source, why) for i, why in sorted(drop.items())]
        return R1VLDataset(self.path, rows, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                           skipped=skipped)

    def image_file_key(self, i: int) -> tuple | None:
        """Row i's image file as (path, size, modification time); None: not a file."""
        return self._rows[i].image.file_key()

    def image_problem(self, i: int) -> str | None:
        """Why row i's image cannot be decoded as an access would decode it, or None. A
        header that reads may hide a truncated or corrupt file: only decoding finds it. A JPEG
        is decoded at the smallest of its DCT scales that still covers the resized size (PIL's
        draft: every coefficient is still read, so a cut or corrupt file still fails; 4000x3000
        photos check about 5x faster), the rest of the access path (turn, RGB, resize) run on
        it. (Rows naming one file: r1vl.train.image_problems decodes it once, by image_file_key.)"""
        r = self._rows[i]
        try:
            self._load_image(r, draft=True)
        except DataError as e:
            return str(e).removeprefix(f"{r.source}: ")
        return None

    def _load_image(self, r: _Row, draft: bool = False) -> Image.Image:
        """Decoded, turned upright by its EXIF orientation (as image viewers and transformers'
        load_image show it), RGB, resized. `draft`: a JPEG decoded at a reduced DCT scale no
        smaller than the resized size (the check's: pixels near, not equal, to a full decode's)."""
        try:
            img = r.image.open()
            if draft and r.image.pil is None and img.format == "JPEG":
                # (the stored sides: smart_resize is symmetric, so a file stored a quarter turn
                # from upright needs no swap)
                h, w = smart_resize(img.height, img.width, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
                img.draft(None, (w, h))
            img.load()
            if _orientation(img) != 1:
                img = ImageOps.exif_transpose(img)
            return resize_image(img, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except _IMAGE_ERRORS as e:
            hint = _BOMB_HINT if isinstance(e, Image.DecompressionBombError) else ""
            raise DataError(f"{r.source}: cannot load image {r.image.describe()}: {e}{hint}") from None

    def __repr__(self) -> str:
        return f"R1VLDataset({self.path!r}, {len(self)} rows, {len(self.skipped)} skipped)"


# ------------------------------------------------------------------------------ sources

def _jsonl_rows(path: Path):
    """(row number, parsed object or an Exception) per non-blank line; a .json array is accepted too.
    JSON Lines are read a line at a time: the whole file, its text and its lines held at once
    peaked at about 6x the file's size (2.8 GB for a 487 MB file of 260,000 rows)."""
    if path.suffix == ".json" and _json_array(path):
        yield from _json_array_rows(path)
        return
    with open(path, "rb") as f:
        # lines end at b"\n" alone: str.splitlines() would also break at U+2028 & co., which JSON
        # strings may hold unescaped; a b"\n" byte is never inside a UTF-8 sequence
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                line = raw.decode("utf-8")  # a row's stray byte makes that row bad, not the file
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of "
                                         f"the line: {e.reason}); re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.lstrip("\ufeff"))  # files joined by cat keep their BOMs
            except json.JSONDecodeError as e:
                yield lineno, ValueError(f"invalid JSON ({e.msg} at column {e.colno})")


def _json_array(path: Path) -> bool:
    """Whether the file's first character, past a BOM and white space, is "["."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            chunk = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if chunk:
                return chunk.startswith(b"[")
    return False


def _json_array_rows(path: Path):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}: {e.reason}); re-encode "
                        "the file as UTF-8") from None
    del raw
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None
    del text
    yield from enumerate(items)


def _table_rows(table_like, n: int):
    for i in range(n):
        yield i, table_like(i)


def _parquet_source(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow, or r1vl[dev])") from None
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises many types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    columns = table.column_names

    def row(i):
        r = {c: table.column(c)[i].as_py() for c in columns}
        return _lazy_image(r, lambda: table.column("image")[i].as_py())

    return _table_rows(row, table.num_rows)


def _lazy_image(row: dict, read: Callable[[], Any]) -> dict:
    """The row with its embedded image bytes ({"bytes", "path"} or raw bytes) replaced by a
    reader of the table, `read()` giving the column's value again."""
    img = row.get("image")
    if isinstance(img, dict) and img.get("bytes"):
        row["image"] = _Embedded(lambda: bytes(read()["bytes"]), img.get("path") or None)
    elif isinstance(img, (bytes, bytearray)) and img:
        row["image"] = _Embedded(lambda: bytes(read()), None)
    return row


def _hf_source(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a Hugging Face datasets directory needs the `datasets` package "
                        "(pip install datasets, or r1vl[dev])") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a Hugging Face datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if len(splits) != 1:
            raise DataError(f"{path}: a DatasetDict with splits {splits}; pass one split's directory: "
                            + ", ".join(str(path / s) for s in splits))  # the eval CLI wants test, not train
        ds = ds[splits[0]]
    if "image" in ds.column_names and isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # decode lazily, ourselves

    images = ds.select_columns(["image"]) if "image" in ds.column_names else None

    def row(i):
        r = ds[i]
        return r if images is None else _lazy_image(r, lambda: images[i]["image"])

    return _table_rows(row, len(ds))


# what an r1vl run directory holds beside its data/ (never a data file to suggest)
RUN_FILES = ("metrics.jsonl", "rollouts.jsonl", "skipped_rows.jsonl")


def data_files_in(path: Path) -> list[Path]:
    """Data files a directory that is not one may have meant: a run directory's data/test.jsonl,
    else up to three of its .jsonl / .parquet files (not a run's own outputs)."""
    if (path / "data" / "test.jsonl").is_file():
        return [path / "data" / "test.jsonl"]
    return [f for f in sorted(path.glob("*.jsonl")) + sorted(path.glob("*.parquet")) if f.name not in RUN_FILES][:3]


def _is_hf_dir(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_dataset(path: str | os.PathLike, *, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, skip_bad_rows: bool = False,
                 check_images: bool = True) -> R1VLDataset:
    """Load and validate a data set: a .jsonl (or .json array) file, a .parquet file, or a
    Hugging Face `datasets` directory (load_from_disk). Returns a Sequence of `Sample`.

    Image paths are relative to the file's directory (the dataset directory for
    `datasets`). Bad rows raise `DataError` unless skip_bad_rows. check_images=False
    skips the per-row image header check (faster for huge sets; errors then surface
    on access).
    """
    path = Path(path)
    try:
        check_pixel_bounds(min_pixels, max_pixels)
    except ValueError as e:
        raise DataError(f"min_pixels/max_pixels: {e}") from None
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if not _is_hf_dir(path):
            hint = data_files_in(path)
            raise DataError(f"{path}: a directory but not a Hugging Face datasets directory; pass a data "
                            f"file{' such as ' + ', '.join(map(str, hint)) if hint else ''}")
        source, base = _hf_source(path), path
    elif path.suffix in (".jsonl", ".json"):
        source, base = _jsonl_rows(path), path.parent
    elif path.suffix == ".parquet":
        source, base = _parquet_source(path), path.parent
    else:
        raise DataError(f"{path}: unsupported data file (expected .jsonl, .json, .parquet or a "
                        "datasets directory)")

    rows: list[_Row] = []
    skipped: list[tuple[str, str]] = []
    headers: dict = {}  # file_key -> (width, height), or why its header check failed
    for number, obj in source:
        where = f"{path}:{number}"
        try:
            if isinstance(obj, Exception):
                raise obj
            rows.append(_validate(obj, base, where, check_images, headers))
        except ValueError as e:
            if not skip_bad_rows:
                raise RowError(f"{where}: {e}") from None
            skipped.append((where, str(e)))
    if skipped:
        logger.warning("%s: skipped %d bad row(s) of %d; first: %s: %s", path, len(skipped),
                       len(skipped) + len(rows), skipped[0][0], skipped[0][1])
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(skipped)} bad)" if skipped else ""))
    return R1VLDataset(str(path), rows, min_pixels=min_pixels, max_pixels=max_pixels, skipped=skipped)


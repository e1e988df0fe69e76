"""Greedy evaluation on a held-out split: accuracy (final answer correct), mean StepRAR,
mean StepRVR. Used by train.py after the warm-up and after StepGRPO, and as a command line tool.

Usage:

    python -m r1vl.eval --model runs/default/final --data runs/default/data [--limit 200]
    torchrun --nproc-per-node 4 -m r1vl.eval --model ... --data ...   (one GPU per rank)

--model: a checkpoint directory (HF layout, as the trainer saves); --data: a directory
holding test.jsonl (the built-in task's layout), or any file / dataset directory that
r1vl.data.load_dataset reads. Prints one JSON object (and writes it with --out; its parent
directory is created); --outputs FILE also writes every item's completion and scores (JSON
lines, data order). Neither may name the data file evaluated. `reward_timeouts` counts the
answers whose math-verify check ran out of time (--reward-timeout-s): they are scored wrong.
When --model sits in a run written by r1vl.train (runs/X/final, runs/X/warmup,
runs/X/checkpoints/<phase>-<step>, with runs/X/config.yaml), --max-new-tokens, --min-pixels,
--max-pixels, --alpha, --variant, --accuracy-weight, --validity-weight, --reward-timeout-s and
--skip-bad-rows default to that run's values, as the trainer's own evaluation uses them; explicit flags win.
"""
from __future__ import annotations

if __name__ == "__main__":  # a torchrun worker dies with its launcher from here on (r1vl.launch)
    from r1vl.launch import die_with_launcher

    die_with_launcher()

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

from r1vl.files import STATE_FILE, write_replace
from r1vl.rollout.base import Prompt, SamplingConfig

log = logging.getLogger("r1vl.eval")  # also when run as `python -m r1vl.eval`


def make_prompt(processor, sample, template: str = "r1vl") -> Prompt:
    """The R1-VL prompt for one sample: chat template around (image, instruction + question);
    template="verbatim": around (image, problem) alone (data.prompt_template)."""
    from r1vl.data import format_prompt

    if template not in ("r1vl", "verbatim"):
        raise ValueError(f"prompt template: expected 'r1vl' or 'verbatim', got {template!r}")
    user = format_prompt(sample.problem) if template == "r1vl" else str(sample.problem)
    text = processor.chat_prompt(user, with_image=sample.image is not None)
    return Prompt(text=text, image=sample.image)


def score(texts: Sequence[str], samples: Sequence[Any], *, alpha: float = 0.1, variant: str = "paper",
          accuracy_weight: float = 1.0, validity_weight: float = 1.0, workers: int = 0,
          timeout_s: float = 5.0) -> dict[str, list[float]]:
    """StepRAR, StepRVR, their weighted total, `correct` (final answer right) and `timed_out`
    (its math-verify check ran out of time: scored wrong) per text; samples[i] is the sample
    texts[i] answers. `timeouts`: how many timed out."""
    from r1vl.rewards import score_batch

    res = score_batch(list(texts), [s.solution for s in samples], [s.key_steps for s in samples],
                      weights=(accuracy_weight, validity_weight), workers=workers, timeout_s=timeout_s,
                      alpha=alpha, variant=variant)
    return {"accuracy": [float(x) for x in res["accuracy"]],
            "validity": [float(x) for x in res["validity"]],
            "total": [float(x) for x in res["total"]],
            "correct": [float(x) for x in res["correct"]],
            "timed_out": [float(x) for x in res.get("timed_out", [0.0] * len(texts))],
            "timeouts": float(sum(res.get("num_timeouts", [0.0])))}


class ScoreJob:
    """A `score` call (fn) started now in a background thread when `background` (the trainer and
    evaluate pass reward_workers > 0: the pool's worker processes do the work, this process goes
    on generating or taking log-probs), else run by result() in the caller's thread (in-process
    scoring: math-verify's deadline is a signal, the main thread's). A pool that fails under the
    thread is scored again by result(), in the caller's thread, as score does on the main thread."""

    def __init__(self, fn: Callable[[], dict], background: bool):
        from r1vl.utils import Background

        self._fn = fn
        self._job = Background(fn, "r1vl-rewards") if background else None

    def result(self) -> dict:
        from r1vl.rewards.pool import RewardPoolError

        if self._job is None:
            return self._fn()
        try:
            return self._job.result()
        except RewardPoolError as e:
            log.warning("%s", e)
            return self._fn()

    def drop(self) -> None:
        """Waits for a background call to end, its value or error dropped."""
        if self._job is not None:
            self._job.join()


def progress_marks(total: int, lines: int = 10) -> set[int]:
    """The batches (1-based, of `total`) after which evaluate logs its progress: at most
    `lines` of them, the first and the last included, evenly spread in between."""
    if total <= 0:
        return set()
    inner = max(0, lines - 2)
    return {1, total} | {-(-k * total // (inner + 1)) for k in range(1, inner + 1)}


class EvalStopped(Exception):
    """evaluate() was asked to stop (its `stop` returned a signal number) before a batch."""

    def __init__(self, signum: int, done: int, total: int):
        super().__init__(f"evaluation stopped by signal {signum} after {done} of {total} samples")
        self.signum, self.done, self.total = signum, done, total


def evaluate(engine, processor, samples: Sequence[Any], *, max_new_tokens: int, batch_size: int = 64,
             d=None, alpha: float = 0.1, variant: str = "paper", accuracy_weight: float = 1.0,
             validity_weight: float = 1.0, reward_workers: int = 0,
             reward_timeout_s: float = 5.0, keep_outputs: bool = False,
             stop: Callable[[], int] | None = None) -> dict[str, float]:
    """Greedy decoding of every sample (sharded over ranks when `d` is an r1vl.utils.Dist);
    returns held-out means over all ranks: accuracy, step_rar, step_rvr, reward (weighted as in
    training: accuracy_weight * StepRAR + validity_weight * StepRVR), completion_length,
    `reward_timeouts` (answers whose check ran out of reward_timeout_s, scored wrong: warned)
    and `correct_items` (0/1 per sample, data order). keep_outputs=True adds `outputs`: one
    record per sample in data order (`output_record`), gathered from every rank.
    Rank 0 logs its progress (at most 10 lines: `progress_marks`). `stop` (the trainer's
    signal watch) is called before each batch and after the last on every rank, as many times on
    each (it may be a collective); a nonzero signal number raises EvalStopped on every rank.
    Stopped or failed, it first waits for a batch still scored in the background (reward_workers
    > 0), its scores dropped: no scoring thread outlives the call."""
    from r1vl.utils import Dist, StatReducer

    d = d or Dist()
    t0 = time.perf_counter()
    if not isinstance(samples, Sequence):
        samples = list(samples)
    # per-family accuracy when the rows say which family they are (the built-in task does);
    # the name list comes from the whole set so that every rank reduces the same keys (a
    # data set's text_only rows: no image decoded)
    texts = samples.text_only(len(samples)) if hasattr(samples, "text_only") else samples
    families = sorted({str(getattr(x, "meta", {}).get("family")) for x in texts
                       if getattr(x, "meta", {}).get("family") is not None})
    mine = range(d.rank, len(samples), d.world)  # decoded a batch at a time
    local_correct: list[float] = []
    local_outputs: list[dict] = []
    local_timeouts = 0.0
    stats = StatReducer()
    # every key on every rank, even one with no item (world > items): the reduction is one
    # vector whose length must agree across ranks
    for key in ["accuracy", "step_rar", "step_rvr", "reward", "completion_length", "truncated"] + \
            ["accuracy_" + fam for fam in families]:
        stats.add(key, [])
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    n_batches = -(-len(mine) // batch_size)
    marks = progress_marks(n_batches) if d.main else set()  # logging only: no collective
    # an engine whose generate() is a collective (vLLM with tensor parallelism: a TP group's ranks
    # exchange their prompts) is called as many times on every rank, with no prompt where a rank
    # has run out of items: rank 0 has the most (else the others waited for it forever)
    lockstep = getattr(engine, "collective_generate", False)
    calls = -(-len(range(0, len(samples), d.world)) // batch_size) if lockstep or stop is not None else n_batches

    def collect(batch) -> None:  # a generated batch's scores into the statistics, in batch order
        nonlocal local_timeouts
        b, s, chunk, comps, scoring = batch
        sc = scoring.result()
        stats.add("accuracy", sc["correct"])
        local_correct.extend(sc["correct"])
        local_timeouts += sc["timeouts"]
        for x, ok in zip(chunk, sc["correct"]):
            fam = getattr(x, "meta", {}).get("family")
            if fam is not None:
                stats.add("accuracy_" + str(fam), [ok])
        stats.add("step_rar", sc["accuracy"])
        stats.add("step_rvr", sc["validity"])
        stats.add("reward", sc["total"])
        stats.add("completion_length", [len(c.token_ids) for c in comps])
        stats.add("truncated", [1.0 if c.finish_reason == "length" else 0.0 for c in comps])
        if keep_outputs:
            local_outputs.extend(output_record(x, c, sc, i) for i, (x, c) in enumerate(zip(chunk, comps)))
        if b in marks:  # rank 0 holds the largest shard: its count x world estimates all ranks'
            log.info("eval: %d/%d samples, %.0f s", min(len(samples), (s + len(chunk)) * d.world), len(samples),
                     time.perf_counter() - t0)

    # with reward worker processes, a batch is scored while the next one is generated
    pending = None
    try:
        for b, s in enumerate(range(0, calls * batch_size, batch_size), start=1):
            if stop is not None:
                signum = stop()
                if signum:
                    raise EvalStopped(signum, min(len(samples), s * d.world), len(samples))
            chunk = [samples[i] for i in mine[s: s + batch_size]]
            if not chunk and not lockstep:
                continue
            comps = engine.generate([make_prompt(processor, x) for x in chunk], 1, sampling)
            if not chunk:
                continue
            scoring = ScoreJob(functools.partial(
                score, [c.text for c in comps], chunk, alpha=alpha, variant=variant, accuracy_weight=accuracy_weight,
                validity_weight=validity_weight, workers=reward_workers, timeout_s=reward_timeout_s),
                background=reward_workers > 0)
            batch, pending = pending, (b, s, chunk, comps, scoring)
            if batch is not None:  # (this batch's scoring, now pending, runs meanwhile)
                collect(batch)
    except Exception:
        # stopped (EvalStopped) or failed with a batch still scored in the background: waited for,
        # its scores dropped, so that no scoring thread outlives evaluate() (it held the reward
        # pool, and a caller's next scoring, a checkpoint's or a retry's, waited behind it)
        if pending is not None:
            pending[4].drop()
        raise
    if pending is not None:
        collect(pending)
    if stop is not None:  # once more: a signal during the last batch stops it too (as a step's end would)
        signum = stop()
        if signum:
            raise EvalStopped(signum, len(samples), len(samples))
    stats.add("n", float(len(mine)), weight=1.0)
    stats.add("reward_timeouts", local_timeouts, weight=1.0)  # a count: the mean over ranks x world
    out = stats.reduce(d)
    out["n"] = int(round(out["n"] * d.world)) if d.world > 1 else len(mine)
    out["reward_timeouts"] = int(round(out["reward_timeouts"] * d.world))
    if out["reward_timeouts"] and d.main:  # a timeout is a wrong answer: the accuracy may be low for it
        log.warning("eval: %d of %d answers were scored wrong because checking them took longer than the "
                    "reward time limit (%g s: algorithm.reward_timeout_s, --reward-timeout-s of python -m "
                    "r1vl.eval); raise it to check them fully", out["reward_timeouts"], out["n"], reward_timeout_s)
    out["seconds"] = time.perf_counter() - t0
    # per-item correctness in the order of `samples` (rank r evaluated items r, r+world, ...):
    # lets two evaluations of the same items be compared pairwise (see paired_comparison)
    from r1vl.utils import all_gather_objects

    def in_data_order(local: list) -> list:
        shards = all_gather_objects(local, d)
        items: list = [None] * len(samples)
        for r, shard in enumerate(shards):
            for j, x in enumerate(shard):
                items[r + j * d.world] = x
        return items

    out["correct_items"] = in_data_order(local_correct)
    if keep_outputs:
        out["outputs"] = in_data_order(local_outputs)
        for i, rec in enumerate(out["outputs"]):
            rec["index"] = i
    return out


class FirstRows(Sequence):
    """The first `n` rows of a data set, decoded (images opened) only when indexed."""

    def __init__(self, dataset, n: int | None = None):
        self.dataset = dataset
        self.n = len(dataset) if not n else min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.dataset[i % self.n]

    def text_only(self, n: int | None = None):
        return self.dataset.text_only(self.n if n is None else min(n, self.n))


def output_record(sample, completion, sc: dict, i: int) -> dict:
    """One evaluated sample for an outputs file: the question, the reference solution, the
    greedy completion and its scores (`i`: the sample's position in `sc`)."""
    rec = {"index": None, "problem": sample.problem, "solution": sample.solution, "completion": completion.text,
           "correct": sc["correct"][i], "step_rar": sc["accuracy"][i], "step_rvr": sc["validity"][i],
           "reward": sc["total"][i], "completion_length": len(completion.token_ids),
           "truncated": completion.finish_reason == "length"}
    if "timed_out" in sc:  # scored wrong because the check ran out of time, not because it failed
        rec["timed_out"] = bool(sc["timed_out"][i])
    source = getattr(sample, "source", "")
    if source:  # "file:row", as the loader numbers rows: joins the record to its data row
        rec["source"] = source
    fam = getattr(sample, "meta", {}).get("family")
    if fam is not None:
        rec["family"] = str(fam)
    return rec


def write_outputs(path: str | Path, records: Sequence[dict]) -> None:
    """JSON lines, one per evaluated sample, written to a temporary file and renamed."""
    write_replace(path, (json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))


def paired_comparison(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Two evaluations of the same items: how many flipped each way, and the exact two-sided
    sign-test (McNemar) p-value of "no change"; plus each accuracy's standard error."""
    import math

    if len(before) != len(after):
        raise ValueError("paired_comparison: the two evaluations cover different items")
    fixed = sum(1 for b, a in zip(before, after) if a > b)
    broken = sum(1 for b, a in zip(before, after) if a < b)
    n = fixed + broken
    k = min(fixed, broken)
    tail = 1.0
    if n:  # sum of C(n, i) for i <= k, each from the last (math.comb each time: minutes at 20k pairs)
        c = total = 1
        for i in range(k):
            c = c * (n - i) // (i + 1)
            total += c
        tail = total / 2 ** n
    m = max(1, len(before))
    pb, pa = sum(before) / m, sum(after) / m
    return {"fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail),
            "stderr_before": math.sqrt(pb * (1 - pb) / m), "stderr_after": math.sqrt(pa * (1 - pa) / m)}


def _resolve_data(path: str) -> str:
    """--data's file: a directory's test.jsonl, else the path itself (a file, a datasets
    directory). Another directory is refused here, with the data files it may mean: a run's
    directory suggests its data/test.jsonl, never the run's own outputs (metrics.jsonl, ...)."""
    from r1vl.data.loader import _is_hf_dir, data_files_in

    p = Path(path)
    if p.is_dir() and (p / "test.jsonl").is_file():
        return str(p / "test.jsonl")
    if p.is_dir() and not _is_hf_dir(p):
        hint = data_files_in(p)
        raise ValueError(f"--data {path}: a directory without test.jsonl, and not a Hugging Face datasets "
                         f"directory; pass a data file{' such as ' + ', '.join(map(str, hint)) if hint else ''}")
    return str(p)


def _check_not_data(out: str, data_path: str, flag: str) -> None:
    """An output flag must not name the data being evaluated (written over once it is read):
    the data file under any spelling or link, or a file inside a datasets directory."""
    o, data = Path(out), Path(data_path)
    if data.is_dir():
        clash = o.resolve().is_relative_to(data.resolve())
    else:
        try:
            clash = os.path.samefile(o, data)  # a hard link too
        except OSError:  # `out` does not exist yet
            clash = o.resolve() == data.resolve()
    if clash:
        what = "inside the --data directory" if data.is_dir() else "the --data file"
        raise ValueError(f"{flag} {out}: is {what} being evaluated ({data_path}): writing it would overwrite "
                         "the data set; choose another path")


# the files a saved model (r1vl's final/, warmup/, a checkpoint, a Hugging Face model directory)
# is loaded or resumed from: names, name prefixes, suffixes
_MODEL_FILES = ("config.json", "generation_config.json", STATE_FILE)
_MODEL_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "chat_template",
                        "preprocessor_config", "processor_config", "video_preprocessor_config", "model.",
                        "pytorch_model", "adapter_")
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".index.json", ".tiktoken")


def _check_not_model(out: str, model: str, run_config: Path | None, flag: str) -> None:
    """An output flag must not name a file of the model being evaluated (a weights, config,
    tokenizer or processor file, anything in a subdirectory such as DeepSpeed's states), the
    run's config.yaml, or anything among that run's outputs (metrics.jsonl, summary.json,
    eval_outputs/, checkpoints/, ...): written over after the model is read, it would break the
    saved run. A new file beside the model's (final/eval.json) or the run's (runs/X/eval.json) is
    fine. Paths are compared case-insensitively, folders and names: on a case-insensitive disk
    (macOS's, Windows') RUN/Final/Config.json is run/final/config.json."""
    def fold(path: Path) -> Path:  # the names listed above are lower-case
        return Path(str(path).casefold())

    def written(path: Path) -> tuple[Path, str]:  # what os.replace replaces: a link itself, not its target
        return fold(path.parent.resolve()), path.name.casefold()

    o_dir, name = written(Path(out))
    o = o_dir / name
    if run_config is not None and (o_dir, name) == written(run_config):
        raise ValueError(f"{flag} {out}: is the run's config ({run_config}) that --model {model} belongs to: "
                         "writing it would overwrite the run's settings; choose another path")
    real = Path(model).resolve()
    m = fold(real)
    if o.is_relative_to(m):
        if (o_dir != m or name in _MODEL_FILES or name.startswith(_MODEL_FILE_PREFIXES)
                or name.endswith(_MODEL_FILE_SUFFIXES)):
            raise ValueError(f"{flag} {out}: is a file of the model being evaluated (--model {model}): writing it "
                             "would overwrite the saved model; choose another path")
        return
    from r1vl.train import RUN_OUTPUTS

    for p in (Path(model).absolute(), real):  # the run's directory: runs/X for X/final, X/checkpoints/<name>
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        if (run / "config.yaml").is_file() and o.is_relative_to(fold(run.resolve())):
            top = o.relative_to(fold(run.resolve())).parts[0]
            if top in RUN_OUTPUTS or top == "config.yaml":
                raise ValueError(f"{flag} {out}: is among the outputs of the run --model {model} belongs to "
                                 f"({run / top}): writing it would overwrite or mix with them; choose another path")


# CLI setting -> (built-in default, the run config's key the trainer's evaluation uses)
EVAL_SETTINGS: dict[str, tuple[Any, str]] = {
    "max_new_tokens": (96, "rollout.max_completion_length"),
    "min_pixels": (56 * 56, "data.min_pixels"),
    "max_pixels": (112 * 112, "data.max_pixels"),
    "alpha": (0.1, "algorithm.alpha"),
    "variant": ("paper", "algorithm.accuracy_variant"),
    "accuracy_weight": (1.0, "algorithm.accuracy_weight"),
    "validity_weight": (1.0, "algorithm.validity_weight"),
    "reward_timeout_s": (5.0, "algorithm.reward_timeout_s"),
    "skip_bad_rows": (False, "data.skip_bad_rows"),
}


def find_run_config(model: str | Path) -> Path | None:
    """The config.yaml of the r1vl.train run a saved model belongs to: a checkpoint's own (the
    settings when it was written: a resume may have changed the run's since; a checkpoint
    copied out of its run keeps it), else the model directory's parent (runs/X/final,
    runs/X/warmup), or its grandparent for runs/X/checkpoints/<name>."""
    candidates = []
    for p in (Path(model).absolute(), Path(model).resolve()):  # a link: beside it, else where it points
        if (p / STATE_FILE).is_file():  # an r1vl checkpoint
            candidates.append(p / "config.yaml")
        candidates.append(p.parent / "config.yaml")
        if p.parent.name == "checkpoints":
            candidates.append(p.parent.parent / "config.yaml")
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_run_config(path: Path | None):
    """The run's resolved r1vl Config, or None (no file, or not a config r1vl reads: warned)."""
    if path is None:
        return None
    from r1vl.config import load_config

    try:  # its evaluation settings: not the checks of what a training run would do with it
        return load_config(path, training=False)
    except ValueError as e:  # ConfigError: not an r1vl run config (or an incompatible one)
        log.warning("%s: not used for defaults (%s); using the CLI's built-in defaults", path, e)
        return None


def resolve_settings(explicit: dict[str, Any], run_cfg=None, run_cfg_path: str | Path | None = None
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """Values for EVAL_SETTINGS: an explicit flag (not None) wins, then the run's config, then
    the built-in default. Returns (values, source of each value, in words)."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, (default, key) in EVAL_SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        if explicit.get(name) is not None:
            values[name], sources[name] = explicit[name], flag
        elif run_cfg is not None:
            obj = run_cfg
            for part in key.split("."):
                obj = getattr(obj, part)
            values[name], sources[name] = obj, f"{run_cfg_path or 'run config'}: {key}"
        else:
            values[name], sources[name] = default, "built-in default"
    if values["min_pixels"] > values["max_pixels"]:
        raise ValueError(f"--min-pixels {values['min_pixels']} (from {sources['min_pixels']}) exceeds "
                         f"--max-pixels {values['max_pixels']} (from {sources['max_pixels']})")
    return values, sources


def _check_out(out: str, flag: str = "--out", example: str = "eval.json") -> None:
    """An output file flag must be writable as a file: create its parent now, before evaluating."""
    p = Path(out)
    if p.is_dir():
        raise ValueError(f"{flag} {out}: is a directory; expected a file path (e.g. {p / example})")
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {out}: cannot create its directory {parent} ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: directory {parent} is not writable")


def _int_at_least(lo: int, hint: str = ""):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}{hint}, got {v}")
        return v
    return parse


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):  # an infinite weight makes the reward NaN (inf x 0)
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


def _model_error(model: str, e: Exception) -> str:
    """load_pretrained's message names the trainer's key (model.path); the CLI's is --model."""
    msg = str(e)
    prefix = f"model.path {model!r}: "
    if msg.startswith(prefix):
        msg = msg[len(prefix):]
    return f"--model {model}: {msg}"


def _run_default(name: str) -> tuple[str, Any]:
    default, key = EVAL_SETTINGS[name]
    return key, default


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption; torchrun stopping the other ranks when one fails), raised
    in the CLI where Ctrl-C's KeyboardInterrupt would be, so that the same cleanup runs (the vLLM
    engine's temporary model folder was left in /tmp) and it exits 143."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _stop_words(e: KeyboardInterrupt) -> tuple[str, int]:
    """How the CLI says it stopped, and its exit status: SIGTERM's (Terminated) or Ctrl-C's."""
    return ("stopped (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted (Ctrl-C)", 130)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _main(argv)
    except Terminated as e:  # before the evaluation's own handling (the arguments, the imports)
        from r1vl.utils import forget_keyboard_interrupt

        forget_keyboard_interrupt()
        words, rc = _stop_words(e)
        print(f"r1vl.eval: {words}: no result", file=sys.stderr)
        return rc
    finally:
        signal.signal(signal.SIGTERM, old)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(prog="python -m r1vl.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    ap.add_argument("--data", required=True, help="directory with test.jsonl, or a dataset file/directory")
    # --limit, not --n, under torchrun: torchrun's argparse takes --n for an abbreviation of its own
    # options (--nnodes, --nproc-per-node, ...) and stops with "ambiguous option"
    ap.add_argument("--limit", "--n", dest="n", metavar="N", type=_int_at_least(0, " (0 = all)"), default=0,
                    help="evaluate the first N items (0 = all; --n is the same). Not the run's data.eval_size: "
                    "to score what the trainer's evaluation scored, give that number")
    run_default = " (default: the run's %s when --model is in an r1vl run directory, else %s)"
    ap.add_argument("--max-new-tokens", type=_int_at_least(1), default=None,
                    help="greedy decoding budget" + run_default % _run_default("max_new_tokens"))
    ap.add_argument("--batch-size", type=_int_at_least(1), default=64,
                    help="items decoded together, per rank (default: 64)")
    ap.add_argument("--min-pixels", type=_int_at_least(1), default=None,
                    help="image pixel lower bound" + run_default % _run_default("min_pixels"))
    ap.add_argument("--max-pixels", type=_int_at_least(1), default=None,
                    help="image pixel upper bound" + run_default % _run_default("max_pixels"))
    ap.add_argument("--alpha", type=_nonneg_float, default=None,
                    help="StepRAR weight per matched key step" + run_default % _run_default("alpha"))
    ap.add_argument("--variant", choices=("paper", "official"), default=None,
                    help="StepRAR variant" + run_default % _run_default("variant"))
    ap.add_argument("--accuracy-weight", type=_nonneg_float, default=None,
                    help="StepRAR's weight in the reported reward" + run_default % _run_default("accuracy_weight"))
    ap.add_argument("--validity-weight", type=_nonneg_float, default=None,
                    help="StepRVR's weight in the reported reward" + run_default % _run_default("validity_weight"))
    ap.add_argument("--reward-timeout-s", type=_positive_float, default=None,
                    help="seconds math-verify may take to check one answer; an answer over it is scored wrong "
                    "and counted in reward_timeouts" + run_default % _run_default("reward_timeout_s"))
    ap.add_argument("--reward-workers", type=_int_at_least(0), default=0,
                    help="score in this many worker processes, each batch while the next is generated (the "
                    "trainer's algorithm.reward_workers; default: %(default)s, in this process)")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="greedy decoding by HF generate, or by a vLLM engine (pip install -e '.[vllm]'): the "
                    "checkpoint's weights are pushed into it from host memory; one engine per rank under torchrun")
    ap.add_argument("--gpu-memory-utilization", type=_fraction, default=0.85,
                    help="--engine vllm: the share of the GPU's memory the engine may take (default 0.85)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the model runs (auto: the GPU when there is one; under torchrun each rank "
                    "takes its LOCAL_RANK's GPU)")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="model weights (auto: the run's compute dtype, model.dtype or DeepSpeed's bf16 / fp16, "
                    "when --model is in an r1vl run directory, as its own evaluation decoded; else bfloat16 on a "
                    "GPU that has it, else float32)")
    ap.add_argument("--skip-bad-rows", action=argparse.BooleanOptionalAction, default=None,
                    help="leave out rows that do not load or whose image does not decode (each reported; "
                    "skipped_rows in the result counts the file's rows left out), instead of stopping" +
                    run_default % _run_default("skip_bad_rows"))
    ap.add_argument("--out", default="", help="also write the JSON result here (parent directory created)")
    ap.add_argument("--per-item", action="store_true", help="include per-item correctness (0/1, data order)")
    ap.add_argument("--outputs", default="", help="write every sample's completion and scores here (JSON lines, "
                    "data order; parent directory created)")
    args = ap.parse_args(argv)
    from r1vl.train import quiet_deepspeed_probe

    quiet_deepspeed_probe()
    from r1vl.utils import rank_env_problem

    problem = rank_env_problem()
    if problem:  # printed whatever RANK says: every later message is rank 0's only
        print(f"r1vl.eval: error: {problem}", file=sys.stderr)
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone speaks
    from r1vl.utils import StderrHandler

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        handlers=[StderrHandler()])
    log.setLevel(logging.INFO if main_rank else logging.WARNING)  # this CLI's notes (where settings came from)
    if not main_rank:  # one weight-loading bar (rank 0's), not one per rank
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        return _run(args, main_rank)
    finally:
        _end_distributed()


def _end_distributed() -> None:
    import torch.distributed as dist

    from r1vl.utils import exit_without_teardown

    global _EXIT_WITHOUT_TEARDOWN
    _EXIT_WITHOUT_TEARDOWN = exit_without_teardown(_USED_VLLM)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_EXIT_WITHOUT_TEARDOWN = False
_USED_VLLM = False
_WORK_PREFIX = "r1vl-eval-"


def _host() -> str:
    """This host's name without '-', the separator of `_work_prefix`'s fields."""
    import socket

    return socket.gethostname().replace("-", "_")


def _work_prefix(pid: int | None = None) -> str:
    """The vLLM engine's temporary model folder's prefix: this host and process (or `pid`), for
    `_sweep_stale_work`."""
    return f"{_WORK_PREFIX}{_host()}-{os.getpid() if pid is None else pid}-"


def _sweep_stale_work(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove the engine folders (config + processor files, a few MB) that evaluations on this host
    left in the temporary directory when they were killed (SIGKILL, the OOM killer: no cleanup
    runs), found by their process being gone. Another host's (a temporary directory on a shared
    file system) and a live or foreign process's are left. Returns those removed."""
    import shutil
    import tempfile

    host = _host()
    removed = []
    for p in Path(tmp or tempfile.gettempdir()).glob(f"{_WORK_PREFIX}{host}-*-*"):
        pid = p.name[len(_WORK_PREFIX) + len(host) + 1:].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive
        except PermissionError:
            continue  # alive, another user's
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


def _vllm_engine(args, settings: dict, dtype: str, dataset, model, processor, d):
    """A vLLM engine for greedy evaluation (r1vl.rollout.vllm_engine, as the trainer's rollouts
    use it): started from the checkpoint's config with dummy weights, then given `model`'s.
    Its length budget fits the longest evaluated prompt (measured from the image headers)."""
    import tempfile

    from r1vl.config import load_config
    from r1vl.rollout.vllm_engine import VLLMEngine, ensure_process_group
    from r1vl.train import prompt_lengths
    from r1vl.utils import all_gather_objects

    ensure_process_group()  # a one-rank group without torchrun (vLLM's external_launcher needs one)
    longest = max(prompt_lengths(dataset, processor, "r1vl", rows=args.n or None, d=d), default=1)
    # the engine's model directory (config + processor files) must be one path on every rank
    if d.main:
        for p in _sweep_stale_work():
            log.info("removed %s, the engine folder of an evaluation that was killed", p)
    work = all_gather_objects(tempfile.mkdtemp(prefix=_work_prefix()) if d.main else None, d)[0]
    cfg = load_config(None, [
        f"output_dir={work}", "rollout.engine=vllm", f"model.dtype={dtype}",
        f"rollout.max_completion_length={settings['max_new_tokens']}",
        f"data.min_pixels={settings['min_pixels']}", f"data.max_pixels={settings['max_pixels']}",
        # the engine's prompt budget is max_prompt_length + a max_pixels image: the text part suffices
        f"data.max_prompt_length={max(1, longest)}",
        f"rollout.vllm.gpu_memory_utilization={args.gpu_memory_utilization}",
        "rollout.vllm.enable_sleep_mode=false", f"rollout.vllm.max_num_seqs={args.batch_size}"], training=False)
    global _USED_VLLM
    _USED_VLLM = True
    try:
        return VLLMEngine.from_config(cfg, model, processor), work
    except BaseException:
        if d.main:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        raise


def _close_vllm(engine, work: str, d) -> None:
    import shutil

    engine.close()
    if d is None or d.main:
        shutil.rmtree(work, ignore_errors=True)


def _check_images(samples: FirstRows, d, skip: bool = False) -> FirstRows:
    """Decode every evaluated image first (the ranks share them): a truncated or corrupt file,
    whose header reads, is reported before the model loads, not after the items before it.
    skip: such rows are left out (warned), and the rows that move up in their place checked."""
    from r1vl.train import decode_rows

    dataset, _, bad = decode_rows(samples.dataset, samples.n, d, skip=skip, what="{bad} of the {n} evaluated images",
                                  skip_with=("pass", "--skip-bad-rows"), error=ValueError)
    return FirstRows(dataset, samples.n) if bad else samples


def saved_dtype(model: str | Path) -> str | None:
    """The dtype a saved model's weights were written in (config.json's top-level "dtype", or
    "torch_dtype" of older transformers), or None."""
    try:
        c = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = c.get("dtype") or c.get("torch_dtype") if isinstance(c, dict) else None
    return value if value in ("float32", "bfloat16", "float16") else None


def _device_and_dtype(device: str, dtype: str, run_dtype: str | None = None):
    """(use CUDA, dtype): --dtype auto is the run's compute dtype when there is a run (bfloat16
    only where the device has it), else bfloat16 on a GPU that has it, else float32."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dtype == "auto":
        bf16 = not use_cuda or torch.cuda.is_bf16_supported()  # where bfloat16 may run
        if run_dtype is not None and (run_dtype != "bfloat16" or bf16):
            dtype = run_dtype
        else:
            dtype = "bfloat16" if use_cuda and bf16 else "float32"
    return use_cuda, dtype


def _run(args, main_rank: bool) -> int:
    rank = os.environ.get("RANK", "0")
    world = os.environ.get("WORLD_SIZE", "1")
    # Whether a failure here is met alike by every rank: the checks of the arguments and inputs
    # (the same on every rank), the image check (per_row_shared raises on every rank, naming the one
    # that failed), a checkpoint no rank loads. Rank 0 alone prints those. Past them a failure is its
    # rank's own (its device, its files): that rank prints it, or nobody does (torchrun kills rank 0).
    everywhere = True

    def error(msg: str) -> None:
        if everywhere and not main_rank:
            return
        where = f"[rank {rank}] " if not everywhere and world not in ("", "1") else ""
        print(f"r1vl.eval: error: {where}{msg}", file=sys.stderr)

    from r1vl.train import UserError
    from r1vl.utils import forget_keyboard_interrupt, stdout_to_stderr

    d = None
    dataset = None
    # stdout is this CLI's result (one JSON object, printed below): whatever the libraries write
    # there meanwhile goes to stderr (torch 2.8's gloo prints "[Gloo] Rank 0 is connected to 1
    # peer ranks ..." on stdout when the process group starts; vLLM's prints)
    with stdout_to_stderr():
        try:
            from r1vl.data import load_dataset
            from r1vl.models import ModelLoadError, check_model_path, load_pretrained
            from r1vl.rewards.pool import platform_problem
            from r1vl.rollout.hf_engine import HFEngine

            # every check on the inputs before anything is loaded or evaluated
            problem = platform_problem()
            if problem:
                raise ValueError(problem)
            data_path = _resolve_data(args.data)
            if not Path(data_path).exists():
                raise FileNotFoundError(f"--data {args.data}: no such file or directory")
            check_model_path(args.model, label=f"--model {args.model}", hub=False)
            cfg_path = find_run_config(args.model)
            for flag, path in (("--out", args.out), ("--outputs", args.outputs)):
                if path:
                    _check_not_model(path, args.model, cfg_path, flag)
            if args.out:
                _check_out(args.out)
                _check_not_data(args.out, data_path, "--out")
            if args.outputs:
                _check_out(args.outputs, "--outputs", "outputs.jsonl")
                _check_not_data(args.outputs, data_path, "--outputs")
            if args.out and args.outputs and Path(args.out).resolve() == Path(args.outputs).resolve():
                raise ValueError(f"--out and --outputs name the same file ({args.out})")
            explicit = {name: getattr(args, name) for name in EVAL_SETTINGS}
            run_cfg = load_run_config(cfg_path)
            settings, sources = resolve_settings(explicit, run_cfg, cfg_path)
            for name, value in settings.items():
                log.info("%s = %s (%s)", name, value, sources[name])
            run_dtype = None
            if run_cfg is not None:  # what its own evaluation decoded in: the saved weights' dtype (16-bit
                # under DeepSpeed's bf16 / fp16, whatever model.dtype), else what the config says
                from r1vl.ds import compute_dtype

                run_dtype = saved_dtype(args.model) or compute_dtype(run_cfg)
            use_cuda, dtype = _device_and_dtype(args.device, args.dtype, run_dtype)
            how = "--dtype" if args.dtype != "auto" else (
                f"{cfg_path}: the run's compute dtype" if run_dtype == dtype else "auto: this device")
            if args.engine == "vllm":
                from r1vl.rollout.vllm_engine import VLLM_INSTALL_HINT, vllm_installed

                if not vllm_installed():
                    raise ValueError(f"--engine vllm: vLLM is not installed ({VLLM_INSTALL_HINT})")
                import torch

                if args.device == "cpu" and torch.cuda.is_available():
                    raise ValueError("--device cpu with --engine vllm: this vLLM build runs on the GPU "
                                     "(use --engine hf for a CPU evaluation)")
                # stdout is this CLI's result (one JSON object): vLLM's log lines go to stderr
                os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
            if main_rank:
                log.info("engine = %s, device = %s, dtype = %s (%s)", args.engine, "cuda" if use_cuda else "cpu", dtype,
                         how)

            from r1vl.data.loader import RowError

            try:
                dataset = load_dataset(data_path, min_pixels=settings["min_pixels"],
                                       max_pixels=settings["max_pixels"], skip_bad_rows=settings["skip_bad_rows"])
            except RowError as e:
                raise ValueError(f"{e} (--skip-bad-rows leaves bad rows out, each reported)") from None
            samples = FirstRows(dataset, args.n)  # each rank decodes its own items, a batch at a time
            if args.n > len(dataset) and main_rank:
                log.info("--limit %d: %s has %d items; evaluating all of them", args.n, data_path, len(dataset))
            # torchrun: one process group, rank r evaluates items r, r + world, ... on its own GPU
            from r1vl.utils import all_gather_objects, init_distributed

            everywhere = False  # a RANK without torchrun's WORLD_SIZE is this process's to report
            d = init_distributed("auto" if use_cuda else "gloo")
            everywhere = True
            samples = _check_images(samples, d, skip=settings["skip_bad_rows"])
            dataset = samples.dataset
            load_error = None
            try:
                model, processor = load_pretrained(args.model, dtype=dtype, min_pixels=settings["min_pixels"],
                                                   max_pixels=settings["max_pixels"])
            except ModelLoadError as e:
                load_error = _model_error(args.model, e)
            # every rank loads the same checkpoint: a failure they all meet is one line, not one a rank
            errors = all_gather_objects(load_error, d)
            if load_error is not None:
                everywhere = all(e == load_error for e in errors)
                raise ModelLoadError(load_error)
            everywhere = False
            model.eval()
            if args.engine == "vllm":  # the HF model stays in host memory: its weights are pushed to vLLM
                engine, work = _vllm_engine(args, settings, dtype, dataset, model, processor, d)
            else:
                if use_cuda:
                    model = model.to(d.device)
                engine = HFEngine(model, processor, batch_size=args.batch_size)
            try:
                res = evaluate(engine, processor, samples, max_new_tokens=settings["max_new_tokens"], d=d,
                               batch_size=args.batch_size, alpha=settings["alpha"], variant=settings["variant"],
                               accuracy_weight=settings["accuracy_weight"],
                               validity_weight=settings["validity_weight"],
                               reward_timeout_s=settings["reward_timeout_s"], reward_workers=args.reward_workers,
                               keep_outputs=bool(args.outputs))
            finally:
                if args.engine == "vllm":
                    _close_vllm(engine, work, d)
        except (ValueError, FileNotFoundError, OSError, KeyError, UserError) as e:
            error(str(e))
            return 2
        except KeyboardInterrupt as e:
            forget_keyboard_interrupt()  # exit 130, not -2 (its docstring)
            words, rc = _stop_words(e)
            if main_rank:
                print(f"r1vl.eval: {words}: no result", file=sys.stderr)
            return rc
    if not main_rank:
        return 0
    res["world_size"] = d.world if d is not None else 1
    res["device"] = "cuda" if use_cuda else "cpu"
    res["dtype"] = dtype
    # what the scores depend on besides the weights and rows, and where each value came from (a flag,
    # the run's config.yaml, the built-in default): the result file alone says it
    res["settings"] = {name: {"value": settings[name], "from": sources[name]} for name in settings}
    if dataset is not None and getattr(dataset, "skipped", None):  # --skip-bad-rows: said, and counted
        res["skipped_rows"] = len(dataset.skipped)
    items = res.pop("correct_items")
    outputs = res.pop("outputs", None)
    res = {"model": args.model, "data": data_path, **res}
    rc = 0
    printed = False
    try:
        if outputs is not None:
            try:
                write_outputs(args.outputs, outputs)
                res["outputs"] = args.outputs
            except OSError as e:  # the scores are still printed (and written to --out) below
                print(f"r1vl.eval: error: --outputs {args.outputs}: cannot write ({e.strerror or e})",
                      file=sys.stderr)
                rc = 2
        if args.per_item:
            res["correct_items"] = items
        text = json.dumps(res, indent=2)
        print(text)
        printed = True
        if args.out:
            try:
                write_replace(args.out, text + "\n")
            except OSError as e:  # the result is on stdout above: not lost
                print(f"r1vl.eval: error: --out {args.out}: cannot write ({e.strerror or e}); "
                      "the result is printed above", file=sys.stderr)
                return 2
    except KeyboardInterrupt as e:  # while a file is written (write_replace leaves no partial one)
        forget_keyboard_interrupt()
        words, stop_rc = _stop_words(e)
        print(f"r1vl.eval: {words}: " + (f"--out {args.out} not written; the result is printed above"
                                         if printed else "no result"), file=sys.stderr)
        return stop_rc
    return rc


if __name__ == "__main__":
    from r1vl.utils import cli_exit

    rc = main()
    cli_exit(rc, _EXIT_WITHOUT_TEARDOWN)

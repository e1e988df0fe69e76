"""Plumbing for train.py: distributed set-up and reductions, seeded data streams, RNG
states, atomic checkpoints, and the metrics writers (JSONL, TensorBoard, PNG plot)."""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from r1vl.files import STATE_FILE
from r1vl.launch import die_with_launcher

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def rank_env_problem() -> str | None:
    """Why RANK / WORLD_SIZE are no torchrun environment, or None. torchrun sets both: a RANK left
    by an enclosing job would make this process a non-main rank of a one-process "group", which
    computes a part of the work and writes nothing."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return (f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: expected integers "
                "(torchrun sets them)")
    if not 0 <= rank < world:
        size = f"={world}" if "WORLD_SIZE" in os.environ else " is unset"
        return (f"RANK={rank} but WORLD_SIZE{size}: not a torchrun environment; unset RANK to run as one process, "
                "or launch with torchrun")
    return None


def slurm_task_problem() -> str | None:
    """srun -n N python -m r1vl.train: N separate one-process runs into one output_dir (where the
    file system has no locks, all of them, their metrics interleaved). Tasks past the first
    without a RANK are refused (task 0, or an sbatch script's one process, runs)."""
    task = os.environ.get("SLURM_PROCID", "0")
    if "RANK" in os.environ or not task.isdigit() or int(task) == 0:
        return None
    return (f"SLURM task {task} (of {os.environ.get('SLURM_NTASKS', '?')}) without torchrun's RANK / WORLD_SIZE: it "
            "would run alone, beside task 0, into the same output_dir; start one torchrun per node (srun "
            "--ntasks-per-node=1 torchrun --nnodes=$SLURM_NNODES --nproc-per-node=<GPUs> --rdzv-backend=c10d "
            "--rdzv-endpoint=<first node>:29500 -m r1vl.train ...), or, for one-process runs each into its own "
            "output_dir, set RANK=0 WORLD_SIZE=1")


def init_distributed(backend: str = "auto", timeout_s: int = 1800, num_threads: int = 0) -> Dist:
    """Read torchrun's environment (ValueError: a RANK outside WORLD_SIZE); start the process
    group (gloo on CPU, NCCL on CUDA); set the torch thread count (default: the cores this
    process may use / local ranks). A torchrun worker dies with its launcher (die_with_launcher)."""
    problem = rank_env_problem()
    if problem:
        raise ValueError(problem)
    die_with_launcher()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if num_threads <= 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
        num_threads = max(1, cores // max(1, local_world))
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


@contextmanager
def stdout_to_stderr():
    """Inside, whatever writes to this process's stdout (file descriptor 1: C and C++ libraries,
    Python code printing to sys.stdout) goes to stderr; stdout is back, flushed, on the way out.
    For a CLI whose stdout is its result (r1vl.eval's JSON)."""
    _flush_stdout()
    saved = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no stdout or stderr to point at (closed): leave them as they are
        if saved is not None:
            os.close(saved)
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            _flush_stdout()  # what was written inside goes out inside: to stderr
            os.dup2(saved, 1)
            os.close(saved)


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except (AttributeError, ValueError, OSError):  # None, closed or broken
        pass
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # C stdio's buffers (printf, std::cout), all streams
    except (OSError, AttributeError, TypeError):
        pass


def all_reduce_sum(values: Sequence[float], d: Dist) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    if d.enabled:
        if dist.get_backend() == "nccl":
            t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(obj: Any, d: Dist) -> list[Any]:
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class StderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever sys.stderr is when a record is emitted, not the
    stream of when it was made: code that swaps stderr (pytest's capture, a redirect) never
    leaves the handler writing to a closed file."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def exit_after_collectives(rc: int) -> None:
    """os._exit(rc) for a process that ran gloo collectives, once its process group is
    destroyed: the interpreter's teardown is skipped. A gloo worker thread of a group that
    outlived destroy_process_group (torch 2.13, CPU) sometimes released a collective's tensors
    while the interpreter was finalizing; taking the GIL then ends that thread inside a C++
    destructor: std::terminate, SIGABRT ("terminate called without an active exception"),
    and a finished run or test worker reported as failed. Python's exit handlers (atexit:
    reward pools, logging) run first, and stdio is flushed; C++ static destructors do not
    run, so not for a process whose libraries clean up there (vLLM's CPU shared memory)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def exit_without_teardown(used_vllm: bool) -> bool:
    """Whether a CLI should leave through exit_after_collectives: its process group is gloo (CPU)
    and no vLLM engine ran (vLLM's CPU shared-memory segments are unlinked by the C++ teardown that
    os._exit skips; left behind, they block the next run). Ask before destroying the group."""
    return not used_vllm and dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"


def forget_keyboard_interrupt() -> None:
    """For a CLI that has handled a KeyboardInterrupt and chosen its exit status. CPython marks
    the process as stopped by an unhandled Ctrl-C whenever a KeyboardInterrupt leaves an exec()
    of a string, caught later or not (dataclasses make their methods that way, so a Ctrl-C
    during an import can land there), and ends it through SIGINT at the very end: status -2
    instead of the CLI's own. A string exec() that completes clears the mark (checked with
    CPython 3.11, 3.12 and 3.13)."""
    exec("pass")  # noqa: S102 -- a constant string: its completion resets the interpreter's mark


def cli_exit(rc: int, without_teardown: bool) -> None:
    """A CLI's exit: sys.exit(rc), or exit_after_collectives(rc) (exit_without_teardown's answer)."""
    if without_teardown:
        exit_after_collectives(rc)
    sys.exit(rc)


def broadcast_object(obj: Any, d: Dist) -> Any:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StatReducer:
    """Collects (sum, sum of squares, count) per name on each rank; `reduce` combines all ranks
    in one collective and returns means (and stds for the names in `with_std`)."""

    def __init__(self):
        self._v: dict[str, list[float]] = {}

    def add(self, name: str, values: Sequence[float] | float, weight: float | None = None) -> None:
        if isinstance(values, (int, float)):
            w = 1.0 if weight is None else weight
            vals = [float(values) * w, float(values) ** 2 * w, w]
        else:
            xs = [float(x) for x in values]
            vals = [sum(xs), sum(x * x for x in xs), float(len(xs))]
        cur = self._v.setdefault(name, [0.0, 0.0, 0.0])
        for i in range(3):
            cur[i] += vals[i]

    def reduce(self, d: Dist, with_std: Sequence[str] = ()) -> dict[str, float]:
        names = sorted(self._v)
        flat = [x for n in names for x in self._v[n]]
        tot = all_reduce_sum(flat, d) if flat else []
        out = {}
        for i, n in enumerate(names):
            s, s2, c = tot[3 * i: 3 * i + 3]
            mean = s / c if c else float("nan")
            out[n] = mean
            if n in with_std:
                var = max(0.0, s2 / c - mean * mean) if c else float("nan")
                out[n + "_std"] = math.sqrt(var)
        return out


# --------------------------------------------------------------------------- data streams


class IndexStream:
    """An endless, seeded, per-epoch-shuffled index stream over n items, sharded by rank.

    `take(step, k)` returns the k indices this rank uses at `step` (each step consumes k
    per rank, world*k globally; epochs reshuffle with seed + epoch). It is a pure function
    of (seed, step, origin): a fresh stream starts at global position 0 at step 0; a resumed
    one at `origin` = (step, position) saved by the checkpoint (`position(step, k)`), so a
    resume with another k per step goes on from the row where the run stopped, not from
    step * k (which would skip or repeat rows)."""

    def __init__(self, n: int, *, world: int, rank: int, seed: int, origin: tuple[int, int] = (0, 0)):
        if n < 1:
            raise ValueError("IndexStream: empty dataset")
        self.n, self.world, self.rank, self.seed = n, world, rank, seed
        self.origin = (int(origin[0]), int(origin[1]))
        self._perm: dict[int, list[int]] = {}

    def _epoch(self, e: int) -> list[int]:
        if e not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perm = {e: torch.randperm(self.n, generator=g).tolist()}
        return self._perm[e]

    def position(self, step: int, k: int) -> int:
        """The global position (items drawn on all ranks) before `step`."""
        s0, p0 = self.origin
        return p0 + (step - s0) * k * self.world

    def take(self, step: int, k: int) -> list[int]:
        out = []
        base = self.position(step, k)
        for j in range(k):
            pos = base + j * self.world + self.rank  # global position of this rank's j-th item
            e, off = divmod(pos, self.n)
            out.append(self._epoch(e)[off])
        return out


def derive_seed(*parts: int) -> int:
    s = 0x9E3779B9
    for p in parts:
        s = (s * 1_000_003 + int(p) + 0x7F4A7C15) % (2**31 - 1)
    return s


# --------------------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states, in types that torch.load(weights_only=True) reads: tensors and
    plain Python (numpy's key array as an int64 tensor, not a pickled ndarray)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(),
          "numpy": (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    name, key, *rest = st["numpy"]  # a checkpoint from before rng_state's tensor form holds an ndarray
    np.random.set_state((name, np.asarray(key.numpy() if torch.is_tensor(key) else key, dtype=np.uint32), *rest))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# --------------------------------------------------------------------------- checkpoints

_PHASES = {"warmup": 0, "grpo": 1}


def checkpoint_name(phase: str, step: int) -> str:
    return f"{phase}-{step:06d}"


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    try:
        phase, step = name.rsplit("-", 1)
        return _PHASES[phase], int(step)
    except (ValueError, KeyError):
        return None


def atomic_dir_write(final: Path, write) -> None:
    """write(tmp_dir) then rename onto `final`: an interrupted save never leaves a partial
    directory under the final name, and the previous good checkpoint stays intact. A write
    that raises leaves no temporary behind; one that failed on a full disk raises
    r1vl.files.DiskFullError, which names the path (torch.save's own error does not)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    from r1vl.files import saying_disk_full

    try:
        with saying_disk_full(final):  # before the copy is removed (which frees the space)
            write(tmp)
    except BaseException:  # not left behind (a model's copy)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    best, best_key = None, None
    for p in ckpt_dir.iterdir():
        key = parse_checkpoint_name(p.name)
        if key is None or not (p / STATE_FILE).is_file():
            continue
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def _temporary_name(p: Path) -> Path:
    """`.tmp-<name>-<pid>` beside `p`: atomic_dir_write's unfinished copy, retire_dir's doomed
    directory; clean_interrupted_saves removes what a killed process left under it."""
    return p.parent / f".tmp-{p.name}-{os.getpid()}"


def retire_dir(p: Path) -> Path:
    """Take directory `p` (a checkpoint, final/, a run output) out of reach in one step, before
    deleting it: renamed to atomic_dir_write's temporary name, which clean_interrupted_saves
    removes at the next start. A removal killed midway (rmtree deletes file by file) then
    leaves nothing partial under its name (a checkpoint train.resume=true would pick). Returns
    the new path."""
    p = Path(p)
    gone = _temporary_name(p)
    if gone.exists():
        shutil.rmtree(gone, ignore_errors=True)
    os.replace(p, gone)
    return gone


def prune_checkpoints(ckpt_dir: Path, keep: int, current: str | None = None) -> None:
    """Keep the newest `keep` checkpoints (0: all); `current`, the one just written, is kept
    whatever the others are named."""
    if keep <= 0:
        return
    items = sorted(
        (parse_checkpoint_name(p.name), p) for p in Path(ckpt_dir).iterdir() if parse_checkpoint_name(p.name)
    )
    for _, p in items[:-keep]:
        if p.name != current:
            shutil.rmtree(retire_dir(p), ignore_errors=True)


def checkpoints_after(ckpt_dir: Path, name: str) -> list[Path]:
    """The checkpoints in `ckpt_dir` later than checkpoint `name` (phase, then step)."""
    key = parse_checkpoint_name(name)
    if key is None or not Path(ckpt_dir).is_dir():
        return []
    return sorted((p for p in Path(ckpt_dir).iterdir() if (k := parse_checkpoint_name(p.name)) and k > key),
                  key=lambda p: parse_checkpoint_name(p.name))


def clean_interrupted_saves(ckpt_dir: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """What atomic_dir_write (`-<pid>`) or DeepSpeed's collective save (`-ds`) left behind when
    a process died mid-save: a `.tmp-X-<pid>` (the unfinished copy) is removed; an `.old-X-<pid>`
    is the previous good copy, renamed back to X when X is missing, else removed. `names`: only
    those X (output_dir's own final/ and warmup/ beside a user's files). Returns what was done,
    for the log."""
    done: list[str] = []
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return done
    for p in sorted(ckpt_dir.iterdir()):
        m = re.fullmatch(r"\.(tmp|old)-(.+)-(?:\d+|ds)", p.name)  # atomic_dir_write's, ds._collective_dir_write's
        if not m or not p.is_dir() or (names is not None and m.group(2) not in names):
            continue
        target = ckpt_dir / m.group(2)
        if m.group(1) == "old" and not target.exists():
            os.replace(p, target)
            done.append(f"{p.name} -> {target.name}")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}")
    return done


# --------------------------------------------------------------------------- metrics


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard when installed, + a W&B run when given) on rank 0;
    nothing elsewhere."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool, fresh: bool = True,
                 wandb_run=None):
        self.enabled = enabled
        self.wandb = wandb_run if enabled else None
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rollouts_path = Path(out_dir) / "rollouts.jsonl"
        for p in (self.path, self.rollouts_path):
            if enabled and fresh and p.exists():  # a new run (not a resume) starts a new log
                p.unlink()
        self.tb = None
        self.tb_dir = Path(out_dir) / "tensorboard"
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.tb_dir))
            except Exception as e:  # tensorboard not installed or broken: JSONL only
                log.info("TensorBoard disabled (%s: %s; pip install tensorboard, or logging.tensorboard=false)",
                         e.__class__.__name__, e)

    def truncate_after(self, phase: str, step: int) -> None:
        """Drop records written after a checkpoint at (phase, step) (a killed run's tail, a
        finished run's final evaluation, an abandoned continuation), in metrics.jsonl and
        rollouts.jsonl; TensorBoard's event files (every one in output_dir/tensorboard/, the
        run's own folder) are then written again from what metrics.jsonl keeps, each point at
        its record's wall_time (TensorBoard shows a step logged twice twice, and purge_step
        would cut every phase's axis at one step)."""
        if not self.enabled:
            return
        for path in (self.path, self.rollouts_path):
            if path.is_file():
                self._truncate(path, (_PHASES.get(phase, 0), step))
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            for old in self.tb_dir.glob("events.out.tfevents.*"):
                old.unlink()
            self.tb = SummaryWriter(log_dir=str(self.tb_dir))
            for rec in read_metrics(self.path):
                self._log_tb(rec)
            self.tb.flush()

    @staticmethod
    def _truncate(path: Path, cut: tuple[int, int]) -> None:
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            ph = rec.get("phase")
            if ph == "eval":  # after the warm-up, during StepGRPO (before that step's save), at the end
                if rec.get("after") == "warmup":
                    key = (1, 0)
                elif rec.get("final", True):
                    key = (2, rec.get("step", 0))
                else:
                    key = (1, rec.get("step", 0))
            else:
                key = (_PHASES.get(ph, 0), rec.get("step", 0))
            if key <= cut:
                keep.append(line)
        from r1vl.files import write_replace

        write_replace(path, (k + "\n" for k in keep))  # a kill here leaves the file as it was

    def write_rollouts(self, record: dict) -> None:
        """One record of sampled completions (rollouts.jsonl; rank 0)."""
        if self.enabled:
            with open(self.rollouts_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=True) + "\n")

    def write(self, record: dict, *, scalars: bool = True) -> None:
        """Append a record to metrics.jsonl (with its `wall_time`, unix seconds, the x axis of
        TensorBoard's Wall/Relative views, kept when a resume writes the event files again) and
        send its numbers to TensorBoard / W&B (scalars=False: not there, for a record that repeats
        one they have)."""
        if not self.enabled:
            return
        record = {**record, "wall_time": round(record.get("wall_time", time.time()), 3)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        if not scalars:
            return
        if self.tb is not None:
            self._log_tb(record)
        if self.wandb is not None:  # x axis: <phase>/step (start_wandb defines it)
            step, prefix, scalars = _scalars(record)
            self.wandb.log({**scalars, f"{prefix}/step": step})

    def _log_tb(self, record: dict) -> None:
        step, _, scalars = _scalars(record)
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step, walltime=record.get("wall_time"))

    def set_summary(self, summary: dict) -> None:
        """The run's summary.json, its numbers flattened ('paired/p_value'), as the W&B summary."""
        if self.wandb is None:
            return
        flat = {}

        def walk(prefix, x):
            if isinstance(x, dict):
                for k, v in x.items():
                    walk(f"{prefix}/{k}" if prefix else str(k), v)
            elif isinstance(x, (int, float)) and not isinstance(x, bool):
                flat[prefix] = x
        walk("", summary)
        self.wandb.summary.update(flat)

    def close(self, exit_code: int = 0) -> None:
        """Flush and close (TensorBoard's tail; W&B's finish with the run's exit code). Once."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.finish(exit_code=exit_code)


def _scalars(record: dict) -> tuple[int, str, dict]:
    """(step, phase, {"<phase>/<key>": number}) of a metrics record, as TensorBoard and W&B log it."""
    step = record.get("global_step", record.get("step", 0))
    prefix = record.get("phase", "train")
    scalars = {f"{prefix}/{k}": v for k, v in record.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in ("step", "global_step", "wall_time")}
    return step, prefix, scalars


def read_metrics(path: Path) -> list[dict]:
    out = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def plot_run(metrics_path: Path, png_path: Path, title: str = "") -> bool:
    """PNG of training reward / accuracy per step (warm-up loss on its own axis) with the
    held-out accuracy points. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    recs = read_metrics(metrics_path)
    warm = [r for r in recs if r.get("phase") == "warmup"]
    grpo = [r for r in recs if r.get("phase") == "grpo"]
    evals = [r for r in recs if r.get("phase") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if warm:
        ax.plot([r["step"] for r in warm], [r["loss"] for r in warm], color="tab:gray")
    ax.set_xlabel("warm-up step")
    ax.set_ylabel("SFT loss (nats/token)")
    ax.set_title("warm-up")
    ax = axes[1]
    if grpo:
        xs = [r["step"] for r in grpo]
        for key, label, colour in (("reward_mean", "rollout reward (StepRAR+StepRVR)", "tab:blue"),
                                   ("accuracy", "rollout accuracy", "tab:orange")):
            ys = [r[key] for r in grpo]
            k = max(1, min(9, len(ys) // 6)) | 1  # a centred moving average over k (odd) steps (raw values faint)
            smooth = [sum(ys[max(0, i - k // 2): i + k // 2 + 1]) / len(ys[max(0, i - k // 2): i + k // 2 + 1])
                      for i in range(len(ys))]
            ax.plot(xs, ys, color=colour, alpha=0.25, linewidth=0.8)
            ax.plot(xs, smooth, color=colour, label=label + (f" ({k}-step mean)" if k > 1 else ""))
    for r in evals:
        x = 0 if r.get("after") == "warmup" else r.get("step", 0)
        if r.get("after") == "warmup" and not grpo:
            continue
        ax.scatter([x], [r["accuracy"]], color="tab:red", zorder=3)
        ax.annotate(f"{r['accuracy']:.2f}", (x, r["accuracy"]), textcoords="offset points", xytext=(4, 4))
    ax.scatter([], [], color="tab:red", label="held-out accuracy (greedy)")
    ax.set_xlabel("StepGRPO step")
    ax.set_title("StepGRPO")
    ax.set_ylim(bottom=0.0)
    ax.legend(loc="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


class Background:
    """fn() started now in a daemon thread (a daemon: an error elsewhere that ends the process
    does not wait for it); result() waits for it and returns its value or raises its exception."""

    def __init__(self, fn: Callable[[], Any], name: str):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 -- raised in the caller's thread by result()
            self._error = e

    def join(self) -> None:
        """Waits for fn to end; its value or exception stays for result()."""
        self._thread.join()

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value


class Timer:
    def __init__(self):
        self.t = {}

    def __call__(self, name: str):
        timer = self

        class _T:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()

            def __exit__(self_inner, *exc):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self_inner.t0

        return _T()

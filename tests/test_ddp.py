"""DDP with 2 gloo ranks: each rank updates on its half of a batch; the averaged gradient
gives the same parameters as one process on the whole batch, on both ranks. Plus the
reductions and the per-rank data streams the trainer uses."""
import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1vl.utils import IndexStream

from ports import free_port

sys.path.insert(0, os.path.dirname(__file__))  # the sibling test modules' helpers

pytestmark = pytest.mark.slow

CORPUS = [f"### Step 1: {a} x {b} = {a * b}\n### The final answer is: {a * b}" for a in range(10) for b in range(10)]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)
ADV = [1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.1, -0.1]
REWARDS = ([0.0, 1.1, 2.1, 0.0], [2.1, 2.1, 2.1, 2.1])  # rank 1's alone have std 0


def _setup():
    from test_algo import _batch

    from r1vl.models import PolicyWithLoss, build_tiny

    torch.manual_seed(0)
    model, proc = build_tiny(CORPUS, vocab_size=300, seed=0, **SIZES)
    batch, _ = _batch(proc, n=8, seed=11)
    return PolicyWithLoss(model), batch


def _update(policy, batch, adv, loss_type="grpo"):
    from r1vl.algo import UpdateConfig, compute_logprobs, grpo_update, sft_step

    if loss_type == "sft":  # the warm-up's step
        opt = torch.optim.SGD(policy.parameters(), lr=0.05)
        return sft_step(policy, opt, None, batch, micro_batch_size=2, max_grad_norm=0.0)
    ref = compute_logprobs(policy, batch, micro_batch_size=8) - 0.05 * batch.mask
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    cfg = UpdateConfig(micro_batch_size=2, max_grad_norm=0.0, beta=0.04, loss_type=loss_type)
    return grpo_update(policy, opt, None, batch, adv, cfg, ref_logprobs=ref)


def _worker(rank, world, port, out_dir, loss_type="grpo"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        from r1vl.utils import Dist, StatReducer

        policy, batch = _setup()
        half = list(range(rank * 4, rank * 4 + 4))
        ddp = DDP(policy, broadcast_buffers=False)
        _update(ddp, batch.slice(half), torch.tensor(ADV)[half], loss_type)
        torch.save({k: v.detach() for k, v in policy.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
        st = StatReducer()
        st.add("x", [float(rank)] * (rank + 1))  # rank 0: [0], rank 1: [1, 1]
        r = st.reduce(Dist(rank=rank, world=world), with_std=("x",))
        torch.save(r, os.path.join(out_dir, f"stats{rank}.pt"))
        from r1vl.algo import reward_std

        mine = torch.tensor(REWARDS[rank])  # scale_rewards=batch: one std over both ranks' rewards
        torch.save(reward_std(mine, "cpu"), os.path.join(out_dir, f"rstd{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from r1vl.utils import exit_after_collectives

    exit_after_collectives(0)  # no interpreter teardown after collectives (its docstring says why)



@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sft"])
def test_ddp_two_gloo_ranks_match_single_process(tmp_path, loss_type):
    """grpo: a mean over sequences; dapo and the warm-up's sft: one token mean over the global
    batch, whose halves hold different token counts here (so a per-rank normaliser would not
    match)."""
    # spawn, not fork: a fork of the pytest process after earlier tests ran threads (OpenMP,
    # the reward pool's readers) deadlocked in the child in a full-suite run
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path), loss_type), nprocs=2, join=True,
                       start_method="spawn")
    p0 = torch.load(tmp_path / "rank0.pt")
    p1 = torch.load(tmp_path / "rank1.pt")
    policy, batch = _setup()
    if loss_type in ("dapo", "sft"):
        assert batch.mask[:4].sum() != batch.mask[4:].sum()
    before = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    _update(policy, batch, torch.tensor(ADV), loss_type)
    single = policy.state_dict()
    moved = 0
    for k in single:
        torch.testing.assert_close(p0[k], p1[k], rtol=0, atol=0)  # ranks agree exactly
        torch.testing.assert_close(p0[k], single[k], rtol=1e-4, atol=1e-6)  # = the whole batch at once
        moved += int(not torch.equal(before[k], single[k]))
    assert moved > 0
    s0 = torch.load(tmp_path / "stats0.pt")
    s1 = torch.load(tmp_path / "stats1.pt")
    assert s0 == s1
    assert s0["x"] == pytest.approx(2 / 3) and s0["x_std"] == pytest.approx((2 / 9) ** 0.5)
    both = torch.tensor(REWARDS[0] + REWARDS[1]).double().std().item()
    assert torch.load(tmp_path / "rstd0.pt") == torch.load(tmp_path / "rstd1.pt") == pytest.approx(both, rel=1e-12)


def test_index_stream_shards_are_disjoint_and_deterministic():
    n, k, world = 50, 3, 4
    streams = [IndexStream(n, world=world, rank=r, seed=5) for r in range(world)]
    seen = []
    for step in range(4):  # 4 steps x 3 x 4 ranks = 48 < 50: no index twice within the epoch
        for s in streams:
            seen.extend(s.take(step, k))
    assert len(seen) == len(set(seen)) == 48
    again = IndexStream(n, world=world, rank=2, seed=5)
    assert [again.take(s, k) for s in range(6)] == [streams[2].take(s, k) for s in range(6)]
    assert IndexStream(n, world=world, rank=2, seed=6).take(0, k) != streams[2].take(0, k)
    # later epochs cover everything again
    one = IndexStream(10, world=1, rank=0, seed=0)
    assert sorted(one.take(1, 10)) == list(range(10))


def test_torchrun_two_ranks_end_to_end(tmp_path, data_dir):
    """`torchrun --nproc-per-node 2 -m r1vl.train` on a very small run: both ranks train, rank 0
    alone writes the outputs, metrics are reduced over the ranks. With scale_rewards=batch (its
    std is a collective over the ranks). Then a resume on an edited training file: every rank
    refuses it at start, rank 0 alone says so, none waits on another."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from test_train import FAST

    out = tmp_path / "run"
    data_dir = shutil.copytree(data_dir, tmp_path / "data")  # edited below
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "r1vl.train",
           f"output_dir={out}", f"data.synthetic_dir={data_dir}", *FAST, "train.max_steps=2", "logging.plot=false",
           "algorithm.scale_rewards=batch", "train.save_every=2"]
    r = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in recs] == ["warmup", "warmup", "eval", "grpo", "grpo", "eval"]
    assert recs[2]["n"] == 4  # the 4 held-out items were split over the 2 ranks and summed back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    # eval outputs: both ranks' samples, back in data order
    final = [json.loads(x) for x in (out / "eval_outputs" / "final.jsonl").read_text().splitlines()]
    test_rows = [json.loads(x) for x in (Path(data_dir) / "test.jsonl").read_text().splitlines()]
    assert [r["index"] for r in final] == [0, 1, 2, 3]
    assert [r["problem"] for r in final] == [x["problem"] for x in test_rows[:4]]
    assert sum(r["correct"] for r in final) / 4 == pytest.approx(recs[-1]["accuracy"])
    assert (out / "final" / "model.safetensors").is_file()

    rows = (Path(data_dir) / "train.jsonl").read_text().splitlines()
    edited = json.loads(rows[0])
    edited["problem"] += " Answer carefully."
    (Path(data_dir) / "train.jsonl").write_text("\n".join([json.dumps(edited)] + rows[1:]) + "\n")
    cmd[4] = str(free_port())
    r = subprocess.run([*cmd, "train.resume=true", "train.max_steps=3"], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("was written by a run on other data (data.train: the same 60 rows with other text") \
        == 1, r.stderr[-3000:]
    assert [json.loads(x)["phase"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [
        x["phase"] for x in recs]  # nothing of the run touched

    # the data as they were, resumed on 1 rank (no DeepSpeed: the optimizer state is whole): the
    # data go on from the global row where the 2 ranks stopped, 2 rows per step now
    (Path(data_dir) / "train.jsonl").write_text("\n".join(rows) + "\n")
    r = subprocess.run([sys.executable, "-m", "r1vl.train", *cmd[7:], "train.resume=true", "train.max_steps=4"],
                       cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"train.resume: {out / 'checkpoints' / 'grpo-000002'} was written by 2 rank(s), this run has 1; its " \
           "StepGRPO steps draw 2 rows each (train.prompts_per_step=2 per rank x 1), where the run it continues drew " \
           "4 (train.prompts_per_step=4 keeps them)" in r.stderr, r.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["step"]) for x in recs[-3:]] == [("grpo", 3), ("grpo", 4), ("eval", 4)]
    from r1vl.config import Config
    from r1vl.utils import STATE_FILE, derive_seed

    state = torch.load(out / "checkpoints" / "grpo-000004" / STATE_FILE, weights_only=True)
    assert state["world"] == 1 and len(state["rng"]) == 1
    assert state["data_position"] == {"phase": "grpo", "step": 4, "position": 2 * 2 * 2 + 2 * 2 * 1}
    # step 3's first prompt is the stream's row at global position 8, where the 2 ranks stopped
    first = IndexStream(60, world=1, rank=0, seed=derive_seed(Config().seed, 2), origin=(2, 8)).take(2, 2)[0]
    logged = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 2, 3, 4]
    assert logged[2]["problem"] == json.loads(rows[first])["problem"]


def test_a_signal_to_one_rank_during_the_final_save_finishes_the_run_and_rank_0_says_so(tmp_path, data_dir):
    """A SIGUSR1 after the final evaluation (here: to rank 1 alone, as the final save starts)
    stops nothing: the run finishes with its outputs complete, exit 0. Rank 0, which alone
    speaks, said so only for a signal of its own: one that reached another rank alone was
    silent on every rank."""
    import subprocess
    from pathlib import Path

    from test_train import FAST

    wrapper = tmp_path / "late_signal.py"
    wrapper.write_text("import os, signal, sys, time\nimport r1vl.train as train\n"
                       "save = train.save_model_dir\n"
                       "def late(path, *a, **kw):\n"
                       "    if path.name == 'final' and os.environ['RANK'] == '1':\n"
                       "        os.kill(os.getpid(), signal.SIGUSR1)\n"
                       "        time.sleep(0.05)\n"
                       "    return save(path, *a, **kw)\n"
                       "train.save_model_dir = late\n"
                       "sys.exit(train.main(sys.argv[1:]))\n")
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), str(wrapper),
                        f"output_dir={out}", f"data.synthetic_dir={data_dir}", *FAST, "train.max_steps=1",
                        "logging.plot=false", "train.eval_before=false", "train.eval_after=false"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("SIGUSR1 came after the final evaluation: the run finished, its outputs are complete") \
        == 1, r.stderr[-3000:]
    assert "stopping at the end of this step" not in r.stderr  # (rank 1's handler: quiet)
    assert (out / "final" / "model.safetensors").is_file() and (out / "summary.json").is_file()


def _per_rank_cwd_run(tmp_path, dirs, *args, timeout_s=120):
    """torchrun, 2 ranks, each started in its own working directory (dirs[rank]): two nodes
    whose files differ, on one machine."""
    import subprocess
    from pathlib import Path

    wrapper = tmp_path / "per_rank_cwd.py"
    wrapper.write_text("import os, sys\nos.chdir(sys.argv[1 + int(os.environ['RANK'])])\n"
                       "from r1vl.train import main\nsys.exit(main(sys.argv[3:]))\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), str(wrapper),
                           *map(str, dirs), *args, f"distributed.timeout_s={timeout_s}"], env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_start_up_problem_of_one_rank_stops_every_rank_at_once_and_is_printed(tmp_path, data_dir):
    """One rank's files differ (a node's local disk): its start-up check fails. It stopped before
    the process group started, the other rank waited there for distributed.timeout_s (30 min by
    default), and the error was printed nowhere (rank 0 prints). Now the ranks agree on the
    start-up checks: both stop at once, rank 0 printing the failing rank's error."""
    import shutil
    import time

    from test_train import FAST

    a, b = tmp_path / "a", tmp_path / "b"
    for where in (a, b):
        where.mkdir()
    shutil.copy(data_dir / "train.jsonl", a / "train.jsonl")  # rank 1's directory has none
    args = [f"output_dir={tmp_path / 'run'}", f"data.synthetic_dir={data_dir}", *FAST, "train.max_steps=1",
            "data.train=train.jsonl", f"data.test={data_dir / 'test.jsonl'}"]
    t = time.perf_counter()
    r = _per_rank_cwd_run(tmp_path, (a, b), *args, timeout_s=180)
    # not the process group's timeout (start-up alone took 16 s here, 23 s on a busy machine)
    assert time.perf_counter() - t < 180
    assert r.returncode != 0
    assert "r1vl.train: error: rank 1 (of those failing: 1): data.train: train.jsonl does not exist" in r.stderr, \
        r.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_an_output_dir_the_ranks_do_not_share_is_refused(tmp_path, data_dir):
    """A relative output_dir from two working directories (two nodes' local disks): rank 0's files
    (data, checkpoints, the resume point) are not where the other rank looks. Refused on every
    rank, naming it; each rank used to pick its own resume point."""
    from test_train import FAST

    a, b = tmp_path / "a", tmp_path / "b"
    for where in (a, b):
        where.mkdir()
    r = _per_rank_cwd_run(tmp_path, (a, b), "output_dir=run", f"data.synthetic_dir={data_dir}", *FAST,
                          "train.max_steps=1")
    assert r.returncode != 0
    assert f"r1vl.train: error: rank 1 (of those failing: 1): output_dir run (here {b / 'run'}, host " in r.stderr \
        and "does not hold the files rank 0 writes there: every rank must see one output_dir" in r.stderr, \
        r.stderr[-3000:]
    assert not (b / "run").exists() and not list((a / "run").glob(".r1vl-shared-*"))


def test_srun_tasks_without_torchrun_are_refused(monkeypatch):
    """srun -n 4 python -m r1vl.train: four one-process runs into one output_dir (interleaved where
    the file system has no locks). Tasks past the first are refused, saying how to launch."""
    from r1vl.train import main
    from r1vl.utils import slurm_task_problem

    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert slurm_task_problem() is None  # task 0, or an sbatch script's one process
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert slurm_task_problem().startswith("SLURM task 2 (of 4) without torchrun's RANK / WORLD_SIZE")
    assert main(["--print-config"]) == 2
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert slurm_task_problem() is None  # torchrun's (or the launcher's) environment, or chosen alone


def _proc_stat(pid):
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    from pathlib import Path

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
@pytest.mark.parametrize("when", ["training", "starting"])
def test_the_ranks_die_with_a_torchrun_killed_by_sigkill(when, tmp_path, data_dir):
    """A torchrun killed with SIGKILL (or by the OOM killer) cannot stop its workers: they went on
    training, holding the devices and the output_dir's lock. Each rank now asks the kernel for a
    SIGKILL when its launcher dies, first thing (a torchrun killed while its ranks import torch)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    from test_train import FAST

    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "r1vl.train",
           f"output_dir={out}", f"data.synthetic_dir={data_dir}", *FAST, "warmup.steps=5000", "train.max_steps=0",
           "train.eval_before=false", "train.eval_after=false", "train.save_final=false", "logging.plot=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=log)
    workers = []

    def children():
        return [int(p.name) for p in Path("/proc").iterdir()
                if p.name.isdigit() and (_proc_stat(p.name) or ("", 0))[1] == proc.pid]

    def importing_torch():  # both ranks past r1vl's first lines, loading torch's libraries
        try:
            return sum("libtorch" in Path(f"/proc/{w}/maps").read_text() for w in children()) == 2
        except OSError:
            return False

    try:
        deadline = time.monotonic() + 240
        while not (importing_torch() if when == "starting" else
                   (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"not {when} in 240 s"
            time.sleep(0.2 if when == "training" else 0.01)
        workers = children()
        assert len(workers) == 2, workers
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while any((_proc_stat(w) or ("Z",))[0] != "Z" for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all((_proc_stat(w) or ("Z",))[0] == "Z" for w in workers), "a rank outlived its torchrun"
    finally:
        log.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


def test_index_stream_reshuffles_each_epoch():
    """Each epoch is a new shuffle (a mutant drawing the same permutation every epoch passed the suite)."""
    from r1vl.utils import IndexStream

    one = IndexStream(10, world=1, rank=0, seed=0)
    e0, e1 = one.take(0, 10), one.take(1, 10)
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1


def test_stat_reducer_std_of_equal_values_is_zero():
    """s2/c - mean^2 is -1.7e-18 for [0.1]*3: clamped, not a math domain error."""
    from r1vl.utils import Dist, StatReducer

    st = StatReducer()
    st.add("x", [0.1] * 3)
    st.add("y", 2.0, weight=3.0)
    st.add("y", 4.0, weight=1.0)
    st.add("none", [])
    out = st.reduce(Dist(), with_std=("x", "y"))
    assert math.isnan(out["none"])  # no item anywhere: nan, not 0
    assert out["x"] == pytest.approx(0.1) and out["x_std"] == 0.0
    assert out["y"] == pytest.approx(2.5) and out["y_std"] == pytest.approx(0.75 ** 0.5)  # weighted

"""bench/bench_loss.py end to end at a tiny CPU shape: the JSON schema the issue asks for,
one row per backend and peer, and the same loss value from every GRPO implementation
(the rows time the same objective on the same inputs)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.needs("triton", "liger_kernel")
def test_bench_loss_tiny_cpu(tmp_path):
    out = tmp_path / "loss.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "bench/bench_loss.py", "--device", "cpu", "--dtype", "float32",
         "--shapes", "64x300x48", "--backends", "torch,triton", "--reps", "2", "--warmup", "1",
         "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    peers = ("reference", "liger_chunked") + (("trl_chunked",) if importlib.util.find_spec("trl") else ())
    for impl in ("fused_torch", "fused_triton", "logprobs_torch", "logprobs_triton", *peers, "floor", "floor_fwd"):
        r = rows[impl]
        assert {"impl", "device", "hidden", "vocab", "tokens", "dtype", "ms_median",
                "peak_mem_bytes", "versions"} <= set(r)
        assert (r["hidden"], r["vocab"], r["tokens"], r["dtype"]) == (64, 300, 48, "float32")
        if impl == "reference":                      # measured for its peak memory only: one untimed call
            assert r["ms_median"] is None and r["timed"] is False and r["peak_mem_bytes"] > 0
            continue
        assert r["ms_median"] > 0 and math.isfinite(r["ms_median"]), impl
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
    losses = [rows[i]["loss_value"] for i in ("fused_torch", "fused_triton", *peers)]
    assert max(losses) - min(losses) <= 1e-5 * max(1.0, abs(losses[0])), losses
    assert "targets" in data and "floor" in proc.stdout
    assert data["triton_autotune"] == {}            # the interpreter runs fixed blocks, no autotuner


@pytest.mark.needs("triton")
def test_autotune_choices_reads_the_forward_autotuner(monkeypatch):
    """What bench_loss.py records of the compiled forward's autotuning (on the GPU)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_loss
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import r1vl.kernels.triton_grpo as tg

    class Tuned:
        cache = {(151936, 1536, False, False, "torch.bfloat16"): "BLOCK_M: 64, FLAT: True, num_warps: 4"}

    monkeypatch.setattr(tg, "_FWD_TUNED", [Tuned()])
    assert bench_loss.autotune_choices() == {
        "(151936, 1536, False, False, 'torch.bfloat16')": "BLOCK_M: 64, FLAT: True, num_warps: 4"}
    monkeypatch.setattr(tg, "_FWD_TUNED", [])
    assert bench_loss.autotune_choices() == {}


# ----------------------------------------------------------------------------- in-process, tiny CPU shapes

SHAPE, TARGET = "64x300x48", "32x200x64"
FAST = ["--device", "cpu", "--dtype", "float32", "--reps", "1", "--warmup", "0", "--input-sets", "2"]


def _bench_loss():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_loss
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return bench_loss


def _rows(path):
    return json.loads(Path(path).read_text())["rows"]


def test_json_written_after_each_row_and_kept_when_cut_off(tmp_path, monkeypatch):
    """The JSON is replaced (temp file + rename) after every row, with the targets judged on
    the rows so far: a run that dies in the middle of a shape keeps the rows before."""
    bl = _bench_loss()
    out = tmp_path / "loss.json"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if Path(dst) == out:
            seen.append([r["impl"] for r in _rows(out)])

    monkeypatch.setattr(bl.os, "replace", replace)
    real_build = bl.build

    def build(impl, device, floor_chunk_bytes):
        if impl == "reference":
            raise KeyboardInterrupt       # e.g. the stage's timeout: not an error the row records
        return real_build(impl, device, floor_chunk_bytes)

    monkeypatch.setattr(bl, "build", build)
    with pytest.raises(KeyboardInterrupt):
        bl.main(FAST + ["--shapes", f"{TARGET},{SHAPE}", "--targets-at", TARGET, "--out", str(out),
                        "--impls", "reference,fused_torch,logprobs_torch,floor_fwd,floor"])
    assert seen == [["floor"], ["floor", "floor_fwd"], ["floor", "floor_fwd", "fused_torch"],
                    ["floor", "floor_fwd", "fused_torch", "logprobs_torch"]]
    data = json.loads(out.read_text())
    assert all(r["ms_median"] > 0 for r in data["rows"])
    judged = {(t["impl"], t["target"]): t for t in data["targets"]}
    assert judged[("fused_torch", "fwd+bwd time / floor (3 GEMMs)")]["value"] > 0
    assert judged[("fused_torch", "peak memory / reference's")]["value"] is None   # reference not reached
    assert [p.name for p in tmp_path.iterdir()] == ["loss.json"]                     # no temp file left


def test_target_shape_first_floors_first_reference_untimed(tmp_path, capsys):
    bl = _bench_loss()
    out = tmp_path / "loss.json"
    bl.main(FAST + ["--shapes", f"{SHAPE},{TARGET}", "--targets-at", TARGET, "--out", str(out),
                    "--impls", "reference,fused_torch,floor,floor_fwd"])
    rows = _rows(out)
    order = [(r["hidden"], r["impl"]) for r in rows]
    assert order == [(32, "floor"), (32, "floor_fwd"), (32, "fused_torch"), (32, "reference"),
                     (64, "floor"), (64, "floor_fwd"), (64, "fused_torch"), (64, "reference")]
    by = {(r["hidden"], r["impl"]): r for r in rows}
    for h in (32, 64):
        ref = by[(h, "reference")]
        assert ref["ms_median"] is None and ref["timed"] is False and "untimed" in ref["note"]
        assert ref["peak_mem_bytes"] > 0 and "tflops" not in ref
        # its one call computes the same loss as the fused op on the same input set
        assert ref["loss_value"] == pytest.approx(by[(h, "fused_torch")]["loss_value"], rel=1e-5)
    data = json.loads(out.read_text())
    assert data["config"]["reference_timed"] is False
    peak = next(t for t in data["targets"] if t["target"] == "peak memory / reference's")
    assert peak["value"] is not None                         # judged on the untimed peak
    assert "untimed" in capsys.readouterr().out
    bl.main(FAST + ["--shapes", TARGET, "--out", str(out), "--impls", "reference", "--time-reference"])
    (ref,) = _rows(out)
    assert ref["ms_median"] > 0 and "timed" not in ref


def test_torch_variant_rows_at_the_target_shape(tmp_path, monkeypatch):
    """fused_torch2p (R1VL_KERNEL_ONEPASS=0) and fused_torch_c<MB> (R1VL_ONEPASS_CHUNK_MB) run
    at the judged shape only, under their environment during the call and not after, and
    compute the same loss."""
    bl = _bench_loss()
    monkeypatch.delenv("R1VL_KERNEL_ONEPASS", raising=False)
    monkeypatch.delenv("R1VL_ONEPASS_CHUNK_MB", raising=False)
    monkeypatch.setattr(bl, "PEERS", ("floor",))             # the default rows, without the peers
    calls = []
    real = bl.fused_linear_grpo_loss

    def spy(*a, **kw):
        calls.append((os.environ.get("R1VL_KERNEL_ONEPASS"), os.environ.get("R1VL_ONEPASS_CHUNK_MB")))
        return real(*a, **kw)

    monkeypatch.setattr(bl, "fused_linear_grpo_loss", spy)
    out = tmp_path / "loss.json"
    bl.main(FAST + ["--shapes", f"{SHAPE},{TARGET}", "--targets-at", TARGET, "--out", str(out),
                    "--onepass-chunk-mb", "256,64,1024"])
    rows = _rows(out)
    at = {r["impl"]: r for r in rows if r["hidden"] == 32}
    other = {r["impl"] for r in rows if r["hidden"] == 64}
    variants = {"fused_torch2p", "fused_torch_c64", "fused_torch_c1024"}
    assert variants <= set(at) and not variants & other and "fused_torch_c256" not in at
    assert [i for i in at if i.startswith("fused_")] == ["fused_torch", "fused_torch2p", "fused_torch_c64",
                                                         "fused_torch_c1024"]
    assert at["fused_torch2p"]["env"] == {"R1VL_KERNEL_ONEPASS": "0"}
    assert at["fused_torch_c64"]["env"] == {"R1VL_ONEPASS_CHUNK_MB": "64"}
    assert "CUDA chunk only" in at["fused_torch_c64"]["note"]
    for i in variants:
        assert at[i]["ms_median"] > 0
        assert at[i]["loss_value"] == pytest.approx(at["fused_torch"]["loss_value"], rel=1e-5)
    assert {("0", None), (None, "64"), (None, "1024"), (None, None)} == set(calls)
    assert "R1VL_KERNEL_ONEPASS" not in os.environ and "R1VL_ONEPASS_CHUNK_MB" not in os.environ
    targets = {t["impl"] for t in json.loads(out.read_text())["targets"]}
    assert variants <= targets                               # each variant judged against the targets
    # --torch-variants-at all: at every shape
    bl.main(FAST + ["--shapes", f"{SHAPE},{TARGET}", "--targets-at", TARGET, "--out", str(out),
                    "--impls", "fused_torch2p", "--torch-variants-at", "all"])
    assert [r["hidden"] for r in _rows(out)] == [32, 64]


def test_auto_rows_recorded_as_aliases_not_run_again(tmp_path, capsys):
    """backend auto runs another backend's code (torch on CPU; AUTO_CUDA on CUDA): its rows
    name that row instead of timing it twice, and no target is judged on them."""
    bl = _bench_loss()
    out = tmp_path / "loss.json"
    bl.main(FAST + ["--shapes", TARGET, "--targets-at", TARGET, "--out", str(out), "--backends", "auto,torch",
                    "--impls", "fused,logprobs,floor,floor_fwd"])
    data = json.loads(out.read_text())
    by = {r["impl"]: r for r in data["rows"]}
    assert data["config"]["aliases"] == {"fused_auto": "fused_torch", "logprobs_auto": "logprobs_torch"}
    for auto, same in data["config"]["aliases"].items():
        assert by[auto]["alias_of"] == same and by[auto]["ms_median"] is None and "error" not in by[auto]
        assert by[same]["ms_median"] > 0
    assert [r["impl"] for r in data["rows"]][2:] == ["fused_torch", "fused_auto", "logprobs_torch", "logprobs_auto"]
    assert not {t["impl"] for t in data["targets"]} & {"fused_auto", "logprobs_auto"}
    assert "= fused_torch" in capsys.readouterr().out
    # asked for alone, auto runs
    bl.main(FAST + ["--shapes", TARGET, "--out", str(out), "--backends", "auto", "--impls", "fused"])
    (row,) = _rows(out)
    assert row["impl"] == "fused_auto" and row["ms_median"] > 0 and "alias_of" not in row


def test_config_records_tf32(tmp_path):
    bl = _bench_loss()
    out = tmp_path / "loss.json"
    bl.main(FAST + ["--shapes", SHAPE, "--out", str(out), "--impls", "floor_fwd"])
    tf32 = json.loads(out.read_text())["config"]["tf32"]
    assert tf32["cuda.matmul.allow_tf32"] == torch.backends.cuda.matmul.allow_tf32
    assert tf32["cudnn.allow_tf32"] == torch.backends.cudnn.allow_tf32
    assert tf32["float32_matmul_precision"] == torch.get_float32_matmul_precision()


def test_onepass_chunk_env_overrides_the_cuda_budget(monkeypatch):
    from r1vl.kernels import onepass

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("R1VL_ONEPASS_CHUNK_MB", raising=False)
    assert onepass._budget(cuda) == onepass.CHUNK_BYTES_CUDA and onepass._budget(cpu) == onepass.CHUNK_BYTES_CPU
    monkeypatch.setenv("R1VL_ONEPASS_CHUNK_MB", "1024")
    assert onepass._budget(cuda) == 1024 << 20 and onepass._budget(cpu) == onepass.CHUNK_BYTES_CPU
    assert onepass._chunk_rows(16384, 152064, cuda) == 1765              # vs 441 at 256 MiB
    monkeypatch.setenv("R1VL_ONEPASS_CHUNK_MB", "")
    assert onepass._budget(cuda) == onepass.CHUNK_BYTES_CUDA
    for bad in ("0", "-5", "1.5", "big"):
        monkeypatch.setenv("R1VL_ONEPASS_CHUNK_MB", bad)
        with pytest.raises(ValueError, match="R1VL_ONEPASS_CHUNK_MB"):
            onepass._budget(cuda)

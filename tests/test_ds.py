"""DeepSpeed ZeRO-2/3 (r1vl.ds).

Fast: filling the DeepSpeed JSON from the trainer's config and its errors; the shipped
configs. Slow (two gloo ranks on CPU, spawned): ZeRO-3 and ZeRO-2 trainings of a tiny
Qwen2-VL whose fused GRPO loss runs inside the LM head's forward (tied to embed_tokens)
match one process on the whole batch; the shipped bf16 configs train (finite loss, moving
weights); gathered 16-bit saves load with the Auto classes and equal the gathered weights;
a DeepSpeed checkpoint resumes with equal optimizer state and equal next step; bucketed
weight-sync gathers; reference model (copy + ZeRO-3 inference engine); generation with
gathered weights (ranks generate different amounts) and with synced_gpus; a module that
reads a weight it does not own sees an empty shard until it registers it.
"""
import copy
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from r1vl import ds

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "ds_zero2.json"
ZERO3 = ROOT / "configs" / "ds_zero3.json"

CORPUS = [f"### Step 1: {a} x {b} = {a * b}\n### The final answer is: {a * b}" for a in range(10) for b in range(10)]
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, vision_depth=1, vision_embed_dim=32, vision_num_heads=1)
N, MICRO, WORLD = 8, 2, 2  # sequences per step (all ranks), micro-batch, ranks
ADV = [torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.1, -0.1]),
       torch.tensor([-0.3, 0.7, 1.5, -1.5, 0.2, -0.2, -1.0, 1.0])]
LR, WD, CLIP, BETA = 1e-2, 0.01, 1.0, 0.04
SGD_LR = 0.05  # the exactness runs use SGD with momentum: Adam's per-element normalisation would turn
# float-rounding differences of tiny gradients into visible update differences, and hide gradient scale


def fill(raw, **kw):
    args = dict(micro_batch_size=16, gradient_accumulation_steps=2, world_size=4, max_grad_norm=1.0)
    args.update(kw)
    return ds.fill_config(raw, source="cfg.json", **args)


# --------------------------------------------------------------------------- config (fast)


def test_auto_keys_are_filled_from_the_trainer():
    out = fill({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 2}}, dtype="bfloat16")
    assert out["train_micro_batch_size_per_gpu"] == 16 and out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 16 * 2 * 4 and out["gradient_clipping"] == 1.0
    assert out["bf16"]["enabled"] is True and out["zero_optimization"]["stage"] == 2
    assert fill({})["zero_optimization"]["stage"] == 0  # fp32 stage 0: allowed (DDP-like)
    # stage 0 in 16 bits: DeepSpeed's wrapper steps the optimizer once when built
    with pytest.raises(ds.DeepSpeedConfigError, match="stage 0 with bf16/fp16 is not supported"):
        fill({"bf16": {"enabled": "auto"}}, dtype="bfloat16")
    # explicit values that agree are kept; max_grad_norm 0 = no clipping
    same = fill({"train_batch_size": 128, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0},
                max_grad_norm=0.0)
    assert same["train_batch_size"] == 128 and same["gradient_clipping"] == 0.0
    assert fill({"bf16": {"enabled": "auto"}}, dtype="float32")["bf16"]["enabled"] is False


@pytest.mark.parametrize("key,value,trainer_key", [
    ("train_micro_batch_size_per_gpu", 8, "train.micro_batch_size"),
    ("gradient_accumulation_steps", 4, "train.prompts_per_step"),
    ("train_batch_size", 64, "rank(s)"),
    ("gradient_clipping", 0.5, "optim.max_grad_norm"),
])
def test_conflicting_explicit_value_names_file_and_key(key, value, trainer_key):
    with pytest.raises(ds.DeepSpeedConfigError) as e:
        fill({key: value})
    msg = str(e.value)
    assert msg.startswith("cfg.json: ") and key in msg and repr(value) in msg and trainer_key in msg and "auto" in msg


@pytest.mark.parametrize("raw,match", [
    ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
    ({"managed_gradient_accumulation": False}, "managed_gradient_accumulation"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both true"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
    ({"train_batch_size": "32"}, "train_batch_size: expected a number"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, "zero_optimization.allgather_bucket_size"),
])
def test_config_mistakes_are_clear(raw, match):
    with pytest.raises(ds.DeepSpeedConfigError, match=match) as e:
        fill(raw)
    assert str(e.value).startswith("cfg.json: ")


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "bf16": {"enabled": true},\n  "zero_optimization": {"stage": 3,}\n}\n')
    with pytest.raises(ds.DeepSpeedConfigError, match=r"ds\.json: not valid JSON \(line 3, column"):
        ds.read_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ds.DeepSpeedConfigError, match="expected a JSON object"):
        ds.read_config(bad)
    with pytest.raises(ds.DeepSpeedConfigError, match="config file not found"):
        ds.read_config(tmp_path / "nope.json")


@pytest.mark.parametrize("path,stage", [(ZERO2, 2), (ZERO3, 3)])
def test_shipped_configs(path, stage):
    raw = json.loads(path.read_text())
    for key in ds.TRAINER_KEYS:  # never hard-coded: always the trainer's values
        assert raw[key] == "auto"
    assert raw["bf16"]["enabled"] is True
    out = ds.load_config(path, micro_batch_size=16, gradient_accumulation_steps=2, world_size=4, max_grad_norm=1.0)
    assert ds.zero_stage(out) == stage and out["train_batch_size"] == 128
    if stage == 3:
        assert out["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
        model = torch.nn.Module()
        model.config = type("C", (), {"text_config": type("T", (), {"hidden_size": 3584})()})()
        sized = ds.fill_model_sizes(out, model)["zero_optimization"]
        assert sized["reduce_bucket_size"] == 3584 ** 2
        assert sized["stage3_prefetch_bucket_size"] == int(0.9 * 3584 ** 2)
        assert sized["stage3_param_persistence_threshold"] == 35840


def test_config_from_trainer_config():
    from r1vl.config import load_config

    cfg = load_config(None, [f"deepspeed={ZERO3}", "train.prompts_per_step=3", "rollout.num_generations=8",
                             "train.micro_batch_size=5", "optim.max_grad_norm=0.5"])
    out = ds.config_from_trainer(cfg, world_size=4)
    assert out["train_micro_batch_size_per_gpu"] == 5
    assert out["gradient_accumulation_steps"] == math.ceil(24 / 5)
    assert out["train_batch_size"] == 5 * 5 * 4 and out["gradient_clipping"] == 0.5


def test_preflight_check_without_ranks(tmp_path):
    from r1vl.config import load_config

    path = tmp_path / "z.json"
    overrides = ["train.prompts_per_step=4", "rollout.num_generations=8", "train.micro_batch_size=16"]
    path.write_text(json.dumps({"train_batch_size": 128, "zero_optimization": {"stage": 3}}))
    out = ds.check_config(load_config(None, [f"deepspeed={path}"] + overrides))
    assert out["train_batch_size"] == 128 and out["gradient_accumulation_steps"] == 2  # 4 ranks x 16 x 2
    path.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(ds.DeepSpeedConfigError, match="not a multiple of micro batch x accumulation steps = 32"):
        ds.check_config(load_config(None, [f"deepspeed={path}"] + overrides))
    assert ds.check_config(load_config(None, [f"deepspeed={ZERO2}"] + overrides))["train_batch_size"] == 32


def test_load_checkpoint_without_deepspeed_state_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ds.DeepSpeedCheckpointError, match="written by a run without deepspeed"):
        ds.load_checkpoint(object(), tmp_path)


def test_a_universal_conversion_that_fails_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """ds.universal_checkpoint (a resume on another number of ranks): DeepSpeed's converter
    failing on a damaged ds/ is one DeepSpeedCheckpointError naming the checkpoint, the
    converter's last words and its command; too little free space is said before it starts;
    the temporary folder is gone either way."""
    pytest.importorskip("deepspeed")
    ck = tmp_path / "grpo-000002"
    (ck / ds.CHECKPOINT_TAG).mkdir(parents=True)
    (ck / ds.CHECKPOINT_TAG / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"not a pickle" * 100)
    work = tmp_path / "checkpoints"
    with pytest.raises(ds.DeepSpeedCheckpointError) as e:
        with ds.universal_checkpoint(ck, work):
            pytest.fail("no converted checkpoint to load")
    msg = str(e.value)
    assert msg.startswith(f"{ck}: DeepSpeed's ds_to_universal could not convert its state to another number of "
                          "ranks (exit ") and "deepspeed.checkpoint.ds_to_universal --input_folder" in msg
    assert "\n" not in msg and list(work.iterdir()) == []

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**40, 2**40 - 100, 100))
    with pytest.raises(ds.DeepSpeedCheckpointError, match=r"needs about 0\.0 GiB in .*checkpoints, which has 0\.0 GiB free"):
        with ds.universal_checkpoint(ck, work):
            pytest.fail("no converted checkpoint to load")
    assert list(work.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's (prctl)")
def test_the_universal_converter_dies_with_the_process_that_started_it(tmp_path):
    """ds_to_universal runs in a child process: a rank 0 killed during the conversion (SIGKILL,
    OOM) takes it along, not leaving it converting beside the run that restarts. The checkpoint's
    files are FIFOs here: the converter blocks reading one (past its start, where it asks for the
    parent-death signal), is stopped (SIGSTOP: only the kernel's signal can end it), then its
    parent is killed."""
    import errno
    import signal
    import subprocess
    import time

    pytest.importorskip("deepspeed")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / ds.CHECKPOINT_TAG).mkdir(parents=True)
    fifos = [src / ds.CHECKPOINT_TAG / n for n in ("mp_rank_00_model_states.pt",
                                                   "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")]
    for f in fifos:
        os.mkfifo(f)
    dst.mkdir()
    code = f"from pathlib import Path\nfrom r1vl import ds\nds._convert_to_universal(Path({str(src)!r}), Path({str(dst)!r}))"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    held, child = [], None
    deadline = time.time() + 120
    try:
        while not held and time.time() < deadline and parent.poll() is None:
            for f in fifos:  # a writer's non-blocking open succeeds once a reader waits on the FIFO
                try:
                    held.append(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
                except OSError as e:
                    assert e.errno == errno.ENXIO
            time.sleep(0.05)
        assert held, "the converter never read its input"
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == parent.pid:
                child = int(pid)
        assert child is not None
        os.kill(child, signal.SIGSTOP)
    finally:
        parent.kill()
        parent.wait()
    try:
        for _ in range(200):
            try:
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                state = "gone"
            if state in ("Z", "X", "gone"):
                break
            time.sleep(0.05)
        assert state in ("Z", "X", "gone"), state
    finally:
        if state not in ("Z", "X", "gone"):
            os.kill(child, signal.SIGKILL)
        for fd in held:
            os.close(fd)


def test_named_parameters_without_zero3_yields_the_parameters_themselves():
    lin = torch.nn.Linear(4, 4)
    emb = torch.nn.Embedding(4, 4)
    m = torch.nn.Sequential(emb, lin)
    lin.weight = emb.weight  # tied: once, under the first name
    named = list(ds.named_parameters(m))
    assert [n for n, _ in named] == ["0.weight", "1.bias"]
    assert named[0][1].data_ptr() == emb.weight.data_ptr()
    assert not ds.is_zero3(m) and not ds.is_engine(m)
    with ds.gathered(m.parameters()):  # no-op without ZeRO-3
        pass
    assert ds.generation_kwargs(m) == {"synced_gpus": False}


# --------------------------------------------------------------------------- two ranks (slow)


def _img(seed, w, h=56):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


_CACHE: dict = {}


def _setup():
    """(model, processor, batch, ref_logprobs, initial state) built once per process
    (deterministic: the spawned ranks rebuild exactly what the parent compares against)."""
    if not _CACHE:
        from r1vl.algo import build_batch, compute_logprobs
        from r1vl.models import PolicyWithLoss, build_tiny

        model, proc = build_tiny(CORPUS, vocab_size=300, seed=0, **SIZES)
        rng = np.random.default_rng(5)
        texts = [proc.chat_prompt(f"What is {i} x {i + 1}?") for i in range(N)]
        images = [_img(i, 56 if i % 2 else 84) for i in range(N)]
        hi = len(proc.tokenizer)
        conts = [rng.integers(20, hi, size=int(rng.integers(2, 9))).tolist() for _ in range(N)]
        batch = build_batch(proc, texts, images, conts)
        policy = PolicyWithLoss(copy.deepcopy(model))
        ref = compute_logprobs(policy, batch, micro_batch_size=N) - 0.05 * batch.mask
        _CACHE.update(model=model, proc=proc, batch=batch, ref=ref,
                      init={k: v.detach().clone() for k, v in model.state_dict().items()})
    c = _CACHE
    return c["model"], c["proc"], c["batch"], c["ref"], c["init"]


def _fresh_policy():
    from r1vl.models import PolicyWithLoss

    model, proc, batch, ref, init = _setup()
    m = copy.deepcopy(model)
    m.load_state_dict(init)
    return PolicyWithLoss(m), proc, batch, ref


def _grpo_kwargs(adv, ref, rows, t):
    return dict(advantages=adv[rows].float(), beta=BETA, epsilon_low=0.2, epsilon_high=0.2, temperature=1.0,
                loss_type="grpo", importance_sampling_level="token", ref_logprobs=ref[rows, :t])


def _ds_step(engine, batch, adv, ref, rows_of_rank):
    """One StepGRPO optimizer step on this rank's rows through r1vl.ds (what algo.grpo_update
    does under DeepSpeed): micro-batches weighted by their share of the rank's batch."""
    from r1vl.algo import micro_batches

    B = len(rows_of_rank)
    groups = micro_batches(B, MICRO)
    losses = []
    for gi, idx in enumerate(groups):
        rows = [rows_of_rank[i] for i in idx]
        mb = batch.slice(rows)
        mb.inputs["pixel_values"] = mb.inputs["pixel_values"].to(_dtype(engine))
        loss, _ = engine(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="grpo",
                         **_grpo_kwargs(adv, ref, rows, mb.targets.shape[1]))
        ds.backward(engine, loss * (len(idx) / B), last=gi == len(groups) - 1)
        losses.append(float(loss.detach()))
    return losses, ds.step(engine)


def _dtype(engine):
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def _reference_run(steps=2):
    """One process, whole batch, plain torch: AdamW + clip_grad_norm_ + LambdaLR."""
    from r1vl.algo import micro_batches

    policy, _, batch, ref = _fresh_policy()
    opt = _sgd(policy.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    norms = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for idx in micro_batches(N, MICRO):
            mb = batch.slice(idx)
            loss, _ = policy(mb.inputs, mb.targets, mb.mask, start=mb.start, mode="grpo",
                             **_grpo_kwargs(ADV[s], ref, idx, mb.targets.shape[1]))
            (loss * len(idx) / N).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(policy.parameters(), CLIP)))
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in policy.model.named_parameters()}, norms


def _sgd(params):
    return torch.optim.SGD(params, lr=SGD_LR, momentum=0.9, weight_decay=WD)


def _engine(stage, *, bf16, persistence0=True, grad_ckpt=False, adamw=False):
    from r1vl.speedups import set_gradient_checkpointing

    policy, proc, batch, ref = _fresh_policy()
    if grad_ckpt:
        set_gradient_checkpointing(policy, True)
    cfg = ds.load_config(ZERO3 if stage == 3 else ZERO2, micro_batch_size=MICRO,
                         gradient_accumulation_steps=N // WORLD // MICRO, world_size=WORLD, max_grad_norm=CLIP)
    cfg["bf16"]["enabled"] = bf16
    if stage == 3 and persistence0:  # partition every parameter, norms included
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD) if adamw else _sgd(params)
    cfg["zero_allow_untested_optimizer"] = not adamw  # ZeRO asks for it with torch SGD
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return ds.initialize(policy, cfg, optimizer=opt, scheduler=sched), cfg, proc, batch, ref


def _gathered(engine):
    return {k: v.float().clone() for k, v in ds.named_parameters(engine, bucket_bytes=16 * 1024)}


def _opt_state(engine):
    """This rank's optimizer state: AdamW moments / step of each fp32 partition, and the partitions."""
    zo = engine.optimizer
    flats = getattr(zo, "fp32_partitioned_groups_flat", None) or getattr(zo, "single_partition_of_fp32_groups")
    base = ds.base_optimizer(engine)
    out = {}
    for i, flat in enumerate(flats):
        out[f"fp32.{i}"] = flat.detach().clone()
        for k, v in base.state[flat].items():
            out[f"{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _save(obj, out, name):
    torch.save(obj, Path(out) / name)


def _init_rank(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _generate(engine, proc, prompts, **kw):
    from r1vl.models import unwrap
    from r1vl.rollout.base import SamplingConfig
    from r1vl.rollout.hf_engine import HFEngine

    hfe = HFEngine(unwrap(engine), proc, batch_size=1, **kw)
    return [c.token_ids for c in hfe.generate(prompts, 1, SamplingConfig(max_new_tokens=6, temperature=0))]


def _prompts(proc, k, offset=0):
    from r1vl.rollout.base import Prompt

    return [Prompt(text=proc.chat_prompt(f"What is {i + offset} x 3?"), image=_img(50 + i + offset, 56))
            for i in range(k)]


def _worker(rank, stage, port, out):
    _init_rank(rank, port)
    try:
        _run_rank(rank, stage, Path(out))
    finally:
        dist.destroy_process_group()
    from r1vl.utils import exit_after_collectives

    exit_after_collectives(0)  # no interpreter teardown after collectives (its docstring says why)


def _run_rank(rank, stage, out):
    import deepspeed

    from r1vl.algo import compute_logprobs
    from r1vl.models import PolicyWithLoss

    mine = list(range(rank * N // WORLD, (rank + 1) * N // WORLD))
    res = {}
    # ---- exactness: fp32 engine vs one process on the whole batch (ZeRO-3 with activation checkpointing)
    engine, cfg, proc, batch, ref = _engine(stage, bf16=False, grad_ckpt=stage == 3)
    assert ds.is_engine(engine) and ds.is_zero3(engine) == (stage == 3)
    l1, n1 = _ds_step(engine, batch, ADV[0], ref, mine)
    res["norms"] = [n1]
    ck = out / "ck"
    ds.save_checkpoint(engine, ck, processor=proc, client_state={"step": 1, "phase": "grpo"},
                       write_extra=lambda tmp: (tmp / "trainer_state.txt").write_text("phase grpo step 1"))
    saved_state = _opt_state(engine)
    l2, n2 = _ds_step(engine, batch, ADV[1], ref, mine)
    res["norms"].append(n2)
    res["losses"] = l1 + l2
    after2 = _gathered(engine)
    full = ds.full_state_dict(engine)
    if rank == 0:
        _save(after2, out, "after2.pt")
        res["full_equals_gathered"] = set(after2) <= set(full) and all(
            torch.equal(full[k].float(), after2[k]) for k in after2)
        res["full_extra_keys"] = sorted(set(full) - set(after2))
    ds.save_pretrained(engine, proc, out / "hf")

    # ---- resume: a fresh engine loads the checkpoint: equal optimizer state, equal next step
    engine2, *_ = _engine(stage, bf16=False, grad_ckpt=stage == 3)
    client = ds.load_checkpoint(engine2, ck)
    loaded = _opt_state(engine2)
    res["client"] = client
    res["opt_keys"] = sorted(saved_state)
    res["opt_equal"] = sorted(saved_state) == sorted(loaded) and all(
        torch.equal(saved_state[k], loaded[k]) if isinstance(saved_state[k], torch.Tensor)
        else saved_state[k] == loaded[k] for k in saved_state)
    res["lr_equal"] = ds.current_lr(engine2) == SGD_LR * 0.5  # LambdaLR 1/(1+s) after one step
    _ds_step(engine2, batch, ADV[1], ref, mine)
    res["resume_equal"] = all(torch.equal(v, after2[k]) for k, v in _gathered(engine2).items())
    del engine2

    # ---- reference: a frozen full copy, as a ZeRO-3 inference engine (or plain) for the KL term
    ref_model = ds.make_reference(engine)
    ref_pol = ds.prepare_reference(PolicyWithLoss(ref_model), cfg)
    mb = batch.slice(mine)
    lp_policy = compute_logprobs(engine, mb, micro_batch_size=MICRO)
    lp_ref = compute_logprobs(ref_pol, mb, micro_batch_size=MICRO)
    lp_plain = compute_logprobs(PolicyWithLoss(ds.make_reference(engine)), mb, micro_batch_size=MICRO)
    res["ref_is_engine"] = ds.is_engine(ref_pol)
    res["ref_lp_diff"] = float((lp_policy - lp_ref).abs().max())
    res["ref_plain_diff"] = float((lp_policy - lp_plain).abs().max())
    res["ref_frozen"] = not any(p.requires_grad for p in ref_model.parameters())

    # ---- generation: gathered weights, ranks generate different amounts; synced_gpus without gathering
    with ds.gathered_for_generation(engine):
        gen = _generate(engine, proc, _prompts(proc, 1 + rank))
    res["gen"] = gen
    res["synced_kwargs"] = ds.generation_kwargs(engine)
    res["gen_synced"] = _generate(engine, proc, _prompts(proc, 2), **ds.generation_kwargs(engine))

    # ---- the engine's importance ratio formed in the update's own forward (mu = 1, one more head
    # call in it: ZeRO-3 gathers the head for both) equals a separate no-grad pass's; the step runs
    from r1vl.algo import UpdateConfig, grpo_update
    from r1vl.rollout.is_correction import RolloutIS, is_ratio

    lp_now = compute_logprobs(engine, mb, micro_batch_size=MICRO, temperature=0.7)
    shift = torch.linspace(-1.0, 1.0, mb.mask.numel()).view_as(mb.mask)  # ratios 0.37 to 2.7: some capped
    spec = RolloutIS(lp_now + shift, mb.mask.bool(), cap=2.0, temperature=0.7)
    want = is_ratio(lp_now, lp_now + shift, mb.mask.bool(), cap=2.0)
    m = grpo_update(engine, None, None, mb, ADV[0][mine], UpdateConfig(micro_batch_size=MICRO, beta=BETA),
                    ref_logprobs=ref[mine], rollout_is=spec)
    on = mb.mask.bool()
    res["is_ratio_diff"] = float((m["rollout_is_ratio"] - want)[on].abs().max())
    res["is_ratio_capped"] = int((want[on] == 2.0).sum())
    res["is_loss"], res["is_norm"] = m["loss"], m["grad_norm"]

    # ---- the shipped bf16 config as is: a step trains (finite loss, moving weights), 16-bit save
    engine3, *_ = _engine(stage, bf16=True, persistence0=False, adamw=True)
    before = _gathered(engine3)
    l3, n3 = _ds_step(engine3, batch, ADV[0], ref, mine)
    after = _gathered(engine3)
    res["bf16_loss"] = l3
    res["bf16_norm"] = n3
    res["bf16_moved"] = sum(int(not torch.equal(before[k], after[k])) for k in before)
    res["bf16_dtypes"] = sorted({str(p.dtype) for p in engine3.module.parameters()})
    if rank == 0:
        _save({k: v.to(torch.bfloat16) for k, v in after.items()}, out, "bf16_after.pt")
    ds.save_pretrained(engine3, proc, out / "hf_bf16")
    ref3 = ds.make_reference(engine3)  # bf16 parameters equal to the policy's, fp32 rotary tables
    res["ref_bf16_params"] = sorted({str(p.dtype) for p in ref3.parameters()})
    res["ref_bf16_buffers"] = sorted({str(b.dtype) for b in ref3.buffers()})
    res["ref_bf16_equal"] = all(torch.equal(p.float(), after[k]) for k, p in ref3.named_parameters())
    # a new phase on the same engine: fresh AdamW moments, new lr and schedule
    ds.reset_optimizer(engine3, lr=0.5 * LR, lr_lambda=lambda s: 0.5 ** s)
    res["reset_empty"] = len(ds.base_optimizer(engine3).state) == 0
    res["reset_lr0"] = ds.current_lr(engine3)
    _ds_step(engine3, batch, ADV[1], ref, mine)
    st = _opt_state(engine3)
    res["reset_steps"] = sorted({float(v) for k, v in st.items() if k.endswith(".step")})
    res["reset_lr"] = ds.current_lr(engine3)
    # the in-update importance ratio under the shipped bf16 config, against a no-grad pass's
    mb16 = batch.slice(mine)
    mb16.inputs["pixel_values"] = mb16.inputs["pixel_values"].to(torch.bfloat16)
    lp16 = compute_logprobs(engine3, mb16, micro_batch_size=MICRO, temperature=0.7)
    m16 = grpo_update(engine3, None, None, mb16, ADV[0][mine], UpdateConfig(micro_batch_size=MICRO, beta=BETA),
                      ref_logprobs=ref[mine], rollout_is=RolloutIS(lp16 + shift, on, cap=2.0, temperature=0.7))
    res["is_bf16_diff"] = float((m16["rollout_is_ratio"] - is_ratio(lp16, lp16 + shift, on, cap=2.0))[on].abs().max())
    res["is_bf16_norm"] = m16["grad_norm"]

    if stage == 3:
        res.update(_foreign_weight_probe(deepspeed))
    _save(res, out, f"res{rank}.pt")


class _Borrower(torch.nn.Module):
    """Reads a weight that another module owns (kept out of its own parameters)."""

    def __init__(self, owner):
        super().__init__()
        self._owner = [owner]

    def forward(self, h):
        return h @ self._owner[0].weight.t()


class _Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(40, 8)
        self.head = _Borrower(self.emb)


def _foreign_weight_probe(deepspeed):
    """ZeRO-3: a foreign weight is an empty shard in the borrower's forward until registered."""
    probe = _Probe()
    full_w = probe.emb.weight.detach().clone()
    cfg = fill({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
               micro_batch_size=1, gradient_accumulation_steps=1, world_size=WORLD)
    eng = ds.prepare_reference(probe, cfg)
    h = torch.randn(3, 8)
    out = {}
    try:
        with torch.no_grad():
            eng.module.head(h)
        out["foreign_unregistered"] = "ran"
    except RuntimeError as e:
        out["foreign_unregistered"] = f"error: {str(e).splitlines()[0][:80]}"
    out["foreign_numel_outside"] = eng.module.emb.weight.numel()
    deepspeed.zero.register_external_parameter(eng.module.head, eng.module.emb.weight)
    with torch.no_grad():
        y = eng.module.head(h)
    out["foreign_registered_ok"] = bool(torch.allclose(y, h @ full_w.t(), atol=1e-6))
    return out



def _run_two_ranks(stage, out):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install -e '.[deepspeed]')")
    # spawn, not fork: forking the pytest process after earlier tests ran threads (OpenMP,
    # the reward pool's readers) can deadlock the child
    mp.start_processes(_worker, args=(stage, free_port(), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"res{r}.pt", weights_only=False) for r in range(WORLD)]


def _check_common(res, out, stage):
    from transformers import AutoModelForImageTextToText

    r0, r1 = res
    # one process on the whole batch = 2 ranks on halves (fp32)
    single, norms = _reference_run()
    after2 = torch.load(out / "after2.pt")
    assert sorted(after2) == sorted(single)
    for k in single:
        torch.testing.assert_close(after2[k], single[k], rtol=1e-5, atol=1e-6, msg=k)
    moved = sum(int(not torch.equal(_CACHE["init"][k], single[k])) for k in single)
    assert moved == len(single)
    for r in res:
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["norms"] == pytest.approx(norms, rel=1e-4)
    # the gathered 16-bit dict and the weight-sync iterator agree; the HF save loads with Auto
    assert r0["full_equals_gathered"] and r0["full_extra_keys"] == ["lm_head.weight"]  # the tied head, once more
    hf = AutoModelForImageTextToText.from_pretrained(out / "hf")
    assert hf.config.tie_word_embeddings and hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    loaded = dict(hf.named_parameters())
    assert sorted(loaded) == sorted(after2)
    for k, v in after2.items():
        assert torch.equal(loaded[k].float(), v), k
    hf16 = AutoModelForImageTextToText.from_pretrained(out / "hf_bf16")
    bf16_after = torch.load(out / "bf16_after.pt")
    assert {str(p.dtype) for p in hf16.parameters()} == {"torch.bfloat16"}
    for k, p in hf16.named_parameters():
        assert torch.equal(p, bf16_after[k]), k
    # the resume point holds the DeepSpeed state, the HF model and the trainer's extra file
    ck = out / "ck"
    assert (ck / "ds").is_dir() and (ck / "config.json").is_file() and (ck / "trainer_state.txt").is_file()
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())
    for rank, r in enumerate(res):
        assert r["client"] == {"step": 1, "phase": "grpo"}
        assert r["opt_equal"] and any(k.endswith("momentum_buffer") for k in r["opt_keys"])
        assert r["lr_equal"] and r["resume_equal"]
        # reference: frozen, same log-probs as the policy it was copied from
        assert r["ref_frozen"] and r["ref_is_engine"] == (stage == 3)
        assert r["ref_lp_diff"] == 0.0 and r["ref_plain_diff"] == 0.0
        assert r["is_ratio_diff"] < 1e-5 and r["is_ratio_capped"] > 0
        assert r["is_bf16_diff"] < 1e-5 and math.isfinite(r["is_bf16_norm"]) and r["is_bf16_norm"] > 0
        assert math.isfinite(r["is_loss"]) and math.isfinite(r["is_norm"]) and r["is_norm"] > 0
        # shipped bf16 config: finite, every trainable tensor moved, bf16 module weights
        assert all(math.isfinite(x) for x in r["bf16_loss"]) and math.isfinite(r["bf16_norm"]) and r["bf16_norm"] > 0
        assert r["bf16_moved"] == len(single) and r["bf16_dtypes"] == ["torch.bfloat16"]
        assert r["ref_bf16_params"] == ["torch.bfloat16"] and r["ref_bf16_buffers"] == ["torch.float32"]
        assert r["ref_bf16_equal"]
        assert r["reset_empty"] and r["reset_steps"] == [1.0] and r["reset_lr0"] == 0.5 * LR
        assert r["reset_lr"] == pytest.approx(0.25 * LR)  # the new schedule stepped once
    # generation: greedy tokens of the saved model, in one plain process
    from r1vl.models import PolicyWithLoss

    plain = PolicyWithLoss(AutoModelForImageTextToText.from_pretrained(out / "hf")).model
    proc = _CACHE["proc"]
    want = _generate(plain, proc, _prompts(proc, 2))
    assert r0["gen"] == want[:1] and r1["gen"] == want[:2]
    assert r0["gen_synced"] == want and r1["gen_synced"] == want
    return r0, r1


@pytest.mark.slow
def test_zero3_two_ranks(tmp_path):
    res = _run_two_ranks(3, tmp_path)
    r0, r1 = _check_common(res, tmp_path, 3)
    for r in res:
        assert r["synced_kwargs"] == {"synced_gpus": True}
        # the tied head reads embed_tokens' weight: it owns the Parameter, so ZeRO-3 gathers it in its
        # forward; a module that merely borrows a weight sees an empty shard until it registers it
        assert r["foreign_unregistered"].startswith("error") and r["foreign_numel_outside"] == 0
        assert r["foreign_registered_ok"]


@pytest.mark.slow
def test_zero2_two_ranks(tmp_path):
    res = _run_two_ranks(2, tmp_path)
    _check_common(res, tmp_path, 2)
    for r in res:
        assert r["synced_kwargs"] == {"synced_gpus": False}


def test_precision_of_a_filled_config():
    """What a checkpoint records (ds_precision) and a resume compares: DeepSpeed names its
    optimizer files by precision, so another one failed with a FileNotFoundError from inside it."""
    from r1vl import ds

    assert ds.precision({"bf16": {"enabled": True}}) == "bf16"
    assert ds.precision({"fp16": {"enabled": True}, "bf16": {"enabled": False}}) == "fp16"
    assert ds.precision({"bf16": {"enabled": "auto"}}) == "fp32"   # unfilled "auto" is not on
    assert ds.precision({}) == "fp32"

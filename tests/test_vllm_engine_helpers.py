"""The parts of the colocated vLLM engine that need no vLLM: weight names and
buckets, allocator settings, config checks, construction preconditions. (The
engine itself is tested on the real vLLM CPU backend in tests/vllm_suite/.)"""
import sys
from pathlib import Path

import pytest
import torch

from r1vl.rollout.vllm_engine import (
    VLLMEngine,
    VLLMEngineConfig,
    engine_seed,
    hf_to_vllm_name,
    iter_weight_buckets,
    strip_expandable_segments,
    weight_group,
)


def test_module_imports_without_vllm():
    """vLLM is imported lazily (the main virtualenv has none)."""
    import subprocess

    code = "import sys, r1vl.rollout.vllm_engine; assert 'vllm' not in sys.modules, 'vllm imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)



def test_no_test_directory_shadows_a_package():
    """pytest puts tests/ on sys.path, so each directory under it is an importable namespace
    package of its name: one named like a package that transformers / TRL probe for (the vLLM
    suite's was called `vllm`) makes them find a package with no version ('N/A') and fail."""
    from pathlib import Path

    probed = {"vllm", "deepspeed", "liger_kernel", "flash_attn", "trl", "kernels", "triton",
              "transformers", "torch", "accelerate", "datasets", "math_verify", "r1vl"}
    here = Path(__file__).parent
    dirs = {p.name for p in here.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert dirs, "no directory under tests/ at all: the check would prove nothing"
    assert not dirs & probed, sorted(dirs & probed)

@pytest.mark.parametrize("hf, vllm", [
    ("model.language_model.layers.3.self_attn.q_proj.weight", "language_model.model.layers.3.self_attn.q_proj.weight"),
    ("model.language_model.embed_tokens.weight", "language_model.model.embed_tokens.weight"),
    ("model.language_model.norm.weight", "language_model.model.norm.weight"),
    ("model.visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight"),
    ("model.visual.merger.mlp.0.bias", "visual.merger.mlp.0.bias"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    # the original checkpoint layout (Qwen2-VL / Qwen2.5-VL on the hub)
    ("model.layers.0.mlp.gate_proj.weight", "language_model.model.layers.0.mlp.gate_proj.weight"),
    ("visual.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
    # wrappers: DDP / DeepSpeed, torch.compile, PEFT
    ("module.model.language_model.norm.weight", "language_model.model.norm.weight"),
    ("_orig_mod.module.lm_head.weight", "language_model.lm_head.weight"),
    ("base_model.model.model.visual.blocks.1.norm1.weight", "visual.blocks.1.norm1.weight"),
    ("language_model.model.norm.weight", "language_model.model.norm.weight"),
])
def test_hf_to_vllm_names(hf, vllm):
    assert hf_to_vllm_name(hf, tie_word_embeddings=False) == vllm


def test_tied_head_is_not_pushed_and_bad_names_are_errors():
    assert hf_to_vllm_name("lm_head.weight", tie_word_embeddings=True) is None
    assert hf_to_vllm_name("language_model.lm_head.weight", tie_word_embeddings=True) is None
    with pytest.raises(ValueError, match="rotary.inv_freq"):
        hf_to_vllm_name("rotary.inv_freq", tie_word_embeddings=False)


def test_weight_groups_keep_layers_whole():
    assert weight_group("language_model.model.layers.12.self_attn.k_proj.weight") == "language_model.model.layers.12"
    assert weight_group("visual.blocks.3.mlp.fc1.bias") == "visual.blocks.3"
    assert weight_group("visual.merger.mlp.0.weight") == "visual.merger.mlp.0"
    assert weight_group("language_model.model.embed_tokens.weight") == "language_model.model.embed_tokens"


def _fake_policy(layers=4, width=16):
    named = [("model.language_model.embed_tokens.weight", torch.zeros(32, width))]
    for i in range(layers):
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            named.append((f"model.language_model.layers.{i}.{p}.weight", torch.zeros(width, width)))
    named.append(("model.language_model.norm.weight", torch.zeros(width)))
    named.append(("lm_head.weight", torch.zeros(32, width)))
    return named


def test_buckets_are_bounded_lazy_and_never_split_a_layer():
    named = _fake_policy()
    layer_bytes = 5 * 16 * 16 * 4
    consumed = []

    def lazy():
        for item in named:
            consumed.append(item[0])
            yield item

    it = iter_weight_buckets(lazy(), bucket_bytes=layer_bytes, tie_word_embeddings=False)
    first = next(it)
    assert len(consumed) < len(named), "the input was read ahead of the first bucket"
    buckets = [first, *it]
    flat = [n for b in buckets for n, _ in b]
    assert len(flat) == len(named) and all(n.startswith("language_model.") for n in flat)
    for b in buckets:
        groups = [weight_group(n) for n, _ in b]
        size = sum(t.numel() * t.element_size() for _, t in b)
        assert size < 2 * layer_bytes + 32 * 16 * 4
        # closed as soon as the bound is reached at a group boundary: without its last group
        # the bucket was still under the bound (else that group would have opened a new one)
        before_last = sum(t.numel() * t.element_size() for (_, t), g in zip(b, groups) if g != groups[-1])
        assert before_last < layer_bytes, (groups, before_last)
    seen = {}
    for k, b in enumerate(buckets):
        for n, _ in b:
            g = weight_group(n)
            assert seen.setdefault(g, k) == k, f"{g} split across buckets"
    tied = list(iter_weight_buckets(iter(named), bucket_bytes=1 << 30, tie_word_embeddings=True))
    assert len(tied) == 1 and not any("lm_head" in n for n, _ in tied[0])


def test_buckets_do_not_copy():
    t = torch.ones(4, 4)
    (bucket,) = list(iter_weight_buckets([("model.language_model.norm.weight", t)], bucket_bytes=1,
                                         tie_word_embeddings=False))
    assert bucket[0][1].data_ptr() == t.data_ptr()


@pytest.mark.parametrize("conf, cleaned, had", [
    ("", "", False),
    ("expandable_segments:True", "", True),
    ("max_split_size_mb:128,expandable_segments:True", "max_split_size_mb:128", True),
    ("expandable_segments:False,garbage_collection_threshold:0.6", "garbage_collection_threshold:0.6", False),
    (" expandable_segments : true , max_split_size_mb:64", "max_split_size_mb:64", True),
])
def test_strip_expandable_segments(conf, cleaned, had):
    assert strip_expandable_segments(conf) == (cleaned, had)


@pytest.mark.parametrize("kw, key", [
    (dict(tensor_parallel_size=0), "tensor_parallel_size"),
    (dict(sleep_level=3), "sleep_level"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(weight_bucket_bytes=0), "weight_bucket_bytes"),
    (dict(logprobs_mode="raw_logits"), "logprobs_mode"),
])
def test_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=f"rollout.vllm.{key}"):
        VLLMEngineConfig(model="m", **kw)


def test_engine_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this test process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        VLLMEngine(VLLMEngineConfig(model="m"))


_ONE_RANK_GROUP = """
import os
import signal
import torch.distributed as dist
from r1vl.rollout.vllm_engine import ensure_process_group
signal.alarm(60)  # a rendezvous that waits for nothing ends here, not at its 30-min timeout (set after
# the imports: torch's took seconds of it on a loaded machine)
assert os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True", "not torchrun's agent store"
ensure_process_group()
print("group", dist.get_rank(), dist.get_world_size(), dist.get_backend(), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("rendezvous", ["standalone", "static"])
def test_one_rank_group_under_torchrun(tmp_path, rendezvous):
    """`torchrun --nproc-per-node 1 -m r1vl.train rollout.engine=vllm` (and r1vl.eval --engine
    vllm) hung for the 30-min rendezvous timeout before the first rollout: torchrun's workers are
    all clients of the launcher's store, and the engine's one-rank group was set up at an address
    of its own, where no store ever listens. It now meets at the launcher's store."""
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "one_rank.py"
    script.write_text(_ONE_RANK_GROUP)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if rendezvous == "standalone":  # c10d rendezvous on a free port
        how = ["--standalone"]
    else:  # torchrun's default: a static rendezvous at --master-addr / --master-port
        from ports import free_port

        how = ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *how, str(script)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun stops its worker (a session of its own) on the way out
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "group 0 1 gloo" in out, out[-3000:]


class _Processor:
    def stop_token_ids(self):
        return [2, 0]

    def vision_token_ids(self):
        return [9, 10, 11]


def test_engine_options_from_the_trainer_config():
    from dataclasses import dataclass

    from r1vl.config import Config
    from r1vl.rollout.vllm_engine import engine_options

    cfg = Config()
    opts = engine_options(cfg, _Processor(), "/x/vllm_engine_model")
    assert opts["model"] == "/x/vllm_engine_model" and opts["load_format"] == "dummy"
    assert opts["max_model_len"] == (cfg.data.max_prompt_length + cfg.data.max_pixels // 784  # + image tokens
                                     + cfg.rollout.max_completion_length)
    assert (opts["min_pixels"], opts["max_pixels"]) == (cfg.data.min_pixels, cfg.data.max_pixels)
    assert opts["stop_token_ids"] == [2, 0] and opts["suppress_token_ids"] == [9, 10, 11]
    if not torch.cuda.is_available():
        assert opts["enforce_eager"] is True and opts["kv_cache_memory_bytes"] == 256 << 20
        # every sequence's whole prefill in one step (a split one's seeded generator fails on CPU)
        assert opts["max_num_batched_tokens"] == 256 * opts["max_model_len"]
    assert opts["dtype"] == "float32"
    VLLMEngineConfig(**opts)  # a valid engine config
    # the engine computes in the policy's dtype: DeepSpeed's bf16 over model.dtype float32
    ds_cfg = Config()
    ds_cfg.deepspeed = str(Path(__file__).resolve().parents[1] / "configs" / "ds_zero2.json")
    assert engine_options(ds_cfg, _Processor(), "m")["dtype"] == "bfloat16"

    @dataclass
    class Section:  # what the trainer's rollout.vllm section holds
        tensor_parallel_size: int = 2
        sleep_level: int = 2
        kv_cache_memory_bytes: int = 0  # 0 = unset
        gpu_memory_utilization: float = 0.5

    cfg.rollout.vllm = Section()
    opts = engine_options(cfg, _Processor(), "m")
    assert opts["tensor_parallel_size"] == 2 and opts["sleep_level"] == 2
    assert opts["gpu_memory_utilization"] == 0.5

    @dataclass
    class Bad:
        tensor_paralel_size: int = 2

    cfg.rollout.vllm = Bad()
    with pytest.raises(ValueError, match="rollout.vllm.tensor_paralel_size"):
        engine_options(cfg, _Processor(), "m")


def test_the_engine_seed_is_one_numpy_takes():
    """vLLM seeds NumPy with its engine seed, which refuses values outside [0, 2**32): r1vl's
    seed may be any 64-bit integer (seed=-1 stopped a vLLM run at engine start)."""
    import numpy as np

    assert [engine_seed(0, r) for r in range(3)] == [0, 1, 2]  # seed + replica, as before, in range
    for seed, r in ((-1, 0), (-1, 3), (2**32 - 1, 1), (2**64 - 1, 2), (-(2**63), 0)):
        s = engine_seed(seed, r)
        assert 0 <= s < 2**32 and s == (seed + r) % 2**32
        np.random.seed(s)
    with pytest.raises(ValueError):
        np.random.seed(-1)  # what vLLM got

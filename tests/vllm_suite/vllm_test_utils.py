"""Small helpers shared by the vLLM tests (a module of its own: `conftest` is an
ambiguous import name with two conftest.py files in the tree)."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config(path, **kw):
    """The CPU settings that work here: eager, a 256 MiB KV cache, float32."""
    from r1vl.rollout.vllm_engine import VLLMEngineConfig
    from tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS

    opts = dict(model=str(path), kv_cache_memory_bytes=256 << 20, enforce_eager=True, dtype="float32",
                max_model_len=1024, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_num_seqs=32)
    opts.update(kw)
    return VLLMEngineConfig(**opts)

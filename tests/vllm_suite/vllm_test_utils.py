"""Small helpers shared by the vLLM tests (a module of its own: `conftest` is an
ambiguous import name with two conftest.py files in the tree)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

# tests/ports.py (tests/ itself is not on sys.path when this suite runs alone)
_spec = importlib.util.spec_from_file_location("r1vl_test_ports", Path(__file__).resolve().parents[1] / "ports.py")
_ports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ports)
free_port = _ports.free_port


def engine_config(path, **kw):
    """The CPU settings that work here: eager, a 256 MiB KV cache, float32."""
    from r1vl.rollout.vllm_engine import VLLMEngineConfig
    from tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS

    opts = dict(model=str(path), kv_cache_memory_bytes=256 << 20, enforce_eager=True, dtype="float32",
                max_model_len=1024, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_num_seqs=32)
    opts.update(kw)
    return VLLMEngineConfig(**opts)

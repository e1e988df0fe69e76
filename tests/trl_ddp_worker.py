"""Worker of tests/test_trl_example.py's DDP test (torchrun, 2 CPU processes, gloo): trains a
tiny untied Qwen2 for 2 steps with TRL's GRPOTrainer or docs/examples' FusedGRPOTrainer and the
Trainer's DDP settings (find_unused_parameters=True: no gradient checkpointing), then rank 0
saves every rank's parameters.
Usage: torchrun --nproc-per-node 2 tests/trl_ddp_worker.py fused|stock OUT_DIR"""
import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def main(which: str, out: Path) -> None:
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
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    model = Qwen2ForCausalLM.from_pretrained(path)
    set_seed(0)
    args = GRPOConfig(output_dir=str(out / f"trainer_{which}"), use_cpu=True, seed=0, report_to=[], max_steps=2,
                      logging_steps=1, save_strategy="no", learning_rate=5e-3, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, beta=0.04, bf16=False, disable_tqdm=True,
                      dataloader_num_workers=0, gradient_checkpointing=False)
    # (ddp_find_unused_parameters left to the Trainer: without gradient checkpointing, on by
    # default in TRL's GRPOConfig, it is True, DDP's strictest mode for a head used outside forward)
    prompts = Dataset.from_dict({"prompt": [f"Q: {a} plus {b} is? A:" for a in range(4) for b in range(4)]})
    if which == "fused":
        spec = importlib.util.spec_from_file_location("trl_fused_grpo", ROOT / "docs" / "examples" / "trl_fused_grpo.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cls = mod.FusedGRPOTrainer
    else:
        cls = GRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [
        sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.05 * len(c) for c in completions],
        args=args, train_dataset=prompts, processing_class=tok)
    assert type(trainer.model_wrapped).__name__ != "DistributedDataParallel"  # wrapped in train()
    trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    assert trainer.model_wrapped.find_unused_parameters
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    every = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    if int(os.environ["RANK"]) == 0:
        torch.save(torch.stack(every), out / f"params_{which}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

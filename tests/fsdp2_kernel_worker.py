"""Worker of tests/test_kernels_api.py's FSDP2 test (torchrun, 2 CPU processes, gloo): a tiny
untied Qwen2, its decoder layers, its LM head and the whole model each put under FSDP2's
`fully_shard`, takes 2 SGD steps on the fused GRPO loss computed as the LM head's forward inside
the model's forward (each forward swapped for the one call, as docs/examples/trl_fused_grpo.py
does), each rank on its own batch. Rank 0 takes
the same steps on an unsharded copy with the mean of both ranks' losses (FSDP averages the
gradients over the ranks), and saves both models' parameters and both ways' old log-probs
(`linear_logprobs` inside the forward, without gradients).
Usage: torchrun --nproc-per-node 2 tests/fsdp2_kernel_worker.py OUT_DIR"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.randint(0, 300, (4, 12), generator=g)
    t = 8  # the completion: the last 8 tokens, scored by the states before them
    return dict(ids=ids, mask=(torch.rand(4, t, generator=g) > 0.2).float(), advantages=torch.randn(4, generator=g),
                old=-3 * torch.rand(4, t, generator=g), ref=-3 * torch.rand(4, t, generator=g))


def _hidden(model, b):
    t = b["mask"].shape[1]
    return model.model(input_ids=b["ids"]).last_hidden_state[:, -t - 1:-1]


def _as_forward(module, fn, *args):
    """fn(*args) run as the module's forward: FSDP2's hooks unshard its parameters around it."""
    module.forward = fn
    try:
        return module(*args)
    finally:
        del module.forward


def _loss(model, b):
    from r1vl.kernels import fused_linear_grpo_loss

    t = b["mask"].shape[1]
    head = model.lm_head

    def as_head(hidden):
        return fused_linear_grpo_loss(hidden, head.weight, b["ids"][:, -t:], b["mask"], b["advantages"],
                                      old_logprobs=b["old"], ref_logprobs=b["ref"], beta=0.04)[0]

    return _as_forward(head, as_head, _hidden(model, b))


def _logprobs(model, b):
    from r1vl.kernels import linear_logprobs

    t = b["mask"].shape[1]
    head = model.lm_head
    return _as_forward(head, lambda hidden: linear_logprobs(hidden, head.weight, b["ids"][:, -t:]), _hidden(model, b))


def main(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)  # the head: a root parameter of its own
    model = Qwen2ForCausalLM(cfg)
    ref = copy.deepcopy(model) if rank == 0 else None
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model.lm_head)  # a group of its own, resharded after its forward
    fully_shard(model)
    head = model.lm_head.weight
    assert isinstance(head, DTensor) and head.to_local().shape[0] == cfg.vocab_size // world  # sharded
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    mine = _batch(rank)
    with torch.no_grad():
        old = _as_forward(model, lambda: _logprobs(model, mine))
    every = [torch.zeros_like(old) for _ in range(world)]
    dist.all_gather(every, old)
    for _ in range(2):
        opt.zero_grad()
        _as_forward(model, lambda: _loss(model, mine)).backward()
        opt.step()
    flat = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])  # (collectives)
    head_full = model.lm_head.weight.full_tensor().detach()
    if rank == 0:
        batches = [_batch(r) for r in range(world)]
        with torch.no_grad():
            ref_old = torch.stack([_logprobs(ref, b) for b in batches])
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        for _ in range(2):
            ref_opt.zero_grad()
            (sum(_loss(ref, b) for b in batches) / world).backward()
            ref_opt.step()
        torch.manual_seed(0)
        init = Qwen2ForCausalLM(cfg)  # (as built above)
        torch.save({"fsdp": flat, "unsharded": torch.cat([p.detach().reshape(-1) for p in ref.parameters()]),
                    "init": torch.cat([p.detach().reshape(-1) for p in init.parameters()]),
                    "head_fsdp": head_full, "head_init": init.lm_head.weight.detach(),
                    "old_fsdp": torch.stack(every), "old_unsharded": ref_old}, out / "fsdp2.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""One rank of the 2-rank torchrun check (launched by test_torchrun.py):

    torchrun --nproc_per_node 2 tests/vllm_suite/dist_worker.py OUT_DIR TP

gloo process group first, then the engine via VLLMEngine.from_config (rank 0 writes
the engine's model directory, dummy start-up weights, the bound policy is pushed),
then per-rank generation checked against HF, per-rank sampling seeds, a simulated
training step (same update on every rank) followed by sleep → wake (which pushes
the bound policy) → generate, the IS ratio with per-rank seeds, and a held-out evaluation
whose ranks have unequal batch counts. Each rank writes OUT_DIR/rank{r}.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def main() -> None:
    out_dir, tp = Path(sys.argv[1]), int(sys.argv[2])
    t0 = time.time()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    from hf_reference import hf_greedy, hf_logprobs, perturb_
    from tiny_qwen2vl import MAX_PIXELS, MIN_PIXELS, build_tiny_qwen2vl, noise_image

    from r1vl.config import Config
    from r1vl.rollout.base import Prompt, SamplingConfig
    from r1vl.rollout.is_correction import is_ratio_stats, pad_engine_logprobs, truncated_is_ratio
    from r1vl.rollout.vllm_engine import VLLMEngine

    # every rank builds the same policy (as after DDP's broadcast), into its own dir
    model, processor = build_tiny_qwen2vl(out_dir / f"policy{rank}", tie_word_embeddings=True)
    cfg = Config()
    cfg.output_dir = str(out_dir / "run")
    cfg.model.dtype = "float32"
    cfg.data.min_pixels, cfg.data.max_pixels = MIN_PIXELS, MAX_PIXELS
    cfg.data.max_prompt_length = 1500  # the held-out prompts below (the R1-VL instruction, an image)
    cfg.rollout.max_completion_length = 16

    class _VLLMSection:  # what the trainer's config section `rollout.vllm` would hold
        def __init__(self, **kw):
            self.__dict__.update(kw)

    cfg.rollout.vllm = _VLLMSection(tensor_parallel_size=tp, max_num_seqs=16, weight_bucket_bytes=400_000)
    t_build = time.time()
    engine = VLLMEngine.from_config(cfg, model, processor)
    t_engine = time.time() - t_build
    res: dict = {"rank": rank, "world": world, "tp": tp, "engine_start_s": t_engine}

    # rank-specific prompts (text and image); TP ranks still get their own answers back
    prompts = [
        Prompt(processor.chat_prompt(f"Rank {rank}: what is in the picture?"), noise_image(10 + rank)),
        Prompt(processor.chat_prompt(f"What is {rank} plus {rank + 4}?", with_image=False)),
    ]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, return_logprobs=True)

    # from_config set the HF engine's rules: stop on the processor's stop ids, never
    # sample image placeholders; the HF reference applies the same ones
    stop_ids, suppress = processor.stop_token_ids(), processor.vision_token_ids()
    assert engine.config.stop_token_ids == stop_ids and engine.config.suppress_token_ids == suppress

    def check_greedy(tag: str) -> float:
        comps = engine.generate(prompts, 1, greedy)
        assert [c.prompt_index for c in comps] == [0, 1], (tag, [c.prompt_index for c in comps])
        worst = 0.0
        for p, c in zip(prompts, comps):
            ref = hf_greedy(model, processor, p.text, p.image, 8, eos_ids=stop_ids, suppress_ids=suppress)
            assert c.token_ids == ref, f"rank {rank} {tag}: vLLM {c.token_ids} != HF {ref}"
            lp = hf_logprobs(model, processor, p.text, c.token_ids, p.image, suppress_ids=suppress)
            worst = max(worst, float((torch.tensor(c.logprobs) - lp).abs().max()))
        assert worst < 1e-4, f"rank {rank} {tag}: log-prob difference {worst}"
        return worst

    res["lp_diff_initial"] = check_greedy("initial")

    # same prompt and seed on every rank: the per-rank seeds must still differ
    same = [Prompt(processor.chat_prompt("Describe the picture."), noise_image(5))]
    samp = engine.generate(same, 4, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=11))
    res["samples"] = [c.token_ids for c in samp]

    # a training step: the same update on every rank (DDP), then the trainer's loop
    engine.sleep()
    perturb_(model, seed=42)
    engine.wake()  # bound policy: its new weights are pushed here
    res["lp_diff_after_update"] = check_greedy("after update")

    # IS ratio with the engine in sync. The engine reports the log-probs of what it
    # sampled from (placeholders suppressed): against that reference the ratio is 1;
    # against the trainer's full-vocabulary log-probs it is <= 1 (the placeholders'
    # mass, large only in an untrained model)
    # per-rank request seeds, as the trainer's (derive_seed(seed, 3, rank, step)): a TP group still
    # samples one token per position (it had each rank sample its own into the shared forward)
    T = 0.8
    comps = engine.generate(prompts, 2, SamplingConfig(max_new_tokens=8, temperature=T, seed=5 + 1000 * rank,
                                                       return_logprobs=True))
    assert not any(set(c.token_ids) & set(suppress) for c in comps)
    L = max(len(c.token_ids) for c in comps)
    eng_lp, mask = pad_engine_logprobs([c.logprobs for c in comps], L)
    sampler_lp, trainer_lp = torch.zeros_like(eng_lp), torch.zeros_like(eng_lp)
    for i, c in enumerate(comps):
        p = prompts[c.prompt_index]
        n = len(c.token_ids)
        sampler_lp[i, :n] = hf_logprobs(model, processor, p.text, c.token_ids, p.image, temperature=T,
                                        suppress_ids=suppress)
        trainer_lp[i, :n] = hf_logprobs(model, processor, p.text, c.token_ids, p.image, temperature=T)
    res.update(is_ratio_stats(truncated_is_ratio(sampler_lp, eng_lp, mask), mask))
    full = is_ratio_stats(truncated_is_ratio(trainer_lp, eng_lp, mask), mask)
    res["trainer_is_ratio_min"], res["trainer_is_ratio_max"] = full["is_ratio_min"], full["is_ratio_max"]
    engine.sleep()
    res["calls"] = list(engine.calls)

    # the trainer's held-out evaluation with 3 items over 2 ranks, one per batch: rank 0 makes
    # two generate() calls, rank 1 one (with TP, a collective of the group: it hung)
    from r1vl.data.loader import load_dataset
    from r1vl.data.synthetic import prepare_task
    from r1vl.eval import evaluate
    from r1vl.utils import Dist

    if rank == 0:
        prepare_task(out_dir / "data", 4, 3, 0)
    dist.barrier()
    test = load_dataset(out_dir / "data" / "test.jsonl", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    engine.wake()
    ev = evaluate(engine, processor, test, max_new_tokens=8, batch_size=1, d=Dist(rank=rank, world=world))
    engine.sleep()
    res["eval_n"] = ev["n"]
    res["wall_s"] = time.time() - t0
    (out_dir / f"rank{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    engine.close()  # vLLM's teardown; it also ends the default process group
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

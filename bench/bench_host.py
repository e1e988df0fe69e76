"""Host-side costs of one StepGRPO step that a faster GPU does not shrink: building the
training batch, the rope positions of its forwards and scoring the completions. Each is timed
as the trainer runs it and as it ran before its cut, on the same inputs:

    build_batch   --prompts x --generations rows sharing their prompt's image (photo-like,
                  resized within --max-pixels), --completion-tokens each: compact (one pixel
                  block per prompt image, r1vl.algo.build_batch(compact_images=True), as the
                  trainer builds it) against one block per row; every micro-batch of
                  --micro-batch rows is checked equal
    rope          the 3-D rope positions of the shared-prompt forward in every micro-batch (one
                  pass: the trainer takes them in each of its log-prob and update passes): from
                  get_rope_index over whole rows against each group's prompt alone; checked equal
                  on every real token
    rewards       StepRAR + StepRVR of the same rows, --answers distinct final answers per
                  group (fractions, decimals, roots): with math-verify's comparison cache
                  (r1vl.rewards.verify) against without it; the totals are checked equal
    overlap       scoring in --reward-workers processes and building the batch one after the
                  other (as a step ran them) against scoring in the background while the batch
                  is built (the trainer's r1vl.eval.ScoreJob; on a GPU the log-prob passes also
                  run beside it); each call scores answers not seen before (no warm caches);
                  the rewards are checked equal to in-process scoring's

    python bench/bench_host.py                 # 64 prompts x 8, 200704-pixel images: ~1 min on a CPU

Prints one line per measurement (median of --reps, after one warm-up); no file.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402


def _median_s(fn, reps: int) -> float:
    fn()  # warm-up (caches, allocator)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _completion(rng: random.Random, answer: str, steps: list[str]) -> str:
    words = "the triangle angle side length area bar chart point line circle radius total sum ratio".split()

    def sent(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    body = "".join(f"### Step {k}:\n{sent(40)} {st} {sent(40)}.\n" for k, st in enumerate(steps, 1))
    return (f"### Image Description:\n{sent(100)}.\n### Rationales:\n{sent(60)}.\n"
            f"### Let's think step by step.\n{body}### The final answer is: {answer}")


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="Prints one line per measurement (no file). A bad argument is one error line "
                                    "and exit code 2.")
    ap.add_argument("--prompts", type=_cli.positive_int, default=64, help="prompts per step (default: %(default)s)")
    ap.add_argument("--generations", type=_cli.positive_int, default=8, help="G (default: %(default)s)")
    ap.add_argument("--completion-tokens", type=_cli.positive_int, default=1024,
                    help="tokens per completion in the batch (default: %(default)s)")
    ap.add_argument("--max-pixels", type=_cli.positive_int, default=200704,
                    help="data.max_pixels of the images (default: %(default)s, 256 image tokens)")
    ap.add_argument("--micro-batch", type=_cli.positive_int, default=4,
                    help="rows per micro-batch sliced from the batch (default: %(default)s)")
    ap.add_argument("--answers", type=_cli.positive_int, default=3,
                    help="distinct final answers among a group's completions (default: %(default)s)")
    ap.add_argument("--reward-workers", type=_cli.positive_int, default=2,
                    help="reward worker processes of the overlap measurement (the recipes: 8; default: "
                         "%(default)s)")
    ap.add_argument("--reps", type=_cli.positive_int, default=3, help="timed repeats (default: %(default)s)")
    args = ap.parse_args(argv)
    import torch
    from PIL import Image

    from r1vl.algo import build_batch, micro_batches
    from r1vl.data.images import resize_image
    from r1vl.eval import make_prompt, score
    from r1vl.models import VLProcessor, make_image_processor, synthetic_corpus, train_tokenizer
    from r1vl.rewards import verify

    P, G, L = args.prompts, args.generations, args.completion_tokens
    rng, nrng = random.Random(0), np.random.default_rng(0)
    proc = VLProcessor(train_tokenizer(synthetic_corpus(200), 400), make_image_processor(3136, args.max_pixels))
    images = [resize_image(Image.fromarray(nrng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).resize(
        (640, 480), Image.Resampling.BICUBIC), min_pixels=3136, max_pixels=args.max_pixels) for _ in range(P)]
    prompts = [make_prompt(proc, SimpleNamespace(problem=f"What is the area of shape {i}?", image=images[i]))
               for i in range(P)]
    texts, imgs = [prompts[r // G].text for r in range(P * G)], [prompts[r // G].image for r in range(P * G)]
    conts = [[rng.randrange(20, 390) for _ in range(L)] for _ in range(P * G)]

    def build(compact: bool):
        return build_batch(proc, texts, imgs, conts, dtype=torch.bfloat16, compact_images=compact)

    full, compact = build(False), build(True)
    for idx in micro_batches(P * G, args.micro_batch):
        a, b = full.slice(idx), compact.slice(idx)
        if not all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs) or a.inputs.keys() != b.inputs.keys():
            raise RuntimeError(f"compact and per-row batches differ in micro-batch {idx}")
    gb = {name: batch.inputs["pixel_values"].numel() * batch.inputs["pixel_values"].element_size() / 1e9
          for name, batch in (("per row", full), ("compact", compact))}
    t_full, t_compact = _median_s(lambda: build(False), args.reps), _median_s(lambda: build(True), args.reps)
    print(f"build_batch, {P} prompts x {G}, {L} completion tokens, {tuple(images[0].size)} images: "
          f"{t_full:.3f} s -> {t_compact:.3f} s; pixel_values kept {gb['per row']:.3f} GB -> {gb['compact']:.3f} GB "
          f"(bf16); every micro-batch of {args.micro_batch} equal")

    # the shared-prompt forward's rope positions, once per micro-batch and pass: get_rope_index
    # over every row and column (as before) against each group's prompt once
    import transformers

    from r1vl.models import TINY_ARCHS, _prompt_groups, _rope_positions, _shared_rope_positions, tiny_config

    base = getattr(transformers, TINY_ARCHS["qwen2_vl"][1])(tiny_config(proc.tokenizer)).model
    mbs = [compact.slice(idx) for idx in micro_batches(P * G, args.micro_batch)]
    plans = [_prompt_groups(mb.inputs, mb.start, base.config) for mb in mbs]

    def shared(mb, plan):
        return _shared_rope_positions(base, mb.inputs, mb.start, *plan[:3])

    for mb, plan in zip(mbs, plans):
        if plan is None:
            raise RuntimeError("a micro-batch without repeated prompts: --micro-batch must be 2 or more")
        full_pos, (p_pos, c_pos) = _rope_positions(base, mb.inputs), shared(mb, plan)
        am = mb.inputs["attention_mask"].bool()
        real = am[:, mb.start:]
        if not torch.equal(c_pos[:, real], full_pos[:, :, mb.start:][:, real]) or not all(
                torch.equal(p_pos[:, k][:, am[r, :mb.start]], full_pos[:, r, :mb.start][:, am[r, :mb.start]])
                for k, r in enumerate(plan[0])):
            raise RuntimeError("shared-prompt rope positions differ from get_rope_index's")
    t_whole = _median_s(lambda: [_rope_positions(base, mb.inputs) for mb in mbs], args.reps)
    t_shared = _median_s(lambda: [shared(mb, plan) for mb, plan in zip(mbs, plans)], args.reps)
    print(f"rope positions of the shared-prompt forward, {len(mbs)} micro-batches of {args.micro_batch} (one pass): "
          f"{t_whole:.3f} s -> {t_shared:.3f} s from each group's prompt alone (equal on every real token)")

    def scoring_rows(rng: random.Random) -> tuple[list[str], list]:
        comps, samples = [], []
        for i in range(P):
            steps = [f"{rng.randint(1, 99)} + {rng.randint(1, 99)} = {rng.randint(1, 200)}" for _ in range(5)]
            gold = f"\\frac{{{rng.randint(1, 50)}}}{{{rng.randint(51, 99)}}}"
            pool = [gold] + [f"{rng.randint(1, 999) / rng.randint(2, 97):.3f}" if k % 2
                             else f"\\sqrt{{{rng.randint(2, 99)}}}" for k in range(1, args.answers)]
            sample = SimpleNamespace(solution=_completion(rng, gold, steps),
                                     key_steps=[[s, s.replace(" ", "")] for s in steps])
            for g in range(G):
                comps.append(_completion(rng, pool[g % len(pool)], steps))
                samples.append(sample)
        return comps, samples

    comps, samples = scoring_rows(rng)

    class _NoCache(dict):  # math_equal's comparison cache, as before it: nothing kept
        def __setitem__(self, key, value):
            pass

    def scored(cache: dict):
        saved, verify._equal_cache = verify._equal_cache, cache
        try:
            def run():
                cache.clear()
                return score(comps, samples, workers=0, timeout_s=5.0)["total"]
            return _median_s(run, args.reps), run()
        finally:
            verify._equal_cache = saved

    (t_off, total_off), (t_on, total_on) = scored(_NoCache()), scored({})
    if total_off != total_on:
        raise RuntimeError("the comparison cache changed a reward")
    print(f"rewards, {P * G} completions, {args.answers} distinct answers per group: {t_off:.3f} s -> {t_on:.3f} s "
          "with math-verify's comparison cache (one process; totals equal)")

    # scoring beside the batch's building (the trainer's step with reward workers), each call on
    # rows not scored before: the workers' comparison caches never answer
    from r1vl.eval import ScoreJob

    W = args.reward_workers
    rows = [scoring_rows(random.Random(1000 + k)) for k in range(2 * (args.reps + 1))]

    def step(background: bool, c=None, smp=None):
        if c is None:
            c, smp = rows.pop()
        job = ScoreJob(lambda: score(c, smp, workers=W, timeout_s=5.0)["total"], background=background)
        return build(True), job.result()

    c0, s0 = scoring_rows(random.Random(999))
    in_process = score(c0, s0, workers=0, timeout_s=5.0)["total"]
    score(c0[:1], s0[:1], workers=W, timeout_s=5.0)  # the pool's start-up (sympy's import): not timed
    (b_serial, t_serial), (b_overlap, t_overlap) = step(False, c0, s0), step(True, c0, s0)
    if not t_serial == t_overlap == in_process or \
            not all(torch.equal(b_serial.inputs[k], b_overlap.inputs[k]) for k in b_serial.inputs):
        raise RuntimeError("scoring in the background changed a reward or the batch")
    t_s, t_o = _median_s(lambda: step(False), args.reps), _median_s(lambda: step(True), args.reps)
    print(f"rewards in {W} worker process{'es' if W > 1 else ''} and the batch, one after the other: {t_s:.3f} s -> {t_o:.3f} s with "
          f"the scoring in the background while the batch is built ({P * G} rows; rewards equal to in-process "
          "scoring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

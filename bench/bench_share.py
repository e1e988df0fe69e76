"""What the two repeated-work cuts of PolicyWithLoss save, and that they change nothing.

A StepGRPO batch holds each prompt (image + question) G times. PolicyWithLoss can run the
vision tower once per distinct image (`dedup_images`) and the prompt once per group with
its KV cache shared by the group's rows (`share_prompts`). This script builds a random
Qwen2-VL with the 2B model's dimensions (fewer layers by default, so it also runs on a
CPU), one 448x448 image per prompt (256 visual tokens), and times three settings on the
same batch: whole rows (both off), dedup only, dedup + shared prompts:

    update    fused GRPO loss forward + backward (gradient checkpointing as asked)
    logprobs  forward without autograd (old / reference log-probs)

It also checks that the three agree: log-probs (max abs difference), loss, and every
parameter's gradient (max relative error of its norm-2 difference) against whole rows.

    python bench/bench_share.py                              # CPU, 2 text + 2 vision layers: ~6 min
    python bench/bench_share.py --device cuda --layers 28 --vision-layers 32 --dtype bfloat16

Prints one progress line per run on stderr, then a table; writes JSON (default
bench/results/share_<device>.json) with the device, versions and config (every flag, the
prompt, visual and completion token counts). Timings are medians of --reps runs after one
warm-up run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _cli  # noqa: E402

SETTINGS = {"whole rows": dict(dedup_images=False, share_prompts=False),
            "dedup": dict(dedup_images=True, share_prompts=False),
            "dedup + shared prompts": dict(dedup_images=True, share_prompts=True)}


def build(a, device):
    import numpy as np
    from PIL import Image
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from bench_step import QWEN2_VL_2B_TEXT, QWEN2_VL_2B_VISION
    from r1vl.algo import build_batch
    from r1vl.models import build_tiny
    from r1vl.speedups import set_attn_implementation, set_gradient_checkpointing

    px = a.image * a.image
    _, proc = build_tiny(None, vocab_size=1024, seed=0, min_pixels=px, max_pixels=px)
    tok = proc.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                        ("video_token_id", "<|video_pad|>"),
                                                        ("vision_start_token_id", "<|vision_start|>"),
                                                        ("vision_end_token_id", "<|vision_end|>"))}
    if a.vocab < len(tok):
        raise SystemExit(f"bench_share: --vocab {a.vocab} is below the tokenizer's {len(tok)} tokens")
    text = dict(QWEN2_VL_2B_TEXT, num_hidden_layers=a.layers, vocab_size=a.vocab, bos_token_id=None,
                eos_token_id=None)
    cfg = Qwen2VLConfig(text_config=text, vision_config=dict(QWEN2_VL_2B_VISION, depth=a.vision_layers),
                        eos_token_id=None, bos_token_id=None, pad_token_id=tok.pad_token_id, **ids)
    torch.manual_seed(a.seed)
    model = Qwen2VLForConditionalGeneration(cfg).to(device=device, dtype=getattr(torch, a.dtype)).train()
    attn = set_attn_implementation(model, a.attn, device)
    set_gradient_checkpointing(model, a.checkpointing)
    rng = np.random.default_rng(a.seed)
    images = [Image.fromarray((rng.random((a.image, a.image, 3)) * 255).astype("uint8")) for _ in range(a.prompts)]
    rows = [i for i in range(a.prompts) for _ in range(a.G)]
    lengths = rng.integers(a.completion // 2, a.completion + 1, size=len(rows))
    conts = [rng.integers(100, 1000, size=int(n)).tolist() for n in lengths]  # plain BPE tokens
    prompts = [proc.chat_prompt("What is the value of the bar for red? Think step by step.")] * len(rows)
    batch = build_batch(proc, prompts, [images[i] for i in rows], conts, dtype=getattr(torch, a.dtype)).to(device)
    return model, batch, attn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, batch, setting, a, device):
    from r1vl.models import PolicyWithLoss

    pol = PolicyWithLoss(model, **SETTINGS[setting])
    adv = torch.linspace(-1, 1, batch.size, device=device)
    out = {"update_s": [], "logprobs_s": []}
    for rep in range(a.reps + 1):
        pol.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        t = time.perf_counter()
        loss, _ = pol(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="grpo", advantages=adv,
                      beta=0.0)
        loss.backward()
        _sync(device)
        t_update = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        with torch.no_grad():
            t = time.perf_counter()
            lp = pol(batch.inputs, batch.targets, batch.mask, start=batch.start, mode="logprobs")
            _sync(device)
            t_lp = time.perf_counter() - t
        if rep:  # the first run warms up
            out["update_s"].append(t_update)
            out["logprobs_s"].append(t_lp)
        print(f"bench_share: {setting}: {'run ' + str(rep) + '/' + str(a.reps) if rep else 'warm-up'}: update "
              f"{t_update:.2f} s, log-probs {t_lp:.2f} s", file=sys.stderr, flush=True)
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"update_s": statistics.median(out["update_s"]), "logprobs_s": statistics.median(out["logprobs_s"]),
            "update_peak_mem_bytes": peak, "loss": float(loss.detach()), "logprobs": (lp.float() * batch.mask),
            "grads": grads}


def build_parser() -> argparse.ArgumentParser:
    ap = _cli.ArgumentParser(description=__doc__.split("\n\n")[0],
                             epilog="A bad argument is one error line and exit code 2, before anything runs.")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda if available, else cpu (default: %(default)s)")
    ap.add_argument("--layers", type=_cli.positive_int, default=2,
                    help="text decoder layers; 2B: 28 (default: %(default)s)")
    ap.add_argument("--vision-layers", type=_cli.positive_int, default=2,
                    help="vision tower blocks; 2B: 32 (default: %(default)s)")
    ap.add_argument("--vocab", type=_cli.positive_int, default=None,
                    help="LM-head rows (default: 151,936 on CUDA; 4,096 on CPU, where the head, the same in "
                         "every setting, would take most of the time)")
    ap.add_argument("--prompts", type=_cli.positive_int, default=2,
                    help="distinct prompts, one image each (default: %(default)s)")
    ap.add_argument("--image", type=_cli.positive_int, default=448,
                    help="image side in pixels, resized by the processor to a multiple of 28; 448: 256 visual "
                         "tokens (default: %(default)s)")
    ap.add_argument("--G", type=_cli.positive_int, default=4, help="completions per prompt (default: %(default)s)")
    ap.add_argument("--completion", type=_cli.positive_int, default=64,
                    help="longest completion in tokens, at least 2; lengths drawn in [n/2, n] "
                         "(default: %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="model dtype (default: %(default)s)")
    ap.add_argument("--attn", choices=("auto", "eager", "sdpa", "flash_attention_2"), default="sdpa",
                    help="attention implementation (default: %(default)s)")
    ap.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="gradient checkpointing (default: on)")
    ap.add_argument("--reps", type=_cli.positive_int, default=2,
                    help="timed runs per setting after one warm-up run, median taken (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help="JSON path; missing folders are created (default: bench/results/share_<device>.json)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.completion < 2:
        ap.error(f"--completion {a.completion}: at least 2 (lengths are drawn in [n/2, n])")
    device = _cli.device(ap, "--device", a.device)
    a.vocab = a.vocab or (151936 if device.type == "cuda" else 4096)
    from bench_loss import device_name, device_slug
    from bench_step import _versions

    out = _cli.out_file(ap, "--out", a.out or HERE / "results" / f"share_{device_slug(device)}.json")

    model, batch, attn = build(a, device)
    prompt_tokens = int(batch.inputs["attention_mask"][0, : batch.start].sum())
    visual = int(batch.inputs["image_grid_thw"][0].prod()) // 4
    print(f"{device_name(device)}: Qwen2-VL-2B dims, {a.layers} text / {a.vision_layers} vision layers, vocab {a.vocab}, "
          f"{a.prompts} prompts x G={a.G}, prompt {prompt_tokens} tokens ({visual} visual), completions "
          f"<= {a.completion}, {a.dtype}, attention {attn}, checkpointing {'on' if a.checkpointing else 'off'}")
    res = {s: measure(model, batch, s, a, device) for s in SETTINGS}
    base = res["whole rows"]
    rows = []
    print(f"{'setting':<24} {'update s':>9} {'x whole':>8} {'logprobs s':>11} {'x whole':>8} {'peak GiB':>9} "
          f"{'lp max err':>11} {'grad rel err':>13}")
    for s, r in res.items():
        lp_err = float((r["logprobs"] - base["logprobs"]).abs().max())
        g_err = max(float((r["grads"][k] - base["grads"][k]).norm() / base["grads"][k].norm().clamp(min=1e-30))
                    for k in base["grads"])
        peak = r["update_peak_mem_bytes"]
        print(f"{s:<24} {r['update_s']:>9.3f} {r['update_s'] / base['update_s']:>8.2f} {r['logprobs_s']:>11.3f} "
              f"{r['logprobs_s'] / base['logprobs_s']:>8.2f} {(f'{peak / 2**30:.2f}' if peak is not None else '-'):>9} "
              f"{lp_err:>11.2e} {g_err:>13.2e}")
        rows.append({"setting": s, **SETTINGS[s], "update_seconds": r["update_s"], "logprobs_seconds": r["logprobs_s"],
                     "update_peak_mem_bytes": peak, "loss": r["loss"], "logprobs_max_abs_err_vs_whole": lp_err,
                     "grad_max_rel_err_vs_whole": g_err})
    cfg = {k: v for k, v in vars(a).items() if k != "out"}
    cfg.update(attn_resolved=attn, prompt_tokens=prompt_tokens, visual_tokens=visual, completion_tokens=int(batch.mask.sum()),
               statistic=f"median of {a.reps} runs after 1 warm-up")
    out.write_text(json.dumps({"device": device_name(device), "versions": _versions(), "config": cfg,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

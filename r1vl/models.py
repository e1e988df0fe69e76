"""Policy / reference models, the processor, and the fused LM head.

- `build_tiny(corpus, ...)`: a randomly initialised small Qwen2-VL or Qwen2.5-VL (tied embeddings,
  head_dim >= 32 so vLLM's CPU attention accepts it) with a byte-level BPE tokenizer
  trained on `corpus`, Qwen2-VL's special tokens, a Qwen2-VL-style chat template and
  the PIL image processor. `save_tiny(dir)` / `model.save_pretrained` + `processor.save_pretrained`
  give a checkpoint that loads back with AutoModelForImageTextToText, AutoTokenizer and
  AutoImageProcessor (and AutoProcessor where torchvision is installed).
- `load_policy(cfg)`: "tiny" or a local Hugging Face checkpoint (Qwen2-VL / Qwen2.5-VL).
- `VLProcessor`: chat template + tokenizer + image processor, expanding each image's
  `<|image_pad|>` into its patch-token count. transformers' Qwen2VLProcessor insists on a
  torchvision video processor, which this project cannot rely on; this class needs only
  the tokenizer and the image processor.
- `FusedLMHead` replaces `model.lm_head`: called with hidden states only it is the plain
  linear head (generation: last position only); called with targets it returns log-probs or
  the GRPO loss from `r1vl.kernels` without materialising vocabulary logits. Running the loss
  inside the head's own forward lets ZeRO-3 gather the weight there.
- `PolicyWithLoss`: the module that DDP / DeepSpeed wrap; its forward runs the base model
  (last hidden states only) and then the head in one of the modes "sft", "logprobs", "grpo".
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
IMAGE_TOKEN = "<|image_pad|>"

# Qwen2-VL's conversation layout (no default system turn: the tiny model's prompts stay short).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelLoadError(ValueError):
    """The model path is wrong or does not hold a loadable checkpoint."""


# --------------------------------------------------------------------------- processor


def _image_processor_class():
    """The PIL Qwen2-VL image processor (no torchvision) under any transformers 5.x."""
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None)
    if cls is None:  # releases where the PIL backend carries the plain name
        cls = transformers.Qwen2VLImageProcessor
    return cls


def make_image_processor(min_pixels: int, max_pixels: int):
    return _image_processor_class()(min_pixels=min_pixels, max_pixels=max_pixels)


def repeat_image_blocks(pixels: torch.Tensor, grid: torch.Tensor, index: Sequence[int],
                        images: Sequence[int] | None = None) -> torch.Tensor:
    """The pixel blocks one per image, in order, of `images` (default: every image), from blocks
    stored once per distinct image (VLProcessor(unique_images=True), build_batch(compact_images=
    True)): image j's block is stored block index[j], `grid` has one row per image (on the host:
    no device sync). On `pixels`' device (a GPU: copied there once per distinct image)."""
    sel = range(len(index)) if images is None else images
    if not sel:
        return pixels[:0]
    sizes = [0] * (max(index) + 1)
    for b, n in zip(index, grid.prod(-1).tolist()):
        sizes[b] = n
    blocks = pixels.split(sizes)
    return torch.cat([blocks[index[j]] for j in sel])


class VLProcessor:
    """Chat template + tokenizer + (PIL) image processor for Qwen2-VL-style models."""

    def __init__(self, tokenizer, image_processor, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError("the tokenizer has no chat template")
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ModelLoadError(f"the tokenizer has no {IMAGE_TOKEN} token")
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>"

    # -- ids
    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def image_tokens(self, height: int, width: int) -> int:
        """How many <|image_pad|> tokens an image of this (already resized) size becomes."""
        patch = int(getattr(self.image_processor, "patch_size", 14))
        return (height // patch) * (width // patch) // self.merge_size**2

    def vision_token_ids(self) -> list[int]:
        """Placeholder tokens a completion must never contain (the model would look for image
        features for them); engines suppress them while sampling."""
        ids = []
        for tok in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"):
            i = self.tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != self.tokenizer.unk_token_id:
                ids.append(int(i))
        return ids

    def stop_token_ids(self) -> list[int]:
        ids = []
        for tok in ("<|im_end|>", "<|endoftext|>"):
            i = self.tokenizer.convert_tokens_to_ids(tok)
            if i is not None and i != self.tokenizer.unk_token_id:
                ids.append(int(i))
        return ids

    # -- text
    def chat_prompt(self, question: str, with_image: bool = True) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def batch_decode(self, seqs: Iterable[Sequence[int]]) -> list[str]:
        return [self.decode(s) for s in seqs]

    # -- batches
    def __call__(self, texts: list[str], images: list | None = None, padding_side: str = "left",
                 unique_images: bool = False) -> dict:
        """Tokenise chat texts (one image per `<|image_pad|>` placeholder, in order) into a
        padded batch: input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw.
        An image object passed several times (a StepGRPO batch's G rows of a prompt) is processed
        once, and a text given several times tokenised once. unique_images: pixel_values holds
        each distinct image's block once and `image_index` [images] names each image's block
        (image_grid_thw stays one row per image); else the blocks are repeated per image."""
        images = [im for im in (images or []) if im is not None]
        out: dict[str, torch.Tensor] = {}
        if images:
            # a StepGRPO batch passes each prompt's image object G times: process it once
            slot: dict[int, int] = {}
            index = [slot.setdefault(id(im), len(slot)) for im in images]
            unique = list({id(im): im for im in images}.values())
            feats = self.image_processor(images=unique, return_tensors="pt")
            pixels, grid = feats["pixel_values"], feats["image_grid_thw"]
            if unique_images:
                out["image_index"] = torch.tensor(index, dtype=torch.long)
                grid = grid[index]
            elif len(unique) < len(images):
                grid = grid[index]
                pixels = repeat_image_blocks(pixels, grid, index)
            out["pixel_values"] = pixels
            out["image_grid_thw"] = grid
            counts = (grid.prod(-1) // self.merge_size**2).tolist()
        else:
            counts = []
        expanded, k = [], 0
        for text in texts:
            parts = text.split(self.image_token)
            pieces = [parts[0]]
            for part in parts[1:]:
                if k >= len(counts):
                    raise ValueError(f"more {self.image_token} placeholders in the texts than images ({len(counts)})")
                pieces.append(self.image_token * int(counts[k]) + part)
                k += 1
            expanded.append("".join(pieces))
        if k != len(counts):
            raise ValueError(f"{len(counts)} images but {k} {self.image_token} placeholders in the texts")
        first: dict[str, int] = {}  # each distinct text once (padded to the same longest row), then its rows
        rows = [first.setdefault(t, len(first)) for t in expanded]
        enc = self.tokenizer(list(first), padding=True, padding_side=padding_side, return_tensors="pt",
                             add_special_tokens=False)
        ids, am = enc["input_ids"], enc["attention_mask"]
        if len(first) < len(expanded):
            sel = torch.tensor(rows, dtype=torch.long)
            ids, am = ids[sel], am[sel]
        out["input_ids"] = ids
        out["attention_mask"] = am
        out["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        return out

    # -- persistence
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        cfg_file = path / "preprocessor_config.json"
        if cfg_file.is_file():  # the canonical type name loads under every transformers 5.x
            data = json.loads(cfg_file.read_text())
            data["image_processor_type"] = "Qwen2VLImageProcessor"
            cfg_file.write_text(json.dumps(data, indent=2))
        (path / "chat_template.jinja").write_text(self.tokenizer.chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> "VLProcessor":
        from transformers import AutoTokenizer

        path = str(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {}
        if min_pixels is not None:
            kwargs["min_pixels"] = min_pixels
        if max_pixels is not None:
            kwargs["max_pixels"] = max_pixels
        image_processor = _image_processor_class().from_pretrained(path, **kwargs)
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            for name in ("chat_template.jinja", "chat_template.json"):
                f = Path(path) / name
                if f.is_file():
                    text = f.read_text()
                    template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                    break
        return cls(tokenizer, image_processor, chat_template=template)


# --------------------------------------------------------------------------- tiny model


def train_tokenizer(corpus: Iterable[str], vocab_size: int, max_token_length: int = 12):
    """Byte-level BPE trained on `corpus`, with Qwen2-VL's special tokens; digits are always
    split one by one (as Qwen2's pre-tokeniser does). Returns a PreTrainedTokenizerFast.

    max_token_length > 0: merges may cross word boundaries (no word-splitting regex), each
    token at most that many bytes -- the fixed instruction and section headers of the R1-VL
    format then take about half the tokens of word-level BPE, which halves the tiny default's
    sequence lengths. 0: classic word-level byte-level BPE (GPT-2 / Qwen2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    cross_words = max_token_length > 0
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not cross_words)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=max_token_length if cross_words else None,
    )
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# model.tiny.arch -> (config class, model class) in transformers
TINY_ARCHS = {"qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
              "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration")}


def tiny_config(tokenizer, *, hidden_size: int = 128, intermediate_size: int = 384, num_hidden_layers: int = 3,
                num_attention_heads: int = 4, num_key_value_heads: int = 2, vision_depth: int = 2,
                vision_embed_dim: int = 64, vision_num_heads: int = 2, vision_mlp_ratio: int = 2,
                max_position_embeddings: int = 4096, arch: str = "qwen2_vl"):
    """The config of a small Qwen2-VL (arch "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl").

    Qwen2.5-VL's vision tower differs: SwiGLU MLPs (intermediate size vision_embed_dim x
    vision_mlp_ratio), RMSNorm, and window attention in every block but the last, with
    56-pixel windows (4x4 patches) so that the tiny images (up to 112 pixels a side) hold
    several windows and the tower's window reordering is exercised."""
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny model: arch {arch!r}: expected one of {sorted(TINY_ARCHS)}")
    head_dim = hidden_size // num_attention_heads
    if head_dim * num_attention_heads != hidden_size or head_dim < 32 or head_dim % 8:
        raise ValueError(f"tiny model: head_dim {hidden_size}/{num_attention_heads} must be an integer >= 32, "
                         "a multiple of 8 (vLLM's CPU attention refuses smaller heads)")
    half = head_dim // 2  # M-RoPE splits the rotary half-dims over (time, height, width)
    t = half // 4
    hgt = (half - t) // 2
    mrope = [t, hgt, half - t - hgt]
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    common = dict(depth=vision_depth, num_heads=vision_num_heads, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if arch == "qwen2_vl":
        vision = dict(common, embed_dim=vision_embed_dim, hidden_size=hidden_size, mlp_ratio=vision_mlp_ratio)
    else:
        vision = dict(common, hidden_size=vision_embed_dim, out_hidden_size=hidden_size,
                      intermediate_size=vision_embed_dim * vision_mlp_ratio, window_size=56,
                      fullatt_block_indexes=[vision_depth - 1])
    return getattr(transformers, TINY_ARCHS[arch][0])(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=max_position_embeddings,
            rope_scaling={"type": "mrope", "mrope_section": mrope},
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            bos_token_id=pad,
            eos_token_id=eos,
            pad_token_id=pad,
            tie_word_embeddings=True,
        ),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
    )


def build_tiny(corpus: Iterable[str] | None = None, *, vocab_size: int = 1024, seed: int = 0,
               min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, out_dir: str | Path | None = None,
               attn_implementation: str = "sdpa", max_token_length: int = 12, arch: str = "qwen2_vl",
               **sizes: int):
    """A randomly initialised small Qwen2-VL (or Qwen2.5-VL: arch "qwen2_5_vl", see
    `tiny_config`) and its processor, built locally (no hub).

    corpus: texts the BPE tokenizer is trained on (None: 2,000 samples of the built-in
    synthetic task, prompts and solutions); vocab_size / max_token_length: see
    `train_tokenizer` (the vocabulary ends up smaller when the corpus has fewer merges). sizes: see `tiny_config` (hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    vision_depth, vision_embed_dim, vision_num_heads, vision_mlp_ratio). With `out_dir`
    the pair is saved there (HF layout; loads back with the Auto classes).
    Returns (model, processor)."""
    import transformers

    if corpus is None:
        corpus = synthetic_corpus(2000, seed=seed)
    tokenizer = train_tokenizer(corpus, vocab_size, max_token_length)
    config = tiny_config(tokenizer, arch=arch, **sizes)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, TINY_ARCHS[arch][1])(config)
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, _config_token_id(config, key))
    processor = VLProcessor(tokenizer, make_image_processor(min_pixels, max_pixels))
    # as Qwen2-VL's own generation_config: a turn ends at <|im_end|> or <|endoftext|>, the ids r1vl's
    # engines stop on, so that generate() or vLLM on a saved tiny model stops where r1vl did
    model.generation_config.eos_token_id = processor.stop_token_ids()
    if out_dir is not None:
        save_pretrained(model, processor, out_dir)
    return model, processor


def _config_token_id(config, key: str):
    """`key` (eos/pad/bos_token_id) of a Qwen2-VL config: top level where transformers keeps
    it (5.20+), else its text_config (5.19 keeps the text model's ids there only)."""
    value = getattr(config, key, None)
    if value is None:
        value = getattr(getattr(config, "text_config", None), key, None)
    return value


def synthetic_corpus(n: int, seed: int = 0) -> list[str]:
    """Texts of n samples of the built-in task (prompt + reference solution), for BPE training."""
    import tempfile

    from r1vl.data import format_prompt
    from r1vl.data.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        train_path, _ = generate(tmp, n, 1, seed)
        texts = []
        with open(train_path) as f:
            for line in f:
                row = json.loads(line)
                texts.append(format_prompt(row["problem"]))
                texts.append(row["solution"])
    return texts


def corpus_from_samples(samples) -> list[str]:
    from r1vl.data import format_prompt

    texts = []
    for s in samples:
        texts.append(format_prompt(s.problem))
        texts.append(s.solution)
    return texts


def save_pretrained(model, processor: VLProcessor, out_dir: str | Path) -> None:
    """HF layout: model (safetensors) + tokenizer + image processor + chat template."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    head = model.lm_head
    if isinstance(head, FusedLMHead):  # save the standard nn.Linear layout
        model.lm_head = head.as_linear()
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        model.lm_head = head
    processor.save_pretrained(out_dir)


# --------------------------------------------------------------------------- loading


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str | Path, *, label: str | None = None, hub: bool = True) -> bool:
    """True for a local HF checkpoint directory, False for a hub id ('org/name', when `hub`);
    anything else is a ModelLoadError starting with `label` (default: model.path 'PATH').
    Checks files only (cheap: preflight and the eval CLI use it before loading anything)."""
    p = Path(path)
    label = label or f"model.path {str(path)!r}"
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{label}: is a file, not a model directory (such as runs/<run>/final)")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{label}: directory has no config.json (not a HF checkpoint; expected a model "
                                 "directory such as runs/<run>/final)")
        return True
    if not hub:
        raise ModelLoadError(f"{label}: no such directory")
    if str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:
        raise ModelLoadError(f"{label}: no such directory (and not a hub id 'org/name')")
    return False


def load_pretrained(path: str | Path, *, dtype: str = "float32", attn_implementation: str = "sdpa",
                    min_pixels: int | None = None, max_pixels: int | None = None):
    """A Qwen2-VL / Qwen2.5-VL checkpoint via AutoModelForImageTextToText, and its processor."""
    from transformers import AutoModelForImageTextToText

    check_model_path(path)
    kwargs: dict[str, Any] = {"dtype": _DTYPES[dtype]}
    if attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError  # a truncated or corrupt model.safetensors (not an OSError)

    try:  # the processor first: a missing tokenizer or image-processor file is found before the weights load
        processor = VLProcessor.from_pretrained(str(path), min_pixels=min_pixels, max_pixels=max_pixels)
        model, info = AutoModelForImageTextToText.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"model.path {str(path)!r}: cannot load ({str(e).splitlines()[0]})") from None
    except RuntimeError as e:  # a tensor of another shape than config.json says (transformers 5: raised)
        if "mismatched" not in str(e) and "size mismatch" not in str(e):
            raise
        raise ModelLoadError(f"model.path {str(path)!r}: its weights do not fit the model its config.json "
                             "describes: a tensor of another shape (transformers' load report above names it)") from None
    # weights the checkpoint lacks (or holds in another shape) are initialised at random by
    # transformers, which says so in a table only: a foreign or broken checkpoint evaluated (or
    # trained) as if it were the model, exit code 0
    missing = sorted(info.get("missing_keys") or []) + sorted(k if isinstance(k, str) else str(k[0])
                                                             for k in info.get("mismatched_keys") or [])
    if missing:
        unexpected = sorted(info.get("unexpected_keys") or [])
        raise ModelLoadError(
            f"model.path {str(path)!r}: its weights do not fit the model its config.json describes: {len(missing)} "
            f"tensor(s) missing or of another shape (first {missing[0]})" +
            (f", {len(unexpected)} it does not use (first {unexpected[0]}: another model's, or names with a "
             "prefix?)" if unexpected else "") + "; they would be random")
    return model, processor


def load_policy(model_cfg, *, min_pixels: int, max_pixels: int, seed: int = 0,
                corpus: Iterable[str] | None = None, cache_dir: str | Path | None = None):
    """(model, processor) for config section `model` (r1vl.config.ModelConfig).

    "tiny": built from `corpus` (saved to `cache_dir` when given, which the other ranks then
    load, so every rank has the same tokenizer and weights)."""
    if model_cfg.path == "tiny":
        t = model_cfg.tiny
        model, processor = build_tiny(
            corpus, vocab_size=t.vocab_size, seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
            max_token_length=t.max_token_length,
            out_dir=cache_dir, attn_implementation=model_cfg.attn_implementation if
            model_cfg.attn_implementation != "auto" else "sdpa",
            hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads, vision_depth=t.vision_depth,
            vision_embed_dim=t.vision_embed_dim, vision_num_heads=t.vision_num_heads,
            vision_mlp_ratio=t.vision_mlp_ratio, arch=t.arch,
        )
        model = model.to(_DTYPES[model_cfg.dtype])
        return model, processor
    return load_pretrained(model_cfg.path, dtype=model_cfg.dtype, attn_implementation=model_cfg.attn_implementation,
                           min_pixels=min_pixels, max_pixels=max_pixels)


def make_reference(model) -> nn.Module:
    """A frozen copy of the policy (for the KL term)."""
    ref = copy.deepcopy(unwrap(model))
    ref.eval()
    ref.requires_grad_(False)
    return ref


class HostWeights:
    """A frozen module whose parameters live in host memory (pinned where CUDA is present)
    and are on `device` only inside `with hw.on_device():`, e.g. the reference model, which
    only the reference log-prob pass reads. Entering copies them host -> device (asynchronous
    from pinned memory, ordered before the kernels that read them); leaving points them back
    at the host copies, so nothing is copied back (the module is frozen) and the device
    copies go back to the allocator. Tied parameters stay tied (each is moved once).
    Buffers (rotary tables) stay where they are. On a CPU device both places are the same
    memory and nothing is copied."""

    def __init__(self, module: nn.Module, device):
        self.module = module
        self.device = torch.device(device)
        self.params = list(module.parameters())  # de-duplicated: tied weights once
        if any(p.requires_grad for p in self.params):
            raise ValueError("HostWeights: the module must be frozen (requires_grad_(False))")
        pin = torch.cuda.is_available()
        with torch.no_grad():
            self.host = []
            for p in self.params:
                h = p.data.to("cpu")
                if pin and not h.is_pinned():
                    h = h.pin_memory()
                self.host.append(h)
                p.data = h
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)

    @contextlib.contextmanager
    def on_device(self):
        with torch.no_grad():
            for p, h in zip(self.params, self.host):
                p.data = h.to(self.device, non_blocking=True)
        try:
            yield self.module
        finally:
            for p, h in zip(self.params, self.host):
                p.data = h


def unwrap(model):
    """The HF model inside DDP / DeepSpeed / PolicyWithLoss wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif isinstance(model, PolicyWithLoss):
            model = model.model
        else:
            return model


# --------------------------------------------------------------------------- fused head


class FusedLMHead(nn.Module):
    """The LM head, owning the same weight (and bias) Parameters as the original nn.Linear
    (tied embeddings stay tied). forward(hidden) -> logits (generation); with targets:

    mode="logprobs": fp32 log-probs of `targets` [B,T] (and entropy when asked);
    mode="grpo": (loss, metrics) of r1vl.kernels.fused_linear_grpo_loss."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features = self.weight.shape[1]
        self.out_features = self.weight.shape[0]

    def as_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        lin.weight = self.weight
        if self.bias is not None:
            lin.bias = self.bias
        return lin

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                advantages: torch.Tensor | None = None, *, mode: str = "logits", temperature: float = 1.0,
                return_entropy: bool = False, logit_bias: torch.Tensor | None = None, **loss_kwargs: Any):
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        from r1vl.kernels import fused_linear_grpo_loss, linear_logprobs

        if mode == "logprobs":
            # logit_bias [V] (mode "logprobs" only): added to the logits, as a rollout engine's
            # logit bias is (the vLLM engine's -100 on suppressed image placeholders)
            bias = self.bias
            if logit_bias is not None:
                lb = logit_bias.to(device=self.weight.device, dtype=self.weight.dtype)
                bias = lb if bias is None else bias + lb
            return linear_logprobs(hidden, self.weight, targets, bias=bias, temperature=temperature,
                                   return_entropy=return_entropy)
        if mode == "grpo":
            return fused_linear_grpo_loss(hidden, self.weight, targets, mask, advantages, bias=self.bias,
                                          temperature=temperature, return_entropy=return_entropy, **loss_kwargs)
        raise ValueError(f"FusedLMHead: unknown mode {mode!r} (expected 'logits', 'logprobs' or 'grpo')")


def install_fused_head(model) -> FusedLMHead:
    """Replace model.lm_head (an nn.Linear) by a FusedLMHead over the same parameters."""
    head = model.lm_head
    if not isinstance(head, FusedLMHead):
        head = FusedLMHead(head)
        model.lm_head = head
    return head


# --------------------------------------------------------------------------- repeated images


# Keyword arguments of the vision tower's forward that de-duplication understands; with any
# other (precomputed sequence lengths, hidden states or attentions asked for) it stays out.
_DEDUP_KWARGS = {"grid_thw", "return_dict"}


def install_image_dedup(model) -> bool:
    """Run the vision tower once per distinct image of a call instead of once per sequence.

    A StepGRPO batch holds each prompt's image G times (G completions per prompt, next to each
    other), and so does every forward over it: rollout prefill, old / reference log-probs and
    the update. Hooks on `model.model.visual` drop each image that is equal, pixel for pixel
    and grid for grid, to the one before it, run the tower on the rest, and index the outputs
    back to one block per image. Values are the same; the gradient of a shared image is the
    sum over its copies, as before. Returns False for a model without a vision tower.
    Idempotent; the hooks travel with copy.deepcopy (they keep no reference to the module)."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if not isinstance(visual, nn.Module):
        return False
    if not getattr(visual, "_r1vl_image_dedup", False):
        visual.register_forward_pre_hook(_dedup_before, with_kwargs=True)
        visual.register_forward_hook(_dedup_after, with_kwargs=True)
        visual._r1vl_image_dedup = True
    visual._r1vl_dedup_on = True
    return True


def _dedup_before(module: nn.Module, args: tuple, kwargs: dict):
    module._r1vl_dedup_plan = None
    if not getattr(module, "_r1vl_dedup_on", True) or len(args) != 1 or set(kwargs) - _DEDUP_KWARGS:
        return None
    pixels, grid = args[0], kwargs.get("grid_thw")
    if not isinstance(pixels, torch.Tensor) or not isinstance(grid, torch.Tensor) or grid.dim() != 2 \
            or grid.shape[0] < 2:
        return None
    rows = grid.tolist()
    sizes = [t * h * w for t, h, w in rows]
    if sum(sizes) != pixels.shape[0]:
        return None
    segs = pixels.split(sizes)
    pairs = [i for i in range(1, len(rows)) if rows[i] == rows[i - 1]]
    if not pairs:
        return None
    equal = _blocks_equal(segs, [(i, i - 1) for i in pairs])
    dup = {i for i, e in zip(pairs, equal) if e}
    if not dup:
        return None
    keep, slot = _first_of_runs(len(rows), dup)
    module._r1vl_dedup_plan = (slot, [sizes[i] for i in keep])
    if not getattr(module, "_r1vl_dedup_logged", False):
        module._r1vl_dedup_logged = True
        log.info("image de-duplication: the vision tower runs %d of %d images in this call (repeats of the "
                 "image before; model.dedup_images=false turns it off)", len(keep), len(rows))
    kept = torch.tensor(keep, device=grid.device)
    return (torch.cat([segs[i] for i in keep]),), {**kwargs, "grid_thw": grid.index_select(0, kept)}


def _blocks_equal(blocks: Sequence[torch.Tensor], pairs: list[tuple[int, int]]) -> list[bool]:
    """Whether blocks[a] equals blocks[b], element for element, for each (a, b): one device sync."""
    return torch.stack([(blocks[a] == blocks[b]).all() for a, b in pairs]).tolist() if pairs else []


def _first_of_runs(n: int, repeats: set[int]) -> tuple[list[int], list[int]]:
    """For items 0..n-1 where each i in `repeats` equals item i-1: (the items that start a
    run, each item's run number)."""
    keep, slot = [], []
    for i in range(n):
        if i not in repeats:
            keep.append(i)
        slot.append(len(keep) - 1)
    return keep, slot


def _block_index(slot: list[int], sizes: list[int], device) -> torch.Tensor:
    """Row indices that lay out block slot[i] (of `sizes`, stored back to back) for each i."""
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return torch.cat([torch.arange(starts[j], starts[j] + sizes[j]) for j in slot]).to(device)


def _dedup_after(module: nn.Module, args: tuple, kwargs: dict, output):
    plan, module._r1vl_dedup_plan = getattr(module, "_r1vl_dedup_plan", None), None
    if plan is None:
        return None
    slot, sizes = plan
    merge = int(getattr(module, "spatial_merge_size", 1)) ** 2
    merged = [n // merge for n in sizes]
    index: dict[int, torch.Tensor] = {}

    def expand(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        # patches (last_hidden_state), merged tokens (pooler_output)
        for key, rows in enumerate((sizes, merged)):
            if t.shape[0] == sum(rows):
                if key not in index:
                    index[key] = _block_index(slot, rows, t.device)
                return t.index_select(0, index[key])
        raise RuntimeError(f"image de-duplication: the vision tower returned a tensor of {t.shape[0]} rows "
                           f"for {sum(sizes)} patches / {sum(merged)} merged tokens; set "
                           "model.dedup_images=false")

    if isinstance(output, torch.Tensor):  # older transformers: the merged tokens
        return expand(output)
    for k in list(output.keys()):
        output[k] = expand(output[k])
    return output


def _prompt_groups(batch: dict, start: int, config):
    """(first row of each group, each row's group, each row's image indices, the pixel block
    of each image) when some row repeats the prompt of the row before it (ids, mask, image
    pixels), else None. For batches with images or text only (no video) of models whose
    3-D rope positions `_rope_positions` can compute."""
    ids, am = batch.get("input_ids"), batch.get("attention_mask")
    if ids is None or am is None or ids.shape[0] < 2 or "pixel_values_videos" in batch \
            or ("image_grid_thw" in batch) != ("pixel_values" in batch) or not 1 <= start <= ids.shape[1]:
        return None
    image_token = getattr(config, "image_token_id", None)
    merge = getattr(getattr(config, "vision_config", None), "spatial_merge_size", None)
    if image_token is None or merge is None:
        return None
    grid = batch.get("image_grid_thw")
    patches = [] if grid is None else [t * h * w for t, h, w in grid.tolist()]
    per_image = [n // merge ** 2 for n in patches]
    per_row = (ids[:, :start] == image_token).sum(1).tolist()
    image_rows, j = [], 0
    for need in per_row:
        row = []
        while need > 0 and j < len(per_image):
            row.append(j)
            need -= per_image[j]
            j += 1
        if need != 0:
            return None
        image_rows.append(row)
    if j != len(per_image):
        return None
    p, m = ids[:, :start], am[:, :start]
    same = ((p[1:] == p[:-1]).all(1) & (m[1:] == m[:-1]).all(1)).tolist()
    pairs = [i for i in range(1, len(same) + 1) if same[i - 1]]
    if not pairs:
        return None
    blocks = batch["pixel_values"].split(patches) if patches else ()
    image_pairs = [ab for i in pairs for ab in zip(image_rows[i], image_rows[i - 1])]
    # equal images: the same grid and the same pixels (two layouts of as many patches, a blank
    # 112x56 and 224x28 page, can hold equal pixel blocks; the grid sets the tower's and the
    # rope's positions, so such rows are no repeat), as the vision-tower de-duplication asks
    grids = [] if grid is None else grid.tolist()
    equal = [e and grids[a] == grids[b] for e, (a, b) in zip(_blocks_equal(blocks, image_pairs), image_pairs)]
    dup, k = set(), 0
    for i in pairs:
        n = len(image_rows[i])
        if all(equal[k:k + n]):
            dup.add(i)
        k += n
    if not dup:
        return None
    keep, index = _first_of_runs(len(per_row), dup)
    return keep, index, image_rows, blocks


def _prompt_cache_allowed(model: nn.Module) -> bool:
    """A shared prompt needs a KV cache inside the decoder layers. Without autograd or
    without checkpointing that always holds; under HF's gradient checkpointing a layer keeps
    the cache only where transformers has `_can_checkpoint_with_cache` (5.19 to 5.22 do): one
    without it drops the cache, and the shared path would then be wrong, so it is not taken."""
    if not torch.is_grad_enabled() or not model.training:
        return True
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return True
    from transformers import modeling_layers

    return hasattr(getattr(modeling_layers, "GradientCheckpointingLayer", object), "_can_checkpoint_with_cache")


@contextlib.contextmanager
def _cache_through_checkpointing(model: nn.Module):
    """Let checkpointed decoder layers keep the KV cache during a shared prompt forward.
    Safe here because both caches of that path are replay-safe: the prompt's recording
    layer replaces (never appends) on a checkpoint's recompute, and the prefix layer never
    stores."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and hasattr(m, "_can_checkpoint_with_cache")]
    saved = [vars(m).get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, was in zip(layers, saved):
            if was is None:
                del m._can_checkpoint_with_cache  # back to the class's value
            else:
                m._can_checkpoint_with_cache = was


@functools.lru_cache(maxsize=None)
def _cache_layers():
    """(RecordLayer, PrefixLayer): the two replay-safe cache layers of the shared prompt forward."""
    from transformers.cache_utils import DynamicLayer

    class RecordLayer(DynamicLayer):
        """The prompt forward's cache layer: holds the last keys/values it was given."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states

    class PrefixLayer(DynamicLayer):
        """The continuation forward's cache layer: a fixed prefix, prepended, never grown."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values

        def update(self, key_states, value_states, *args, **kwargs):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    return RecordLayer, PrefixLayer


def _rope_positions(base: nn.Module, batch: dict) -> torch.Tensor:
    """The 3-D (temporal, height, width) rope positions that the model's own forward derives
    for `batch` (get_rope_index with the same arguments), without touching its rope_deltas.
    A batch without images gets what the text model derives when no positions are given
    and nothing is cached: 0..L-1 on every row and axis. (Explicit, because the model's
    forward would otherwise take positions from the mask plus a stale rope_deltas once the
    prompt is in the cache: the continuation must not.)"""
    ids = batch["input_ids"]
    if "image_grid_thw" not in batch:
        return torch.arange(ids.shape[1], device=ids.device).view(1, 1, -1).expand(3, ids.shape[0], -1)
    fn = base.get_rope_index
    wanted = inspect.signature(fn).parameters
    kwargs = {k: batch.get(k) for k in ("mm_token_type_ids", "image_grid_thw", "attention_mask") if k in wanted}
    if "video_grid_thw" in wanted:
        kwargs["video_grid_thw"] = None
    return fn(batch["input_ids"], **kwargs)[0]


def _shared_rope_positions(base: nn.Module, batch: dict, start: int, keep: list[int], index: list[int],
                           image_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For the shared-prompt forward of `batch` (its _prompt_groups plan: keep, index,
    image_rows): the positions of the group prompts, rows `keep`, [3, K, start], and of every
    row's continuation [3, B, L - start], equal, on every real token, to what
    `_rope_positions(base, batch)` gives, from the prompts alone: a continuation is text after
    its prompt's last image, which get_rope_index numbers on from one past the prompt's largest
    position, on all three axes (without images: 0..L-1 whatever the padding, as there)."""
    ids, am = batch["input_ids"], batch["attention_mask"]
    n = ids.shape[1] - start
    kept = torch.tensor(keep, device=ids.device)
    sub = {"input_ids": ids[kept, :start], "attention_mask": am[kept, :start]}
    if "mm_token_type_ids" in batch:
        sub["mm_token_type_ids"] = batch["mm_token_type_ids"][kept, :start]
    if "image_grid_thw" in batch:  # the kept prompts hold every distinct image
        grid = batch["image_grid_thw"]
        sub["image_grid_thw"] = grid[torch.tensor([j for r in keep for j in image_rows[r]], dtype=torch.long,
                                                  device=grid.device)]
    p = _rope_positions(base, sub)
    if "image_grid_thw" not in sub:
        cont = torch.arange(start, start + n, device=ids.device)
        return p, cont.view(1, 1, -1).expand(3, ids.shape[0], -1)
    real = sub["attention_mask"].bool().unsqueeze(0)
    nxt = p.masked_fill(~real, torch.iinfo(p.dtype).min).amax(dim=(0, 2)) + 1  # [K]
    rows = torch.tensor(index, device=p.device)
    cont = nxt.index_select(0, rows).unsqueeze(1) + torch.arange(n, device=p.device, dtype=p.dtype)
    return p, cont.unsqueeze(0).expand(3, -1, -1)


def _model_forward_keys(model) -> set[str]:
    return set(inspect.signature(model.model.forward).parameters)


class PolicyWithLoss(nn.Module):
    """What DDP/DeepSpeed wrap: base-model forward (last hidden states only) + the fused head.

    forward(batch, targets, mask, mode=...): `batch` holds the model inputs (input_ids,
    attention_mask, pixel_values, image_grid_thw, mm_token_type_ids); the hidden state at
    position t scores token t+1, and only positions [start, start + T) are sent to the
    head, where T = targets.shape[1].

    mode "sft": returns the masked mean negative log-likelihood (0-dim) and token count;
    mode "logprobs": fp32 log-probs [B,T] (and entropy when return_entropy);
    mode "grpo": (loss, metrics) with advantages / old / ref log-probs in kwargs."""

    def __init__(self, model, *, dedup_images: bool = True, share_prompts: bool = True):
        super().__init__()
        self.model = model
        install_fused_head(model)
        if dedup_images:
            install_image_dedup(model)
        elif getattr(getattr(model, "model", None), "visual", None) is not None:
            model.model.visual._r1vl_dedup_on = False
        self.share_prompts = share_prompts
        self._keys = _model_forward_keys(model)

    def hidden_states(self, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in self._keys}
        out = self.model.model(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def head_inputs(self, batch: dict, start: int, length: int) -> torch.Tensor:
        """Hidden states at positions [start - 1, start - 1 + length): those that score the
        continuation. Rows that repeat the prompt (ids, mask and image pixels) of the row
        before share one prompt forward: the prompt runs once per group, each row attends to
        its group's keys and values, and only the continuations run. Gradients flow to the
        shared prompt as the sum over its rows, as with whole rows."""
        if self.share_prompts and _prompt_cache_allowed(self.model):
            plan = _prompt_groups(batch, start, self.model.config)
            if plan is not None:
                return self._shared_prompt_hidden(batch, start, length, *plan)
        return self.hidden_states(batch)[:, start - 1: start - 1 + length]

    def _shared_prompt_hidden(self, batch: dict, start: int, length: int, keep: list[int], index: list[int],
                              image_rows: list[list[int]], blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache

        base = self.model.model
        ids, am = batch["input_ids"], batch["attention_mask"]
        dev = ids.device
        kept, rows = torch.tensor(keep, device=dev), torch.tensor(index, device=dev)
        mm = batch.get("mm_token_type_ids") if "mm_token_type_ids" in self._keys else None
        prompt = {"input_ids": ids[kept, :start], "attention_mask": am[kept, :start]}
        if mm is not None:
            prompt["mm_token_type_ids"] = mm[kept, :start]
        imgs = [j for r in keep for j in image_rows[r]]
        if imgs:
            grid = batch["image_grid_thw"]
            prompt["pixel_values"] = torch.cat([blocks[j] for j in imgs])
            prompt["image_grid_thw"] = grid[torch.tensor(imgs, device=grid.device)]
        # the rope positions the plain forward derives for whole rows, from each group's prompt
        # once (get_rope_index walks every token in Python, with host syncs: on every row and
        # column it took several ms per micro-batch and pass)
        prompt["position_ids"], cont_pos = _shared_rope_positions(base, batch, start, keep, index, image_rows)
        record_layer, prefix_layer = _cache_layers()
        record = DynamicCache()
        record.layer_class_to_replicate = record_layer
        with _cache_through_checkpointing(self.model):
            out = base(**prompt, past_key_values=record, use_cache=False, return_dict=True)  # ours, not HF's
            first = out.last_hidden_state[:, -1:].index_select(0, rows)
            if length == 1:
                return first
            prefix = DynamicCache()
            prefix.layers = [prefix_layer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                             for layer in record.layers]
            end = start + length - 1
            cont = {"input_ids": ids[:, start:end], "attention_mask": am[:, :end],
                    "position_ids": cont_pos[:, :, :end - start]}
            if mm is not None:
                cont["mm_token_type_ids"] = mm[:, start:end]
            rest = base(**cont, past_key_values=prefix, use_cache=False, return_dict=True).last_hidden_state
        return torch.cat([first, rest], dim=1)

    def forward(self, batch: dict, targets: torch.Tensor, mask: torch.Tensor, *, start: int, mode: str,
                **kwargs: Any):
        T = targets.shape[1]
        h = self.head_inputs(batch, start, T)
        head = self.model.lm_head
        if mode == "sft":
            logp = head(h, targets, mode="logprobs")
            m = mask.to(logp.dtype)
            n = m.sum()
            return -(logp * m).sum() / n.clamp(min=1.0), n
        if mode == "logprobs":
            return head(h, targets, mode="logprobs", **kwargs)
        if mode == "grpo":
            # rollout_is (an r1vl.rollout.is_correction.RolloutIS): the importance-sampling
            # correction from this forward's own log-probs (no grad; one more head pass), returned
            # in the metrics as "rollout_is_ratio" [B, T]
            spec = kwargs.pop("rollout_is", None)
            ratio = None
            if spec is not None:
                if kwargs.get("rollout_is_ratio") is not None:
                    raise ValueError("PolicyWithLoss: rollout_is and rollout_is_ratio are exclusive")
                with torch.no_grad():
                    lp = head(h.detach(), targets, mode="logprobs", temperature=spec.temperature,
                              logit_bias=spec.logit_bias)
                    ratio = spec.ratio(lp, mask)
                kwargs["rollout_is_ratio"] = ratio
            loss, metrics = head(h, targets, mask, kwargs.pop("advantages"), mode="grpo", **kwargs)
            if ratio is not None:
                metrics = {**metrics, "rollout_is_ratio": ratio}
            return loss, metrics
        raise ValueError(f"PolicyWithLoss: unknown mode {mode!r}")

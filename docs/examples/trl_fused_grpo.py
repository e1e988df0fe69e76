"""TRL's GRPOTrainer with r1vl's fused loss: a subclass that replaces TRL's loss, and only it, by
`r1vl.kernels.fused_linear_grpo_loss` computed from the policy's last hidden states and its LM
head, so that no [tokens, vocab] logits are formed for the update. Generation, rewards,
advantages and the old / reference log-probs stay TRL's. Written against TRL 1.16 (r1vl's dev
extra); tests/test_trl_example.py checks it against TRL's own `_compute_loss`, gradient for
gradient, at every supported loss type.

    import sys; sys.path.insert(0, "<r1vl checkout>/docs/examples")
    from trl_fused_grpo import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)

What such a subclass must get right; each of these is wrong silently otherwise:
- the forward goes through the model TRL hands in (DDP's wrapper with several processes): the
  backbone called on the unwrapped model skips DDP's forward, so no gradient is all-reduced and
  the ranks drift apart. Here the unwrapped model's `forward` is swapped, for the one call, for
  one that runs the backbone and the loss, so the wrapper's hooks run and the LM head is used
  inside the forward (as DDP's find_unused_parameters=True requires: the Trainer's choice
  when gradient checkpointing is off); and the loss itself runs as the LM head's forward, the
  same way, so that FSDP2 unshards the head's weight for it wherever it put the head (accelerate
  gives it a group of its own with the final norm: read in the model's forward alone, an
  FSDP2 head may still be a sharded DTensor, which the kernel refuses);
- the hidden states: the backbone's (`model.base_model(...)`), not `model(...).logits` nor
  `output_hidden_states=True` (both form the logits); and shifted by one, the state at position
  t scores token t + 1: a completion of T tokens is scored by `hidden[:, -T - 1:-1]`
  (`hidden[:, -T:]` has the same shape and, at ratio 1 and beta 0, the same loss value);
- `temperature`: TRL scores the loss (and its old log-probs) at the sampling temperature;
- `use_bias_correction_kl`: TRL's default is True, the kernel's False;
- the normalisation: TRL divides grpo / bnpo / dr_grpo by the gradient-accumulation steps in
  training, and dapo by `num_items_in_batch / processes × accumulation steps /
  steps_per_generation` (its count spans a whole generation batch); the kernel divides by what
  it is given;
- the targets are int64 (TRL's completion_ids are);
- a vision-language model's image inputs (pixel_values, image_grid_thw, mm_token_type_ids, ...)
  go to the backbone as TRL hands them to the whole model (its one-chunk call): without them
  the image placeholders are scored as text, silently.
Metrics: the kernel's are this rank's token means, logged here under TRL's names; TRL's
`clip_ratio/low_min` and `clip_ratio/high_max` (per-sequence extremes) are not formed, and
with several processes of different token counts the gathered mean is not TRL's token-weighted
one. TRL options the kernel does not offer, and an LM head that is not a plain nn.Linear (a PEFT
adapter on it would be left out), are refused by name; a PEFT adapter elsewhere (TRL's
peft_config) is run with the backbone. Checked (tests/test_trl_example.py) with one process
(text-only; Qwen2-VL / Qwen2.5-VL on images; a LoRA adapter on the attention), and with two CPU
processes, text-only, under DDP, under DeepSpeed ZeRO-3 (the head's weight, a partition, is
gathered by DeepSpeed in its forward and its gradient reduced to the partitions) and under
accelerate's FSDP2 (accelerate offers FSDP on accelerators only, so the test switches its CPU
state over; the head, of FSDP2's class FSDPLinear, is taken for the nn.Linear it is), and a
tiny Qwen2-VL on images under FSDP2 against DDP. Other vision-language families' inputs are
passed the same way, unchecked.
"""
from __future__ import annotations

import contextlib

import torch
from trl import GRPOTrainer

from r1vl.kernels import fused_linear_grpo_loss

# the inputs TRL 1.16 hands a vision-language model besides the ids (as _get_per_token_logps_and_entropies
# does for a batch in one chunk); num_images / num_tiles are its own bookkeeping, not model inputs
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _module_class(module: torch.nn.Module) -> type:
    """The module's own class: under FSDP2 its class is FSDP<class>, made by fully_shard with
    FSDPModule and the module's class as its bases."""
    cls = type(module)
    bases = [b for b in cls.__bases__ if b.__name__ != "FSDPModule"]
    return bases[0] if len(bases) == 1 and len(cls.__bases__) == 2 else cls


@contextlib.contextmanager
def _forward_swapped(module: torch.nn.Module, forward):
    """`module(...)` runs `forward` while this lasts, with the hooks of whatever wraps the module
    (DDP's, FSDP2's, DeepSpeed's) around it as around the module's own forward."""
    had = "forward" in vars(module)  # (accelerate's mixed precision sets one on the instance)
    saved = vars(module).get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


class FusedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is r1vl.kernels.fused_linear_grpo_loss."""

    def _compute_loss(self, model, inputs):
        outer = self.accelerator.unwrap_model(model)  # what DDP wraps: its forward is what `model(...)` runs
        policy = outer.get_base_model() if hasattr(outer, "get_base_model") else outer  # PEFT
        head = policy.get_output_embeddings()
        unsupported = [name for name, on in (
            (f"loss_type={self.loss_type}", self.loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo")),
            ("top_entropy_quantile < 1", self.top_entropy_quantile < 1.0),
            ("off_policy_mask_threshold", self.off_policy_mask_threshold is not None),
            ("the entropy bonus", self._entropy_bonus_enabled),
            ("a MoE auxiliary loss", self.aux_loss_enabled),
            (f"an LM head of type {type(head).__name__} (an adapter on it would be left out: the kernel reads "
             "its weight and bias alone)", _module_class(head) is not torch.nn.Linear)) if on]
        if unsupported:
            raise NotImplementedError(f"FusedGRPOTrainer: not offered by r1vl.kernels: {', '.join(unsupported)}")
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        t = completion_ids.size(1)

        items = None
        if self.loss_type == "dapo":  # TRL's count spans the generation batch: one accumulation window of it
            items = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                items = items * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        is_ratio = inputs.get("importance_sampling_ratio") \
            if self.use_vllm and self.vllm_importance_sampling_correction else None
        images = {k: inputs[k] for k in IMAGE_INPUTS if inputs.get(k) is not None}

        def loss_as_head(hidden):  # the LM head's forward: FSDP2 unshards its weight around it
            weight, bias = head.weight, head.bias
            if self.args.cast_lm_head_to_fp32:
                hidden, weight = hidden.float(), weight.float()
                bias = None if bias is None else bias.float()
            elif hidden.dtype != weight.dtype:  # the kernel takes one dtype for both
                hidden = hidden.to(weight.dtype)
            return fused_linear_grpo_loss(
                hidden, weight, completion_ids.long(), mask, inputs["advantages"], bias=bias,
                old_logprobs=inputs.get("old_per_token_logps"),  # None: ratio 1, as TRL's logp.detach()
                ref_logprobs=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                temperature=self.temperature, loss_type=self.loss_type,
                importance_sampling_level=self.importance_sampling_level,
                max_completion_length=self.max_completion_length, num_items_in_batch=items,
                rollout_is_ratio=is_ratio, return_entropy=True,
                use_bias_correction_kl=self.args.use_bias_correction_kl, delta=self.args.delta)

        def backbone_and_loss():  # the whole model's forward: DDP's hooks run around it
            with self.accelerator.autocast():  # the backbone alone: TRL's patched forward would form the logits
                hidden = policy.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           **images).last_hidden_state
            with _forward_swapped(head, loss_as_head):
                return head(hidden[:, -t - 1:-1])  # the state at position i scores token i + 1

        with _forward_swapped(outer, backbone_and_loss):
            loss, metrics = model()  # through DDP's forward when wrapped: its gradient all-reduce is armed
        if self.loss_type != "dapo" and mode == "train":
            loss = loss / self.current_gradient_accumulation_steps  # TRL scales for accumulation itself

        logged = self._metrics[mode]

        def log(name: str, value: torch.Tensor) -> None:
            logged[name].append(self.accelerator.gather(value.reshape(1)).mean().item())

        if self.beta != 0.0:
            log("kl", metrics["kl"])
        log("entropy", metrics["entropy"])
        log("clip_ratio/low_mean", metrics["clip_ratio_low"])
        log("clip_ratio/high_mean", metrics["clip_ratio_high"])
        log("clip_ratio/region_mean", metrics["clip_ratio"])
        return loss

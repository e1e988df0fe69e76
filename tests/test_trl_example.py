"""docs/examples/trl_fused_grpo.py, TRL's GRPOTrainer with r1vl's fused loss, against TRL 1.16's
own `_compute_loss` on the same micro-batches of a real training run: the loss, every parameter's
gradient and the logged metrics, for each loss type the example offers, with old log-probs
(num_iterations=2: ratios off 1, clipping), gradient accumulation, a sampling temperature that is
not 1, the KL term and TRL's default use_bias_correction_kl, and for dapo a generation batch
split over steps (steps_per_generation=4), where its normalisation differs."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = [f"Q: {a} plus {b} is? A: {a + b}. The answer is {a + b}." for a in range(12) for b in range(6)]


def _example():
    spec = importlib.util.spec_from_file_location("trl_fused_grpo", ROOT / "docs" / "examples" / "trl_fused_grpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 causal LM with tied embeddings and r1vl's byte-level BPE tokenizer, saved
    (TRL builds the reference model from the model's path)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1vl.models import train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=400)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path, tok


def _reward(completions, **kw):
    completions = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # (conversational)
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + (0.5 if "." in c else 0.0) + 0.05 * len(c)
            for c in completions]


METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _checked(fused, checks: list):
    """`fused` (the example's trainer) checking each micro-batch against TRL's own loss: TRL's
    loss, gradients and metrics first, then the example's, recorded in `checks`."""
    from trl import GRPOTrainer

    class Checked(fused):
        def _compute_loss(self, model, inputs):
            logged = self._metrics["train" if self.model.training else "eval"]
            before = {k: len(v) for k, v in logged.items()}
            params = [p for p in model.parameters() if p.requires_grad]
            ref = GRPOTrainer._compute_loss(self, model, inputs)
            ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
            ref_metrics = {k: v[-1] for k, v in logged.items() if len(v) > before.get(k, 0)}
            for k in list(logged):  # TRL's entries go: the example logs its own
                del logged[k][before.get(k, 0):]
            loss = super()._compute_loss(model, inputs)
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            ours = {k: v[-1] for k, v in logged.items() if len(v) > before.get(k, 0)}
            checks.append((ref.item(), loss.item(), ref_grads, grads, ref_metrics, ours, sorted(inputs)))
            return loss

    return Checked


def _assert_trls(checks: list, n: int = 4) -> None:
    """Every checked micro-batch: the example's loss, gradients and metrics are TRL's, and some
    ratio was clipped (old log-probs in play)."""
    assert len(checks) >= n
    clipped = False
    for ref, loss, ref_grads, grads, ref_metrics, ours, _ in checks:
        assert loss == pytest.approx(ref, rel=1e-5, abs=1e-7)
        scale = max(g.abs().max().item() for g in ref_grads if g is not None)
        for a, b in zip(ref_grads, grads):
            if a is None or b is None:
                assert a is None and b is None
                continue
            assert (a - b).abs().max().item() <= 1e-5 * scale
        for k in METRICS:
            assert (k in ours) == (k in ref_metrics), k  # (kl: logged only with beta != 0, as TRL)
            if k in ours:
                assert ours[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k
        clipped |= ref_metrics["clip_ratio/region_mean"] > 0
    assert clipped  # the ratios left 1: old log-probs were in play


def _train_checked(tiny, tmp_path, lr: float = 5e-3, **over) -> tuple[list, object]:
    """The example's trainer on the tiny model, two steps, each micro-batch checked against TRL's
    own loss (`_checked`); `over`: GRPOConfig fields, and peft_config for the trainer."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM, set_seed
    from trl import GRPOConfig

    checks = []
    set_seed(0)
    path, tok = tiny
    peft_config = over.pop("peft_config", None)
    args = GRPOConfig(**{
        **dict(output_dir=str(tmp_path / "out"), use_cpu=True, seed=0, data_seed=0, report_to=[], max_steps=2,
               logging_steps=1, save_strategy="no", learning_rate=lr, per_device_train_batch_size=4,
               num_generations=4, max_completion_length=8, gradient_accumulation_steps=2, num_iterations=2,
               temperature=0.7, bf16=False, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False,
               generation_kwargs={"sequence_bias": [[[tok.eos_token_id], 3.0]]}),  # completions of several lengths
        **over})
    prompts = Dataset.from_dict({"prompt": [f"Q: {a} plus {b} is? A:" for a in range(4) for b in range(2)]})
    trainer = _checked(_example().FusedGRPOTrainer, checks)(
        model=Qwen2ForCausalLM.from_pretrained(path), reward_funcs=_reward, args=args, train_dataset=prompts,
        processing_class=tok, peft_config=peft_config)
    trainer.train()
    return checks, trainer


@pytest.mark.parametrize("loss_type,beta,spg", [("grpo", 0.04, None), ("bnpo", 0.0, None),
                                                ("dr_grpo", 0.04, None), ("dapo", 0.04, 4)])
def test_the_fused_trainer_gives_trls_loss_gradients_and_metrics(tiny, tmp_path, loss_type, beta, spg):
    checks, _ = _train_checked(tiny, tmp_path, beta=beta, loss_type=loss_type, steps_per_generation=spg)
    _assert_trls(checks)


def test_the_fused_trainer_with_a_lora_adapter_gives_trls_loss_and_gradients(tiny, tmp_path):
    """TRL's peft_config: LoRA on the attention, every other weight frozen, the KL reference
    the same model with its adapter disabled. The example runs the backbone of the model inside
    PEFT's wrapper (get_base_model()), whose LoRA layers are in it; each micro-batch's loss, the
    adapter's gradients and the metrics are TRL's."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel

    checks, trainer = _train_checked(tiny, tmp_path, lr=5e-2, beta=0.04, peft_config=LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert isinstance(trainer.model, PeftModel)
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    _assert_trls(checks)
    # every adapter weight has a gradient once lora_B (zero at the start) has moved
    assert all(g is not None and g.abs().max() > 0 for g in checks[-1][3])


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_the_fused_trainer_gives_trls_loss_and_gradients_on_images(tmp_path, arch):
    """A tiny Qwen2-VL / Qwen2.5-VL trained on image prompts: the example passes TRL's image
    inputs (pixel_values, image_grid_thw, mm_token_type_ids) to the backbone, so its loss, every
    gradient (the vision tower's too) and the metrics are TRL's. Without them the images'
    placeholders were scored as text: another loss, no vision-tower gradient."""
    from transformers import set_seed
    from trl import GRPOConfig

    import transformers

    from r1vl.models import TINY_ARCHS, build_tiny
    from trl_ddp_worker import image_only_processor, image_prompts

    path = tmp_path / "tiny"
    _, proc = build_tiny(CORPUS, vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, out_dir=path, arch=arch)
    processor = image_only_processor(proc)
    data = image_prompts(8)
    checks = []
    set_seed(0)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), use_cpu=True, seed=0, data_seed=0, report_to=[], max_steps=2,
        logging_steps=1, save_strategy="no", learning_rate=5e-3, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, gradient_accumulation_steps=2, num_iterations=2, temperature=0.7, beta=0.04,
        bf16=False, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
    model = getattr(transformers, TINY_ARCHS[arch][1]).from_pretrained(path)  # (TRL's reference: from its path)
    trainer = _checked(_example().FusedGRPOTrainer, checks)(
        model=model, reward_funcs=_reward, args=args, train_dataset=data, processing_class=processor)
    trainer.train()
    assert all({"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(keys) for *_, keys in checks)
    _assert_trls(checks)
    vision = [i for i, (name, p) in enumerate(model.named_parameters()) if p.requires_grad and "visual" in name]
    assert vision and all(checks[0][2][i] is not None and checks[0][2][i].abs().max() > 0 for i in vision)


def _two_processes(tmp_path, backend: str, data: str = "text", which=("fused", "stock")) -> dict:
    """tests/trl_ddp_worker.py under torchrun (2 processes), TRL's trainer and the example's (or
    those of `which`): each one's final parameters, one row per rank."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    from ports import free_port

    tmp_path.mkdir(parents=True, exist_ok=True)
    params = {}
    for trainer in which:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(free_port()), str(ROOT / "tests" / "trl_ddp_worker.py"), trainer, str(tmp_path),
                            backend, data], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        params[trainer] = torch.load(tmp_path / f"params_{trainer}.pt")
    return params


def _moved(tmp_path, trained: torch.Tensor) -> float:
    from transformers import Qwen2ForCausalLM

    init = torch.cat([p.detach().reshape(-1) for p in
                      Qwen2ForCausalLM.from_pretrained(tmp_path / "model_fused_0").parameters()])
    return (trained - init).abs().max().item()


def test_the_fused_trainer_under_ddp_keeps_the_ranks_equal_and_trains_as_trl(tmp_path):
    """Two processes (torchrun, gloo), find_unused_parameters=True (the Trainer's choice without
    gradient checkpointing), an untied LM head: the
    example's backbone and loss run inside DDP's forward, so the gradients are all-reduced. The
    backbone called on the unwrapped model left them unreduced, and the ranks drifted apart
    (1.5e-2 after 2 steps here), which one process cannot show."""
    params = _two_processes(tmp_path, "ddp")
    fused, stock = params["fused"], params["stock"]
    assert torch.equal(stock[0], stock[1])
    assert torch.equal(fused[0], fused[1])  # the ranks hold the same weights
    assert (fused - stock).abs().max().item() < 1e-4  # and TRL's (same samples: 4e-6 apart here)
    assert _moved(tmp_path, fused[0]) > 1e-3  # (two steps were taken)


@pytest.mark.slow
def test_the_fused_trainer_under_deepspeed_zero3_trains_as_trl(tmp_path):
    """Two processes under DeepSpeed ZeRO-3 (gloo), every parameter partitioned (the LM head's
    weight is an empty partition on each rank until gathered; the worker checks), gradient
    checkpointing on (TRL's default): the example reads the head's weight inside the model's
    forward, where DeepSpeed gathers a parameter on access and reduces its gradient to the
    partitions, so two steps end where TRL's own loss ends (4e-6 apart here). Read outside a
    forward the weight is the empty partition (the kernel refuses its shape); a head left out of
    the gradient ends 1e-2 away."""
    pytest.importorskip("deepspeed")
    params = _two_processes(tmp_path, "zero3")
    fused, stock = params["fused"], params["stock"]
    assert (fused - stock).abs().max().item() < 1e-4
    assert _moved(tmp_path, fused[0]) > 1e-3


def test_the_fused_trainer_under_fsdp2_trains_as_trl(tmp_path):
    """Two processes under accelerate's FSDP2 (its CPU state switched to FSDP by the worker:
    accelerate offers FSDP on accelerators only), every parameter sharded, the final norm and
    the untied LM head a group of their own, gradient checkpointing on (TRL's default): the
    example took the head, of class FSDPLinear, for a layer it does not offer and refused to
    train; it now runs its loss as the head's forward, where FSDP2 unshards the head's weight,
    and two steps end where TRL's own loss under FSDP2 ends (3e-6 apart here)."""
    params = _two_processes(tmp_path, "fsdp2")
    fused, stock = params["fused"], params["stock"]
    assert torch.equal(fused[0], fused[1])  # gathered: one model
    assert (fused - stock).abs().max().item() < 1e-4
    assert _moved(tmp_path, fused[0]) > 1e-3


def test_the_fused_trainer_under_fsdp2_on_images_trains_as_under_ddp(tmp_path):
    """A tiny Qwen2-VL (tied embeddings) on image prompts, two processes under accelerate's FSDP2
    (the vision blocks, the decoder layers, the embeddings and the LM head tied to them each a
    group of their own: the head is FSDP2's FSDPLinear): the image inputs reach the sharded
    backbone and the tied head's weight is gathered for the loss, so two steps end where the
    same two steps under DDP end (6e-7 apart here), the vision tower moved. (The one-process
    image test checks the example's gradients against TRL's own loss; against TRL's trainer
    under either wrapper the example ends 7.5e-5 apart here, read as Adam's per-element
    amplification of rounding: text-only it is 3e-6.)"""
    from transformers import Qwen2VLForConditionalGeneration

    fsdp2 = _two_processes(tmp_path / "fsdp2", "fsdp2", "images", which=("fused",))["fused"]
    ddp = _two_processes(tmp_path / "ddp", "ddp", "images", which=("fused",))["fused"]
    assert torch.equal(fsdp2[0], fsdp2[1]) and torch.equal(ddp[0], ddp[1])
    assert (fsdp2 - ddp).abs().max().item() < 1e-5
    init = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "fsdp2" / "model_fused_0")
    at, moved = 0, []
    for name, p in init.named_parameters():
        if "visual" in name:
            moved.append((fsdp2[0, at: at + p.numel()] - p.detach().reshape(-1)).abs().max().item())
        at += p.numel()
    assert at == fsdp2.shape[1] and moved and min(moved) > 1e-3


def test_the_fused_trainer_refuses_what_the_kernel_would_leave_out(tiny, tmp_path):
    """An LM head that is not a plain nn.Linear (PEFT's LoRA layer on it: the kernel reads the
    base weight, so the adapter would get no gradient and its output no say) and the TRL options
    the kernel lacks are refused by name at the first loss, not trained wrong."""
    from datasets import Dataset
    from transformers import Qwen2ForCausalLM
    from trl import GRPOConfig

    class Adapted(torch.nn.Module):  # stands in for peft.tuners.lora.Linear around the head
        def __init__(self, base):
            super().__init__()
            self.base_layer, self.lora_B = base, torch.nn.Linear(2, base.out_features, bias=False)

        @property
        def weight(self):
            return self.base_layer.weight

        @property
        def bias(self):
            return self.base_layer.bias

        def forward(self, x):
            return self.base_layer(x)

    path, tok = tiny
    prompts = Dataset.from_dict({"prompt": [f"Q: {a} plus 1 is? A:" for a in range(4)]})
    fused = _example().FusedGRPOTrainer
    for head, extra, what in ((True, {}, "an LM head of type Adapted"),
                              (False, {"top_entropy_quantile": 0.5}, "top_entropy_quantile < 1")):
        model = Qwen2ForCausalLM.from_pretrained(path)
        if head:
            model.config.tie_word_embeddings = False
            model.set_output_embeddings(Adapted(model.get_output_embeddings()))
        args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, seed=0, report_to=[], max_steps=1,
                          save_strategy="no", per_device_train_batch_size=4, num_generations=4,
                          max_completion_length=4, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
                          **extra)
        trainer = fused(model=model, reward_funcs=_reward, args=args, train_dataset=prompts, processing_class=tok)
        with pytest.raises(NotImplementedError, match=f"FusedGRPOTrainer: not offered by r1vl.kernels: {what}"):
            trainer.train()

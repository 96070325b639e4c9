"""The FSDP2 pieces on 2 gloo processes, each against the same computation in one process:
run by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_checks.py OUT.json TINY_MODEL

Every process builds the same random models (one seed), shards one copy with the trainer's
shard_fsdp and keeps a whole one as the 1-process reference. Rank 0 writes what it measured on
both processes to OUT.json; the test reads the numbers and holds them to tolerances.

    logps/<case>     the chunked and Triton log-probs (tied, untied and LoRA heads, float32 and
                     bfloat16 mixed precision): log-probs and every trained gradient, sharded vs whole
    generate         transformers generate in lockstep (synced_gpus) with completions of different
                     lengths on the two processes: the tokens a whole model draws, and no hang
    warmup           the format warm-up (a supervised pass through the root, then greedy generation):
                     the weights and format rates of a whole model's warm-up
    full_parameters  what vLLM's weight sync receives: whole tensors on every process
    gather_trained   the adapters LoRA hands vLLM, whole on every process
    optimizer        a whole model's optimizer state (keyed by position) into a sharded optimizer,
                     and gathered back by name, as checkpoints take it across DDP and FSDP2
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels on the CPU (as tests/conftest.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from grpoflow.train.distributed import setup_distributed, shard_fsdp  # noqa: E402
from grpoflow.train.logps import completion_logps  # noqa: E402
from grpoflow.train.model import Policy  # noqa: E402

B, P, T, V = 4, 7, 5, 320  # rows (2 a process), prompt and completion lengths, a small vocabulary


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied))


def with_lora(model, gradient_checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:  # as load_policy sets it up: each layer's activations remade in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)  # init_lora_weights=False: B is random too, so every adapter gets a gradient
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))


def batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (B, P + T), generator=g)  # [B, P + T]
    mask = torch.ones_like(ids)  # [B, P + T]
    mask[1, :3] = 0  # left padding in a prompt
    mask[2, -2:] = 0  # a completion that stopped 2 tokens early
    mask[3, -4:] = 0
    return ids, mask


def logps_case(dist, build, kernels: str, dtype: torch.dtype) -> dict:
    """Sum of log-probs over the global batch, divided by its rows: one process over all 4 rows,
    or each of 2 over its own 2 with FSDP2 averaging the gradients (hence the factor world_size)."""
    model = build()
    whole = copy.deepcopy(model)
    sharded = Policy(model, None, dist.device, dtype, is_peft=hasattr(model, "get_base_model"))
    sharded.fsdp = shard_fsdp(model, dist, dtype)
    one = Policy(whole, None, dist.device, dtype, is_peft=sharded.is_peft)
    ids, mask = batch()
    mine = slice(dist.rank * B // 2, (dist.rank + 1) * B // 2)
    with one.autocast():
        ref, _ = one.train_logps(ids, mask, T, temperature=0.7, kernels=kernels)  # [B, T]
    (ref.float().sum() / B).backward()
    with sharded.autocast():
        got, _ = sharded.train_logps(ids[mine], mask[mine], T, temperature=0.7, kernels=kernels)  # [B/2, T]
    (got.float().sum() * dist.world_size / B).backward()
    grads = {}
    for (name, p), (_, q) in zip(model.named_parameters(), whole.named_parameters()):
        if p.requires_grad:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            grads[name] = ((grad.float() - q.grad.float()).abs().max().item(), q.grad.float().abs().max().item())
    return {"logps_diff": (got.float() - ref[mine].float()).abs().max().item(),
            "grad_diff": max(d for d, _ in grads.values()), "grad_max": max(m for _, m in grads.values()),
            "trained": sorted(grads), "sharded": isinstance(next(model.parameters()), DTensor)}


def generate_case(dist, tiny_model: str) -> dict:
    """Rank 0 stops after 3 tokens, rank 1 after 9: rank 0 must keep stepping (and gathering the
    layers' weights) until rank 1 is done. Both must draw what a whole model draws alone."""
    from grpoflow.config import GRPOConfig, ModelConfig
    from grpoflow.rollout import SamplingParams
    from grpoflow.rollout.hf import HFEngine
    from grpoflow.rollout.seeded import prompt_seed
    from grpoflow.train.model import load_policy

    model_cfg = ModelConfig(name_or_path=tiny_model, finetune="full", dtype="float32")
    grpo = GRPOConfig(gradient_checkpointing=False)
    policy = load_policy(model_cfg, grpo, tiny_model, dist.device, to_device=False)
    whole = load_policy(model_cfg, grpo, tiny_model, dist.device)
    policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)
    mine = range(2 * dist.rank, 2 * dist.rank + 2)  # 2 prompts a process
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in mine]
    seeds = [prompt_seed(5, 2 * dist.rank + i) for i in range(2)]
    # the random model seldom writes EOS: the lengths come from max_tokens
    params = SamplingParams(max_tokens=3 if dist.rank == 0 else 9, temperature=1.0, n=2)
    sharded = HFEngine(policy.model, policy.tokenizer, progress=False, generate=policy.generate)
    alone = HFEngine(whole.model, whole.tokenizer, progress=False)
    got = [[c.token_ids for c in group] for group in sharded.generate(prompts, params, seeds=seeds)]
    expected = [[c.token_ids for c in group] for group in alone.generate(prompts, params, seeds=seeds)]
    return {"same_tokens": got == expected, "lengths": sorted({len(t) for group in got for t in group})}


def warmup_case(dist, tiny_model: str) -> dict:
    """Every process warms up on the same rows: FSDP2's averaged gradient is any one's."""
    from grpoflow.config import FormatWarmupConfig, GRPOConfig, ModelConfig
    from grpoflow.rollout.hf import HFEngine
    from grpoflow.train.distributed import full_parameters
    from grpoflow.train.model import load_policy
    from grpoflow.train.warmup import run_format_warmup

    model_cfg = ModelConfig(name_or_path=tiny_model, finetune="full", dtype="float32")
    grpo = GRPOConfig(gradient_checkpointing=False)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "solution": f"{i} + {i} = {2 * i}",
             "answer": str(2 * i)} for i in range(6)]
    cfg = FormatWarmupConfig(rows=6, batch_size=3, learning_rate=1e-2, eval_prompts=2)
    reports, weights = [], []
    for sharded in (True, False):
        policy = load_policy(model_cfg, grpo, tiny_model, dist.device, to_device=not sharded)
        if sharded:
            policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)
        engine = HFEngine(policy.model, policy.tokenizer, progress=False, generate=policy.generate)
        reports.append(run_format_warmup(policy, engine, rows, [r["prompt"] for r in rows[:2]], cfg, max_tokens=4,
                                         max_prompt_length=64, seed=3))
        weights.append(dict(full_parameters(policy.model)))
    keys = ("loss_first", "loss_last", "format_strict_after", "format_soft_after")
    return {"weights_diff": max((weights[0][n] - weights[1][n]).abs().max().item() for n in weights[1]),
            "moved": max((weights[1][n] - w).abs().max().item() for n, w in whole_weights(tiny_model).items()),
            "report_diff": max(abs(reports[0][k] - reports[1][k]) for k in keys)}


def whole_weights(tiny_model: str) -> dict:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())


def parameters_case(dist) -> dict:
    """vLLM's sync: full fine-tuning loads full_parameters into vLLM, LoRA saves gather_trained's
    adapters; both on every process, each for its own vLLM."""
    from grpoflow.train.checkpoint import gather_trained
    from grpoflow.train.distributed import full_parameters

    model = tiny_llama(tied=True)
    whole = dict(copy.deepcopy(model).named_parameters())
    policy = Policy(model, None, dist.device, torch.float32, is_peft=False)
    policy.fsdp = shard_fsdp(model, dist, torch.float32)
    full = dict(full_parameters(model))
    lora = with_lora(tiny_llama(tied=True))
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    policy = Policy(lora, None, dist.device, torch.float32, is_peft=True)
    policy.fsdp = shard_fsdp(lora, dist, torch.float32)
    gathered = gather_trained(policy, every_process=True)
    return {"names": sorted(full) == sorted(whole),
            "full_diff": max((full[n] - whole[n]).abs().max().item() for n in whole),
            "plain_tensors": all(type(t) is torch.Tensor for t in full.values()),
            "adapter_names": sorted(gathered) == sorted(adapters),
            "adapter_diff": max((gathered[n].cpu() - adapters[n]).abs().max().item() for n in adapters)}


def optimizer_case(dist) -> dict:
    from grpoflow.train.checkpoint import _load_optimizer, gather_optimizer

    model = tiny_llama(tied=True)
    whole = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(whole.parameters(), lr=1e-2)
    for p in whole.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    saved = copy.deepcopy(optimizer.state_dict())  # what a 1-process or DDP checkpoint holds
    policy = Policy(model, None, dist.device, torch.float32, is_peft=False)
    policy.fsdp = shard_fsdp(model, dist, torch.float32)
    sharded = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _load_optimizer(Path("trainer_state.pt"), policy, sharded, saved)
    local = {type(s["exp_avg"]).__name__ for s in sharded.state.values()}  # the shards hold 1/N each
    back = gather_optimizer(policy, sharded)  # whole, by name, on rank 0
    if not dist.is_main:
        return {"state": sorted(local)}
    names = [n for n, _ in whole.named_parameters()]
    return {"state": sorted(local), "names": sorted(back["state"]) == sorted(names),
            "diff": max((back["state"][n][k].float() - saved["state"][i][k].float()).abs().max().item()
                        for i, n in enumerate(names) for k in ("step", "exp_avg", "exp_avg_sq"))}


def main() -> None:
    out, tiny_model = Path(sys.argv[1]), sys.argv[2]
    dist = setup_distributed()
    results = {
        "logps/chunked, tied head": logps_case(dist, lambda: tiny_llama(tied=True), "chunked", torch.float32),
        "logps/triton, tied head": logps_case(dist, lambda: tiny_llama(tied=True), "triton", torch.float32),
        "logps/chunked, untied head": logps_case(dist, lambda: tiny_llama(tied=False), "chunked", torch.float32),
        "logps/chunked, LoRA, gradient checkpointing": logps_case(
            dist, lambda: with_lora(tiny_llama(tied=True), gradient_checkpointing=True), "chunked", torch.float32),
        "logps/naive, tied head": logps_case(dist, lambda: tiny_llama(tied=True), "naive", torch.float32),
        "logps/chunked, tied head, bfloat16": logps_case(dist, lambda: tiny_llama(tied=True), "chunked",
                                                         torch.bfloat16),
        "generate": generate_case(dist, tiny_model),
        "warmup": warmup_case(dist, tiny_model),
        "parameters": parameters_case(dist),
        "optimizer": optimizer_case(dist),
    }
    every = dist.all_gather(results)
    if dist.is_main:
        out.write_text(json.dumps(every, indent=1))
    dist.close()


if __name__ == "__main__":
    main()

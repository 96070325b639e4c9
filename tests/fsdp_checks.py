"""The FSDP2 pieces on 2 gloo processes, each against the same computation in one process:
run by tests/test_distributed.py as

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_checks.py OUT.json TINY_MODEL

Every process builds the same random models (one seed), shards one copy with the trainer's
shard_fsdp and keeps a whole one as the 1-process reference. Rank 0 writes what it measured on
both processes to OUT.json; the test reads the numbers and holds them to tolerances.

    logps/<case>     the chunked and Triton log-probs (tied, untied and LoRA heads, float32 and
                     bfloat16 mixed precision): log-probs and every trained gradient, sharded vs whole
    generate/<case>  transformers generate from weights gathered once per call (full fine-tuning,
                     LoRA), completions of different lengths on the two processes: the tokens a
                     whole model draws, each process stopping at its own length, the collectives
                     around generate and inside it (none), sharded again after it, and a training
                     step after it against the whole model's
    generate raises  an error inside generate: sharded again after it, and a training step after it
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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from grpoflow.train.distributed import setup_distributed, shard_fsdp  # noqa: E402
from grpoflow.train.policy import Policy  # noqa: E402

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
    model = build()
    whole = copy.deepcopy(model)
    sharded = Policy(model, None, dist.device, dtype, is_peft=hasattr(model, "get_base_model"))
    sharded.fsdp = shard_fsdp(model, dist, dtype)
    one = Policy(whole, None, dist.device, dtype, is_peft=sharded.is_peft)
    return {**train_step(dist, sharded, one, kernels), "sharded": isinstance(next(model.parameters()), DTensor)}


def train_step(dist, sharded: Policy, one: Policy, kernels: str = "chunked") -> dict:
    """Sum of log-probs over the global batch, divided by its rows: one process over all 4 rows,
    or each of 2 over its own 2 with FSDP2 averaging the gradients (hence the factor world_size).
    The log-probs and every trained gradient, sharded against whole."""
    model, whole = sharded.model, one.model
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
            "trained": sorted(grads)}


def sharded_and_whole(dist, tiny_model: str, finetune: str) -> tuple[Policy, Policy]:
    """The trainer's policy (load_policy, then shard_fsdp) and a whole copy of it. LoRA with
    gradient checkpointing, as the trainer sets it up, and random adapters (B starts at zero):
    generating without them would draw other tokens."""
    from grpoflow.config import GRPOConfig, ModelConfig
    from grpoflow.train.policy import load_policy

    model_cfg = ModelConfig(name_or_path=tiny_model, finetune=finetune, dtype="float32")
    grpo = GRPOConfig(gradient_checkpointing=finetune == "lora")
    policy = load_policy(model_cfg, grpo, tiny_model, dist.device, to_device=False)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    one = Policy(copy.deepcopy(policy.model), policy.tokenizer, dist.device, policy.dtype, policy.is_peft)
    policy.fsdp = shard_fsdp(policy.model, dist, policy.dtype)
    return policy, one


def gathered_bytes(root) -> int:
    """Bytes of whole weights FSDP2 holds now: its all-gather outputs (FSDPParam.all_gather_outputs,
    torch's private state, read to see the weights gathered inside generate and freed after it)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(t.untyped_storage().nbytes() for unit in root.modules() if isinstance(unit, FSDPModule)
               for group in unit._get_fsdp_state()._fsdp_param_groups for p in group.fsdp_params
               for t in p.all_gather_outputs)


class Collectives(TorchDispatchMode):
    """Counts the collectives (torch.distributed's c10d ops) that run inside it, as torch's
    CommDebugMode does; CommDebugMode's module tracking adds a hook at every call of a module and
    fails on a module called more than once (every decoding step)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", None) in ("c10d", "_c10d_functional"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def layer_units(policy: Policy) -> list[torch.nn.Module]:
    """The decoder layers, as shard_fsdp made them units (FSDP2 renamed their classes)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in policy.model.modules() if isinstance(m, FSDPModule)]


def all_sharded(policy: Policy) -> bool:
    return all(isinstance(p, DTensor) for p in policy.model.parameters()) and gathered_bytes(policy.fsdp) == 0


def sharded_after_forward(policy: Policy) -> bool:
    """A forward without gradient gathers and reshards each unit as before generate."""
    with torch.no_grad():
        policy.run(lambda model: model(input_ids=batch()[0]))
    return all_sharded(policy)


def generate_case(dist, tiny_model: str, finetune: str) -> dict:
    """Rank 0 stops after 3 tokens, rank 1 after 9, each when its own completions end. Around
    generate, Policy.generate gathers every unit once (the collectives counted); inside it, no
    collective. Both draw what a whole model draws alone; after it the model is sharded again,
    stays sharded after a forward, and trains as the whole one does."""
    from grpoflow.rollout import SamplingParams
    from grpoflow.rollout.hf import HFEngine
    from grpoflow.rollout.seeded import prompt_seed

    policy, one = sharded_and_whole(dist, tiny_model, finetune)
    whole_bytes = sum(p.numel() * p.element_size() for p in one.model.parameters())  # a tied weight once
    model_generate, inside, around = policy.model.generate, [], []

    def counted_policy_generate(**kwargs):
        with Collectives() as collectives:
            out = policy.generate(**kwargs)
        around.append(collectives.count)
        return out

    def counted_model_generate(**kwargs):  # what runs after the units were gathered
        forwards, unit = [], layer_units(policy)[0]
        fsdp_hooks = len(unit._forward_pre_hooks) + len(unit._forward_hooks)  # FSDP2's, taken off by now
        hook = unit.register_forward_pre_hook(lambda *_: forwards.append(1))
        try:
            with Collectives() as collectives:
                out = model_generate(**kwargs)
        finally:
            hook.remove()
        inside.append({"collectives": collectives.count, "forwards": len(forwards), "fsdp_hooks": fsdp_hooks,
                       "gathered": gathered_bytes(policy.fsdp) >= whole_bytes})
        return out

    policy.model.generate = counted_model_generate  # the real generate, counted
    mine = range(2 * dist.rank, 2 * dist.rank + 2)  # 2 prompts a process
    prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in mine]
    seeds = [prompt_seed(5, 2 * dist.rank + i) for i in range(2)]
    # the random model seldom writes EOS: the lengths come from max_tokens
    params = SamplingParams(max_tokens=3 if dist.rank == 0 else 9, temperature=1.0, n=2)
    sharded = HFEngine(policy.model, policy.tokenizer, progress=False, generate=counted_policy_generate)
    alone = HFEngine(one.model, one.tokenizer, progress=False)
    hooks = [list(unit._forward_pre_hooks) + list(unit._forward_hooks) for unit in layer_units(policy)]
    got = [[c.token_ids for c in group] for group in sharded.generate(prompts, params, seeds=seeds)]
    hooks_back = hooks == [list(unit._forward_pre_hooks) + list(unit._forward_hooks) for unit in layer_units(policy)]
    expected = [[c.token_ids for c in group] for group in alone.generate(prompts, params, seeds=seeds)]
    return {"same_tokens": got == expected, "lengths": sorted({len(t) for group in got for t in group}),
            "inside": inside, "around": around, "units": len(layer_units(policy)) + 1,  # and the root
            "hooks_before": len(hooks[0]), "hooks_back": hooks_back,
            "sharded_after": all_sharded(policy), "sharded_after_forward": sharded_after_forward(policy),
            **train_step(dist, policy, one)}


def generate_raises_case(dist, tiny_model: str) -> dict:
    """An MLP inside a decoder layer raises in the middle of generate, at its 4th forward (on both
    processes: the lockstep generate it replaced would hang otherwise): the error comes through,
    the model is sharded again, and trains as the whole one does (FSDP2 is not left mid-forward)."""
    from grpoflow.rollout import SamplingParams
    from grpoflow.rollout.hf import HFEngine

    policy, one = sharded_and_whole(dist, tiny_model, "full")
    calls = []

    def fail(*_):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("raised inside generate")

    hook = layer_units(policy)[1].mlp.register_forward_hook(fail)
    engine = HFEngine(policy.model, policy.tokenizer, progress=False, generate=policy.generate)
    try:
        engine.generate([[{"role": "user", "content": "Count."}]], SamplingParams(max_tokens=9, temperature=0.0))
        raised = None
    except RuntimeError as e:
        raised = str(e)
    hook.remove()
    return {"raised": raised, "sharded_after": all_sharded(policy),
            "sharded_after_forward": sharded_after_forward(policy), **train_step(dist, policy, one)}


def warmup_case(dist, tiny_model: str) -> dict:
    """Every process warms up on the same rows: FSDP2's averaged gradient is any one's."""
    from grpoflow.config import FormatWarmupConfig, GRPOConfig, ModelConfig
    from grpoflow.rollout.hf import HFEngine
    from grpoflow.train.distributed import full_parameters
    from grpoflow.train.policy import load_policy
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
        "generate/full": generate_case(dist, tiny_model, "full"),
        "generate/LoRA, gradient checkpointing": generate_case(dist, tiny_model, "lora"),
        "generate raises": generate_raises_case(dist, tiny_model),
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

"""Multi-turn rollouts with the python tool (issue #24): the environment, the episodes on the
transformers engine, the loss mask, the loss against a hand computation, resume, and the sandbox.

The tiny random model never writes a code block by itself, so these tests script it: ScriptedTurns
is a logits processor in front of the real model's generate that forces each turn's text (a
```python block in the first turn of some episodes, then an answer that repeats the tool's output),
leaving a few tokens of each turn to the model's own sampling so that episodes differ. The forward
passes, the sampling, the tokenizer, the chat template and the sandbox are the real ones.
"""

from __future__ import annotations

import json

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from grpoflow.answer_format import format_answer
from grpoflow.config import validate_config
from grpoflow.environments import PythonTool, SingleTurn
from grpoflow.rollout import HFEngine, SamplingParams
from grpoflow.rollout.episodes import run_episodes

CODE = "```python\nprint(17 * 23)\n```"


class ScriptedTurns(LogitsProcessor):
    """Forces every turn to `free` tokens of the model's own choice (no special token among them),
    then: in the first turn, CODE when the first free token's id is even, else "<answer>7</answer>";
    in a later turn, "<answer>{the tool's last output line}</answer>" (read from the context, so
    the answer can only be right if the tool's output reached the model); then the end of turn."""

    def __init__(self, tokenizer, free: int = 2):
        self.tokenizer, self.free = tokenizer, free
        self.start = tokenizer.convert_tokens_to_ids("<|im_start|>")
        self.eos = tokenizer.eos_token_id
        self.special = sorted(set(tokenizer.all_special_ids))
        self.header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids)

    def script(self, context: list[int], written: list[int]) -> list[int]:
        text = self.tokenizer.decode(context)
        if "<|im_start|>tool" not in text:
            target = CODE if written[0] % 2 == 0 else "<answer>7</answer>"
        else:
            tool = text.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>", 1)[0]
            target = f"<answer>{tool.strip().splitlines()[-1]}</answer>"
        return self.tokenizer(target, add_special_tokens=False).input_ids + [self.eos]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()  # [B, V]
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            turn_start = max(i for i, t in enumerate(ids) if t == self.start) + self.header
            context, written = ids[:turn_start], ids[turn_start:]
            if len(written) < self.free:
                scores[row, self.special] = float("-inf")
                continue
            script = self.script(context, written)
            k = len(written) - self.free
            forced = script[k] if k < len(script) else self.eos
            scores[row] = float("-inf")
            scores[row, forced] = 0.0
        return scores


def scripted_generate(model, tokenizer, free: int = 2):
    """model.generate with ScriptedTurns in front of whatever processors the engine passes (the
    seeded sampler's, which then samples the free tokens and takes the forced ones)."""
    script = ScriptedTurns(tokenizer, free)

    def generate(**kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([script, *(kwargs.pop("logits_processor", None) or [])])
        return model.generate(**kwargs)

    return generate


@pytest.fixture(scope="module")
def engine(tiny_model, unsandboxed_allowed):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return HFEngine(model, tokenizer, progress=False, generate=scripted_generate(model, tokenizer))


def rows(n: int = 4) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"What is 17 * 23? ({i})"}], "answer": "391"} for i in range(n)]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 96, "temperature": 1.0, "n": 4, "logprobs": True, **kw})


def test_the_tool_output_reaches_the_next_turn(engine):
    groups = run_episodes(engine, PythonTool(), rows(), params(), seeds=[11, 12, 13, 14], max_turns=3)
    episodes = [c for g in groups for c in g]
    called = [c for c in episodes if c.parts["tool_calls"]]
    direct = [c for c in episodes if not c.parts["tool_calls"]]
    assert called and direct, [c.text for c in episodes]  # the seeds give both kinds
    tok = engine.tokenizer
    for c in called:
        assert c.turns == 2 and c.parts == {"tool_calls": 1, "tool_errors": 0} and c.finished
        assert c.text.endswith("<answer>391</answer>"), c.text  # 391 came from the sandbox, through the context
        # what the rewards and verdicts read: the model's last turn, the answer
        assert c.final_text.endswith("<answer>391</answer>") and "```" not in c.final_text and CODE in c.text
        # the sequence is the chat template's: model turn, tool message, model turn
        whole = tok.decode(c.token_ids)
        assert "```<|im_end|>\n<|im_start|>tool\n391\n<|im_end|>\n<|im_start|>assistant\n" in whole, whole
    for c in direct:
        assert c.turns == 1 and c.mask is None and c.parts == {"tool_calls": 0, "tool_errors": 0}
        assert c.text.endswith("<answer>7</answer>")


def test_the_mask_covers_exactly_the_model_tokens(engine):
    groups = run_episodes(engine, PythonTool(), rows(2), params(), seeds=[5, 6], max_turns=3)
    tok = engine.tokenizer
    for c in (c for g in groups for c in g if c.mask is not None):
        assert len(c.mask) == len(c.token_ids) == len(c.logprobs)
        tool = [t for t, m in zip(c.token_ids, c.mask) if m == 0]
        model = [t for t, m in zip(c.token_ids, c.mask) if m == 1]
        assert tok.decode(tool) == "\n<|im_start|>tool\n391\n<|im_end|>\n<|im_start|>assistant\n"
        first, second = tok.decode(model).split("```<|im_end|>")  # the first turn ends at the code block
        assert first.endswith(CODE[:-3]) and second.endswith("<answer>391</answer><|im_end|>"), (first, second)
        # one run of tool tokens, between the two turns: [1]*a + [0]*b + [1]*c
        edges = [i for i in range(1, len(c.mask)) if c.mask[i] != c.mask[i - 1]]
        assert len(edges) == 2 and c.mask[0] == 1
        assert all(lp == 0.0 for lp, m in zip(c.logprobs, c.mask) if m == 0)
        assert all(lp < 0.0 or lp == 0.0 for lp in c.logprobs)
        # the forced tokens have log-prob 0 under the processed distribution; some free ones do not
        assert any(lp < 0.0 for lp, m in zip(c.logprobs, c.mask) if m == 1)


USED_TOOL_REWARD = '''
def used_tool(prompts, completions, tool_calls, tool_errors, conversation, **_):
    assert all(c.endswith("</answer>") and "```" not in c for c in completions)  # the answers
    assert all(("```" in whole) == bool(calls) for whole, calls in zip(conversation, tool_calls))
    return [float(calls) - errors for calls, errors in zip(tool_calls, tool_errors)]
'''


def test_a_multi_turn_loss_is_the_sum_of_its_turns_losses(engine, tiny_model, tmp_path):
    """dapo: sum over the model's tokens of -A * ratio, over the generation's model tokens. Each turn
    computed by hand in its own forward (its context: the prompt and everything before it) gives
    the same loss and the same gradients as the batch, tool tokens and all, in one forward."""
    from grpoflow.rewards import RewardSet
    from grpoflow.train.generation import build_batch, sample_groups
    from grpoflow.train.loss import micro_step_loss
    from grpoflow.train.policy import Policy

    (tmp_path / "r.py").write_text(USED_TOOL_REWARD)
    grpo = validate_config({"grpo": {"num_generations": 4, "max_completion_length": 96, "loss_type": "dapo",
                                     "per_device_train_batch_size": 8, "reward_funcs": [f"{tmp_path / 'r.py'}:used_tool"]},
                            }).grpo
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    policy = Policy(model, engine.tokenizer, torch.device("cpu"), torch.float32, is_peft=False)
    rewards = RewardSet(grpo.reward_funcs, grpo.reward_weights)
    data = rows(2)
    sampled = sample_groups(engine, data, [0, 1], rewards, grpo, seeds=[5, 6], env=PythonTool(), max_turns=3)
    completions = [c for g in sampled.groups for c in g]
    assert sampled.scores.totals == [float(c.parts["tool_calls"]) for c in completions]  # the column reached the reward
    assert 0 < sum(sampled.scores.totals) < len(completions)  # both kinds: advantages are not all 0
    batch = build_batch(sampled, data, policy, rewards, grpo, need_old_logps=False, micro_batch=8)
    assert batch.num_items == sum(c.model_tokens for c in completions) < sum(len(c.token_ids) for c in completions)
    for i, c in enumerate(completions):
        mask = batch.completion_mask[i, :len(c.token_ids)]
        assert mask.tolist() == [float(m) for m in (c.mask or [1] * len(c.token_ids))]
        assert batch.completion_mask[i, len(c.token_ids):].sum() == 0

    model.train()
    loss, _ = micro_step_loss(policy, batch.slice(0, 8), batch, grpo, None)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    by_hand = torch.zeros(())
    for c, advantage in zip(completions, batch.advantages):
        mask = c.mask or [1] * len(c.token_ids)
        turns, start = [], None  # [start, end) of each run of the model's tokens
        for t, m in enumerate(mask + [0]):
            if m and start is None:
                start = t
            elif not m and start is not None:
                turns.append((start, t))
                start = None
        assert len(turns) == c.turns
        for start, end in turns:
            context = c.prompt_ids + c.token_ids[:start]
            ids = torch.tensor([context + c.token_ids[start:end]])  # [1, L]
            logits = model(input_ids=ids).logits[0, len(context) - 1:-1]  # [turn, V]
            logps = torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(context):, None]).squeeze(1)  # [turn]
            by_hand = by_hand + (-advantage * torch.exp(logps - logps.detach())).sum() / batch.num_items
    by_hand.backward()
    assert loss.item() == pytest.approx(by_hand.item(), abs=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_truncation_and_tool_errors_end_episodes_cleanly(engine):
    # a budget that the first turn's code block fits in, but not the tool's message after it
    first = run_episodes(engine, PythonTool(), rows(2), params(max_tokens=96), seeds=[5, 6], max_turns=3)
    called = next(c for g in first for c in g if c.parts["tool_calls"])
    budget = called.mask.index(0) + 3  # the model's first turn and 3 of the tool message's tokens
    groups = run_episodes(engine, PythonTool(), rows(2), params(max_tokens=budget), seeds=[5, 6], max_turns=3)
    for c in (c for g in groups for c in g):
        assert len(c.token_ids) <= budget and len(c.logprobs) == len(c.token_ids)
        if c.parts["tool_calls"]:  # cut inside the tool's message: no model turn after it, not finished
            assert not c.finished and c.turns == 1 and c.mask[-3:] == [0, 0, 0]
    # max_turns 1: the code is never run
    once = run_episodes(engine, PythonTool(), rows(2), params(), seeds=[5, 6], max_turns=1)
    assert all(c.mask is None and c.turns == 1 for g in once for c in g)

    tool = PythonTool()
    observation, done, parts = tool.step([], "Let me check.\n```python\nprint(1)\nprint(1 / 0)\n```")
    assert observation == "1\nError: crashed: ZeroDivisionError: division by zero" and not done
    assert parts == {"tool_calls": 1, "tool_errors": 1}
    observation, done, parts = tool.step([], "```python\nwhile True:\n    pass\n```")
    assert observation.startswith("Error: timeout") and parts["tool_errors"] == 1
    observation, done, parts = tool.step([], "The answer is <answer>3</answer>.")
    assert observation is None and done and parts == {"tool_calls": 0, "tool_errors": 0}
    assert SingleTurn().step([], "```python\nprint(1)\n```") == (None, True, {})


def test_a_tool_call_cannot_reach_the_trainers_process_or_files(tmp_path, unsandboxed_allowed):
    """The tool's code runs in the code verifier's sandbox: no file of the trainer to read or
    write, no signal to its process, no network, no subprocess. Where bubblewrap is missing the
    child's audit hook alone refuses these (the unsandboxed_allowed fixture)."""
    import os

    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    target = tmp_path / "written.txt"
    attempts = {
        "read": f"print(open({str(secret)!r}).read())",
        "write": f"open({str(target)!r}, 'w').write('x')",
        "kill": f"import os\nos.kill({os.getpid()}, 9)",
        "signal": f"import signal\nsignal.pthread_kill({os.getpid()}, 9)",
        "subprocess": "import subprocess\nsubprocess.run(['true'])",
        "network": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)",
        "escape": "print(().__class__.__base__.__subclasses__())",
    }
    tool = PythonTool()
    for name, code in attempts.items():
        observation, done, parts = tool.step([], f"```python\n{code}\n```")
        assert parts == {"tool_calls": 1, "tool_errors": 1}, (name, observation)
        assert "Error: " in observation and "s3cr3t" not in observation, (name, observation)
    assert not target.exists() and secret.read_text() == "s3cr3t"  # and this process is still here
    # what it may do: compute, and write in its own working dir
    observation, _, parts = tool.step([], "```python\nopen('scratch.txt', 'w').write('ok')\n"
                                          "print(open('scratch.txt').read(), sum(range(10)))\n```")
    assert observation == "ok 45\n" and parts["tool_errors"] == 0


def tool_run_config(tmp_path: Path, **grpo):
    (tmp_path).mkdir(parents=True, exist_ok=True)
    (tmp_path / "r.py").write_text(USED_TOOL_REWARD)
    settings = {"learning_rate": 3e-3, "max_steps": 5, "num_generations": 4, "per_device_train_batch_size": 2,
                "steps_per_generation": 2, "gradient_accumulation_steps": 1, "max_completion_length": 64,
                "max_prompt_length": 64, "reward_funcs": [f"{tmp_path / 'r.py'}:used_tool"],
                "warmup": {"enabled": False}, "gradient_checkpointing": False, "save_steps": 1,
                "output_dir": str(tmp_path / "train"), "seed": 3, **grpo}
    return validate_config({"model": {"finetune": "full", "dtype": "float32"}, "grpo": settings,
                            "rollout": {"environment": "python_tool", "max_turns": 3}})


@pytest.fixture
def scripted_policy(monkeypatch):
    """The trainer's policy generates through ScriptedTurns (the engine is built on Policy.generate)."""
    from grpoflow.train.policy import Policy

    real = Policy.generate

    def generate(self, **kwargs):
        script = ScriptedTurns(self.tokenizer)
        kwargs["logits_processor"] = LogitsProcessorList([script, *(kwargs.pop("logits_processor", None) or [])])
        return real(self, **kwargs)

    monkeypatch.setattr(Policy, "generate", generate)


def test_resume_mid_generation_with_the_tool_matches_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch,
                                                                          scripted_policy, unsandboxed_allowed):
    """As tests/test_train.py's resume test, with python_tool episodes: crash on the second
    micro-batch of the second generation, resume, and every figure and weight is the same."""
    import stages.train as train_stage
    from stages.train import run_train

    from grpoflow.train.checkpoint import trained_weights
    from tests.test_train import data, metrics

    train, heldout = data(tmp_path)
    whole = run_train(tool_run_config(tmp_path / "a"), train, heldout, str(tiny_model), progress=False)
    history = metrics(whole)
    calls = [m["tools/call_frequency"] for m in history]
    assert any(0 < f < 1 for f in calls), calls  # episodes with and without the tool: a signal to learn from
    assert all(m["completions/mean_turns"] > 1 and m["tools/tool_errors/mean"] == 0 for m in history)

    real = train_stage.micro_step_loss
    count = {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        count["n"] += 1
        if count["n"] == 4:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_stage, "micro_step_loss", crash_on_fourth)
    cfg = tool_run_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, train, heldout, str(tiny_model), progress=False)
    monkeypatch.setattr(train_stage, "micro_step_loss", real)
    saved = torch.load(next(Path(cfg.grpo.output_dir).glob("*/checkpoints/step-000003")) / "trainer_state.pt",
                       weights_only=False)
    assert saved["next_micro"] == 1 and not saved["at_generation_boundary"]  # stopped inside a generation
    resumed = run_train(cfg, train, heldout, str(tiny_model), progress=False)

    a, b = history, metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    for x, y in zip(a, b):
        for key in ("loss", "reward", "grad_norm", "completions/mean_length", "tools/call_frequency"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = trained_weights(next(Path(whole.output_dir).glob("checkpoints/step-000005")))
    wb = trained_weights(next(Path(resumed.output_dir).glob("checkpoints/step-000005")))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_the_environment_keys_a_run_but_the_default_keeps_its_key(tmp_path):
    from grpoflow.train.checkpoint import run_key

    train = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "x"}]), train)

    def key(**rollout):
        return run_key(validate_config({"rollout": rollout}), train, "m")

    assert key() == key(environment="single_turn") == key(max_turns=7)  # single_turn: max_turns changes nothing
    assert key(environment="python_tool") != key()
    assert key(environment="python_tool", max_turns=2) != key(environment="python_tool")


def test_the_evaluation_stage_runs_the_environment(engine, tmp_path, monkeypatch):
    """run_evaluate with rollout.environment: python_tool, on the scripted model: a row is right
    exactly when its episode called the tool (the answer is the tool's output), and the figures
    count the calls; single_turn on the same rows reports no tool figures and never runs code."""
    import stages.evaluate as evaluate_stage
    from grpoflow.config import EvalConfig, RolloutConfig

    monkeypatch.setattr(evaluate_stage, "make_engine", lambda *a, **k: engine)
    data = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is 17 * 23? Take {i}."}], "question": "q",
             "answer": "391", "metadata": None} for i in range(8)]
    heldout = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(data), heldout)
    cfg = EvalConfig(max_samples=None, max_new_tokens=96, output_dir=tmp_path / "eval", reward_funcs=["correctness"])
    tools = evaluate_stage.run_evaluate(cfg, heldout, {"base": "scripted"},
                                        rollout=RolloutConfig(environment="python_tool", max_turns=3))
    figures = tools.models["base"]
    assert figures["tool_call_rate"] > 0, figures
    assert figures["accuracy"] == figures["tool_call_rate"] == figures["tool_calls"]
    assert figures["tool_errors"] == 0 and figures["mean_turns"] == 1 + figures["tool_calls"]
    samples = pq.read_table(Path(tools.output_dir) / "base.samples.parquet").to_pydict()
    assert samples["correct"] == [calls == 1 for calls in samples["tool_calls"]]

    plain = evaluate_stage.run_evaluate(cfg, heldout, {"base": "scripted"}).models["base"]
    assert plain["accuracy"] == 0 and "tool_call_rate" not in plain  # the code blocks stay text


class _ScriptedLLM:
    """vllm.LLM's generate as VLLMEngine calls it (prompt_token_ids in, token ids and flat log-probs
    out), answering with ScriptedTurns' script and no free tokens: request i of a first turn writes
    CODE when i is even. A fake, for what cannot run here (vLLM needs a GPU); it records the calls."""

    tokenizer = None

    def __init__(self, **kwargs):
        self.calls = []

    def generate(self, requests, sampling, **_):
        import types

        self.calls.append((requests, sampling))
        script = ScriptedTurns(self.tokenizer, free=0)
        outputs = []
        for i, (request, params) in enumerate(zip(requests, sampling)):
            text = self.tokenizer.decode(request["prompt_token_ids"])
            if "<|im_start|>tool" not in text:
                target = self.tokenizer(CODE if i % 2 == 0 else "<answer>7</answer>",
                                        add_special_tokens=False).input_ids + [script.eos]
            else:
                target = script.script(request["prompt_token_ids"], [])
            ids = target[:params.max_tokens]
            logprobs = types.SimpleNamespace(logprobs=[-0.5] * len(ids), token_ids=list(ids))
            done = types.SimpleNamespace(token_ids=ids, logprobs=logprobs,
                                         finish_reason="stop" if ids == target else "length")
            outputs.append(types.SimpleNamespace(outputs=[done] * params.n))
        return outputs


def test_vllm_engine_runs_episodes_from_token_ids(tiny_model, monkeypatch, unsandboxed_allowed):
    """The vLLM engine's side of the episodes, on a fake vllm.LLM: later turns are requests of
    prompt_token_ids (the prompt, the turns so far, the tool's message), one completion each, within
    the budget left; the completions come back as the transformers engine's do."""
    import sys
    import types

    from grpoflow.rollout.vllm import VLLMEngine

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    _ScriptedLLM.tokenizer = tokenizer
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        __version__="0.26.0", LLM=_ScriptedLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (0, 0))  # no card here
    engine = VLLMEngine(str(tiny_model), tokenizer, dtype="bfloat16", gpu_memory_utilization=0.3,
                        max_model_len=256, seed=7, sleep=False)
    groups = run_episodes(engine, PythonTool(), rows(2), params(n=1, max_tokens=60), seeds=[1, 2], max_turns=3)
    first, second = groups[0][0], groups[1][0]
    assert first.text.endswith("<answer>391</answer>") and first.parts == {"tool_calls": 1, "tool_errors": 0}
    assert second.text == "<answer>7</answer>" and second.mask is None
    tool = [t for t, m in zip(first.token_ids, first.mask) if m == 0]
    assert tokenizer.decode(tool) == "\n<|im_start|>tool\n391\n<|im_end|>\n<|im_start|>assistant\n"
    assert first.logprobs == [-0.5 if m else 0.0 for m in first.mask]
    requests, sampling = engine.llm.calls[1]  # the second turn: the first episode only
    turn_one = first.mask.index(0)
    assert [r["prompt_token_ids"] for r in requests] == [first.prompt_ids + first.token_ids[:turn_one + len(tool)]]
    assert [(s.n, s.max_tokens) for s in sampling] == [(1, 60 - turn_one - len(tool))]


def test_the_warm_up_examples_call_the_tool_and_train_on_the_model_turns_only(tiny_model, unsandboxed_allowed):
    from grpoflow.train.warmup import _sft_batch, tool_code, tool_turn

    solution = "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10."
    assert tool_code(solution) == "```python\nprint(12/60)\nprint(0.2 * 50)\n```"
    assert tool_code("She has 1,200 / 4 = 300 left.") == "```python\nprint(1200 / 4)\n```"
    assert tool_code("No calculation here.") is None
    row = {"prompt": [{"role": "user", "content": "How much did Weng earn?"}], "solution": solution, "answer": "10"}
    turn = tool_turn(PythonTool(), row)
    assert turn == (tool_code(solution), "0.2\n10.0\n")  # the sandbox's real output

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    input_ids, attention_mask, labels = _sft_batch(tokenizer, [row, row], 64, 256, "cpu", [turn, None])
    trained = tokenizer.decode([t for t in labels[0].tolist() if t != -100])
    assert trained.startswith(turn[0] + "<|im_end|><reasoning>") and trained.endswith("</answer>\n<|im_end|>")
    untrained = tokenizer.decode([t for t, lab, a in zip(input_ids[0].tolist(), labels[0].tolist(),
                                                         attention_mask[0].tolist()) if lab == -100 and a])
    assert untrained.endswith("<|im_start|>assistant\n\n<|im_start|>tool\n0.2\n10.0\n<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.decode([t for t in labels[1].tolist() if t != -100])
    assert plain.startswith("<reasoning>") and "```" not in plain  # a row without a turn: as before


def test_a_tool_run_warms_up_on_worked_examples_that_call_the_tool(tiny_model, tmp_path, unsandboxed_allowed):
    from stages.train import run_train

    data = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "question": f"{i} + 1",
             "answer": str(i + 1), "solution": f"It is {i} + 1 = {i + 1}." if i % 4 else "It is one more.",
             "origin": f"t:{i}", "metadata": None} for i in range(16)]
    train, heldout = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(data), train)
    pq.write_table(pa.Table.from_pylist(data[:4]), heldout)
    cfg = tool_run_config(tmp_path, max_steps=1, steps_per_generation=1, per_device_train_batch_size=4,
                          warmup={"enabled": True, "rows": 8, "batch_size": 4, "eval_prompts": 2})
    report = json.loads((Path(run_train(cfg, train, heldout, str(tiny_model), progress=False).model_dir)
                         / "report.json").read_text())
    # 12 of the 16 solutions have a calculation; the first 8 of them are the warm-up's
    assert report["warmup"]["tool_examples"] == report["warmup"]["rows"] == 8


SCRIPTED_RANKS = '''
# tests/test_tools.py's hook: torchrun's workers (LOCAL_RANK set) generate through ScriptedTurns, as
# the scripted_policy fixture makes the test's own process do. The sandbox's interpreter (python -I -S)
# never reads this file.
import os

if "LOCAL_RANK" in os.environ:
    from transformers import LogitsProcessorList

    from grpoflow.train.policy import Policy
    from tests.test_tools import ScriptedTurns

    real = Policy.generate

    def generate(self, **kwargs):
        script = ScriptedTurns(self.tokenizer)
        kwargs["logits_processor"] = LogitsProcessorList([script, *(kwargs.pop("logits_processor", None) or [])])
        return real(self, **kwargs)

    Policy.generate = generate
'''


def test_two_processes_run_the_tool_episodes_of_one(tiny_model, tmp_path, monkeypatch, scripted_policy,
                                                    unsandboxed_allowed):
    """python_tool under torchrun: each process runs the episodes of its block of the generation (its
    own sandboxed tool calls), and the run is the one-process run: the same tool calls, rewards, loss
    and weights. A later turn's seed is the prompt's, the turn's and the completion's, whatever process
    generates it."""
    from stages.train import run_train

    from tests.test_distributed import launch, prepared, trained
    from tests.test_train import metrics

    # the same global batch: 2 prompts x 4 episodes a step, on 1 process or on 2 of 4 episodes each
    one = tool_run_config(tmp_path / "one", max_steps=2, per_device_train_batch_size=8, steps_per_generation=1)
    two = tool_run_config(tmp_path / "two", max_steps=2, per_device_train_batch_size=4, steps_per_generation=1)
    two.grpo.reward_funcs, two.orchestration.train_processes = one.grpo.reward_funcs, 2
    train, heldout, model = prepared(tmp_path, tiny_model, one, two)
    single = run_train(one, train, heldout, model, progress=False)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SCRIPTED_RANKS)
    monkeypatch.setenv("PYTHONPATH", str(hook))  # launch_train puts the repository before it
    double = launch(two, 2)

    a, b = metrics(single), metrics(double)
    assert [m["step"] for m in b] == [1, 2]
    assert any(m["tools/call_frequency"] > 0 for m in a)  # the script called the tool
    for x, y in zip(a, b):
        for key in ("tools/call_frequency", "tools/tool_errors/mean", "completions/mean_turns", "reward", "loss",
                    "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    wa, wb = trained(single.output_dir, 2), trained(double.output_dir, 2)
    assert wa.keys() == wb.keys()
    # float32 noise of two processes' all-reduce: 2.1e-6 on one CPU (x86, 2026-12-06), under 2e-6 on
    # another; a wrong normaliser or a missing all-reduce moves these weights by ~1e-3
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


class StrictAnswers(ScriptedTurns):
    """Every episode calls the tool, then answers in the strict layout with what the tool printed."""

    def script(self, context: list[int], written: list[int]) -> list[int]:
        text = self.tokenizer.decode(context)
        if "<|im_start|>tool" not in text:
            target = CODE
        else:
            tool = text.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>", 1)[0]
            target = format_answer("The tool says.", tool.strip().splitlines()[-1])
        return self.tokenizer(target, add_special_tokens=False).input_ids + [self.eos]


def test_the_format_rates_judge_an_episodes_last_turn_as_the_rewards_do(tiny_model, tmp_path, monkeypatch,
                                                                       unsandboxed_allowed):
    """On the GPU (2026-12-06) the tool recipe's warm-up said "strict format 0% -> 0%" and every step line
    "strict format 0%" while the evaluation found 98.8%: both judged the first turn (a tool call) or the
    whole episode, not the answer."""
    from grpoflow.train.policy import Policy
    from grpoflow.train.warmup import format_rate
    from stages.train import run_train

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    script = StrictAnswers(tokenizer, free=0)

    def generate(**kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([script, *(kwargs.pop("logits_processor", None) or [])])
        return model.generate(**kwargs)

    engine = HFEngine(model, tokenizer, progress=False, generate=generate)
    prompts = [r["prompt"] for r in rows(3)]
    assert format_rate(engine, prompts, 96)["strict_format"] == 0.0  # one turn: the tool call
    assert format_rate(engine, prompts, 96, PythonTool(), max_turns=3) == {"strict_format": 1.0, "soft_format": 1.0}

    real = Policy.generate

    def policy_generate(self, **kwargs):
        kwargs["logits_processor"] = LogitsProcessorList([StrictAnswers(self.tokenizer, free=0),
                                                          *(kwargs.pop("logits_processor", None) or [])])
        return real(self, **kwargs)

    monkeypatch.setattr(Policy, "generate", policy_generate)
    data = [{"id": str(i), "prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "question": f"{i} + 1",
             "answer": str(i + 1), "solution": f"It is {i} + 1 = {i + 1}.", "origin": f"t:{i}", "metadata": None}
            for i in range(8)]
    train, heldout = tmp_path / "train.parquet", tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(data), train)
    pq.write_table(pa.Table.from_pylist(data[:2]), heldout)
    cfg = tool_run_config(tmp_path, max_steps=1, steps_per_generation=1, per_device_train_batch_size=4,
                          max_completion_length=96, warmup={"enabled": True, "rows": 4, "batch_size": 4,
                                                            "eval_prompts": 2})
    folder = Path(run_train(cfg, train, heldout, str(tiny_model), progress=False).model_dir)
    warmup = json.loads((folder / "report.json").read_text())["warmup"]
    assert warmup["format_strict_before"] == warmup["format_strict_after"] == 1.0
    steps = [json.loads(line) for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
    assert [s["completions/strict_format"] for s in steps if "completions/strict_format" in s] == [1.0]

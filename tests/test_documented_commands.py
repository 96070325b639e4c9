"""Every command the documentation prints names things that exist, as written.

The commands are read from README.md, benchmarks/RESULTS.md, docs/, containers/README.md and the
usage comments of the benchmark shell scripts: code blocks, indented blocks and `inline code`. Each is
checked the way it would run, without running the work (most need a GPU or minutes):

  grpoflow ..., python -m grpoflow.cli ..., torchrun ... -m grpoflow.cli ...  parsed by grpoflow's own
      argument parser: the subcommand and every flag must be accepted
  python benchmarks/x.py ...  the script exists and its --help (run as written, from the repository
      root) lists every flag the command uses
  bash benchmarks/x.sh MODE   the script exists and has MODE among its modes
  make TARGET                 the Makefile has the target
  python -m package.module    the module exists in the repository
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", "benchmarks/RESULTS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
             "containers/README.md", "kernels/README.md",
             *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks").glob("*.sh"))]
PROGRAMS = {"grpoflow", "make", "python", "python3", "bash", "torchrun"}


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command-looking line of the documents."""
    found: list[tuple[str, str]] = []
    for name in DOCUMENTS:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_text()
        candidates: list[tuple[int, str]] = []
        if path.suffix == ".sh":  # the usage comments at the top
            lines = [(i, line.lstrip("#").strip()) for i, line in enumerate(text.splitlines(), 1)
                     if line.startswith("#")]
            candidates += _joined(lines)
        else:
            block, lines = False, []
            for i, line in enumerate(text.splitlines(), 1):
                if line.startswith("```"):
                    block = not block
                    continue
                if block or line.startswith("    "):
                    lines.append((i, line.strip()))
                else:
                    candidates += [(i, span) for span in re.findall(r"`([^`]+)`", line)]
            candidates += _joined(lines)
        for number, line in candidates:
            command = _command(line)
            if command:
                found.append((f"{name}:{number}", command))
    return found


def _joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Continuation lines (ending in a backslash) joined to the line they continue."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, line in lines:
        if pending:
            number, line = pending[0], pending[1] + " " + line
        pending = (number, line[:-1]) if line.endswith("\\") else None
        if not pending:
            out.append((number, line))
    return out


def _command(line: str) -> str | None:
    """The command a line holds, from its program on, without the prompt, environment assignments and
    a trailing comment; None when the line is not a command."""
    line = line.strip().removeprefix("$ ")
    line = re.sub(r"^(export )?([A-Z_][A-Z0-9_]*=\S*\s+)+", "", line)
    first = line.split(" ", 1)[0]
    if first not in PROGRAMS or first == line:
        return None if first != "grpoflow" and first != "make" else (line if line in ("make", "grpoflow") else None)
    return re.split(r"\s+#\s", line, maxsplit=1)[0].strip()


def _tokens(command: str) -> list[str]:
    """The words of the first simple command (up to a redirection, pipe or `;`), shell expansions left as
    placeholders, `...` and [optional] parts dropped."""
    try:
        words = shlex.split(command, comments=False)
    except ValueError:
        words = command.split()
    out = []
    for word in words:
        if word in (";", "|", "||", "&&", ">", ">>", "2>", "2>>") or word.startswith((">", "2>")) or \
                word.endswith(";"):
            if word.endswith(";") and word not in (";",):
                out.append(word[:-1])
            break
        if word in ("...", "\\") or (word.startswith("[") and word.endswith("]")):
            continue
        out.append(word)
    return out


def _grpoflow_args(words: list[str]) -> list[str] | None:
    """The arguments grpoflow's parser receives, for the forms that run grpoflow."""
    if words[0] == "grpoflow":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1] == "grpoflow.cli":
        return words[words.index("-m") + 2:]
    return None


@functools.cache
def _help(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr[-2000:]}"
    return done.stdout


@functools.cache
def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def check(command: str) -> str | None:
    """What is wrong with a documented command, or None."""
    words = _tokens(command)
    if not words:
        return None
    program = words[0]
    if program == "make":
        missing = [t for t in words[1:] if "=" not in t and not t.startswith("-") and t not in _make_targets()]
        return f"no make target {missing}" if missing else None
    args = _grpoflow_args(words)
    if args is not None:
        from grpoflow.cli import _parser

        args = [a for a in args if not a.startswith("${") and a != "$@"]
        # placeholders in capitals (COMMAND, SECONDS) stand for any valid value
        args = [("run" if i == 0 else "1") if re.fullmatch(r"[A-Z][A-Z_]*", a) else a for i, a in enumerate(args)]
        try:
            _parser().parse_args(args)
        except SystemExit as e:
            return None if e.code == 0 else f"grpoflow does not accept: {' '.join(args)}"  # 0: --help
        return None
    if program in ("python", "python3"):
        if words[1] == "-m":
            module = words[2]
            if module.split(".")[0] in ("grpoflow", "stages", "flows", "benchmarks", "tests"):
                path = ROOT / module.replace(".", "/")
                if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
                    return f"no module {module}"
            return None
        script = words[1]
        if not script.startswith("benchmarks/"):
            return None if (ROOT / script).is_file() else f"no file {script}"
        if not (ROOT / script).is_file():
            return f"no file {script}"
        usage = _help(script)
        unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--") and w.split("=")[0] not in usage]
        return f"{script} does not accept {unknown}" if unknown else None
    if program == "bash" or program.endswith(".sh"):
        script = words[1] if program == "bash" else program
        path = ROOT / script
        if not path.is_file():
            return f"no file {script}"
        mode = words[2] if program == "bash" and len(words) > 2 else None
        if mode and not mode.startswith("-") and not re.search(rf"(^|[\s|(]){re.escape(mode)}[|)]", path.read_text(),
                                                                 flags=re.M):
            return f"{script} has no mode {mode}"
    return None


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_kind():
    programs = {_tokens(c)[0] for _, c in COMMANDS}
    assert {"grpoflow", "make", "python", "bash", "torchrun"} <= programs, programs
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_runs_as_written(where, command):
    problem = check(command)
    assert problem is None, f"{where}: `{command}`: {problem}"


def test_the_check_catches_what_went_wrong_before():
    """A renamed script, an unknown flag, a missing mode or target, a wrong subcommand all fail."""
    assert check("python benchmarks/kernels.py --out /tmp/k") == "no file benchmarks/kernels.py"
    assert "does not accept ['--nope']" in check("python benchmarks/gsm8k_report.py --run /tmp/r --nope 1")
    assert check("bash benchmarks/vllm_gpu.sh speedy") == "benchmarks/vllm_gpu.sh has no mode speedy"
    assert check("bash benchmarks/vllm_gpu.sh speed") is None
    assert check("make pipelines") == "no make target ['pipelines']"
    assert check("grpoflow trian --set a=b").startswith("grpoflow does not accept")
    assert check("torchrun --standalone --nproc-per-node 2 -m grpoflow.cli train --stop-after 5") is None
    assert check("torchrun --standalone --nproc-per-node 2 -m grpoflow.cli train --stop-afterr 5") is not None

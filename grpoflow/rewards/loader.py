"""Turn one `reward_funcs` entry into a named reward function.

An entry is one of:
    correctness                           a registered reward (see registry.py)
    regex(pattern="^Dear", reward=0.5)    a registered factory with parameters; the values
                                          are Python literals, given by name
    path/to/my_rewards.py:score           a function in a file (relative to the working dir)
    my_package.rewards:score              a function in an importable module

The reward's name, used in metrics (`rewards/<name>/mean`), is the registered name, the
factory's `name` parameter, or the function's name in its file or module.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from grpoflow.errors import ConfigError
from grpoflow.rewards.registry import FACTORIES, REWARDS, registered_names

_CALL = re.compile(r"\s*[A-Za-z_]\w*\s*\(")


class RewardSpecError(ConfigError):
    """A `reward_funcs` entry names nothing usable. The message quotes the entry."""


@dataclass(frozen=True)
class NamedReward:
    name: str
    fn: Callable
    spec: str  # the entry as the user wrote it, for messages


def load_reward(spec: str | Callable) -> NamedReward:
    """Resolve one `reward_funcs` entry; a callable is taken as is, named by its __name__."""
    if callable(spec):
        name = getattr(spec, "__name__", type(spec).__name__)
        return NamedReward(name, spec, name)
    if not isinstance(spec, str) or not spec.strip():
        raise RewardSpecError(f"a reward must be a name or 'file.py:function', got {spec!r}")
    text = spec.strip()
    if _CALL.match(text):
        name, params = _parse_call(spec, text)
        return _from_registry(spec, name, params)
    if ":" in text:
        return _from_import(spec, text)
    return _from_registry(spec, text, None)


def _parse_call(spec: str, text: str) -> tuple[str, dict]:
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise RewardSpecError(f"reward '{spec}': cannot read it as name(key=value, ...): {e.msg}") from None
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise RewardSpecError(f"reward '{spec}': write it as name(key=value, ...)")
    if call.args or any(kw.arg is None for kw in call.keywords):
        raise RewardSpecError(
            f"reward '{spec}': give parameters by name, e.g. {call.func.id}(pattern='...')"
        )
    params = {}
    for kw in call.keywords:
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise RewardSpecError(
                f"reward '{spec}': parameter '{kw.arg}' must be a literal (a quoted string, a "
                f"number, True/False/None or a list of those), got {ast.unparse(kw.value)}"
            ) from None
    return call.func.id, params


def _from_registry(spec: str, name: str, params: dict | None) -> NamedReward:
    if name in REWARDS:
        if params:
            raise RewardSpecError(f"reward '{spec}': '{name}' takes no parameters; write it as {name}")
        return NamedReward(name, REWARDS[name], spec)
    if name in FACTORIES:
        factory = FACTORIES[name]
        _check_params(spec, name, factory, params or {})
        try:
            fn = factory(**(params or {}))
        except (ValueError, TypeError, OSError) as e:
            raise RewardSpecError(f"reward '{spec}': {e}") from e
        return NamedReward(getattr(fn, "__name__", name), fn, spec)
    close = difflib.get_close_matches(name, registered_names(), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise RewardSpecError(
        f"unknown reward '{name}'.{hint} Registered rewards: {', '.join(registered_names())}. "
        f"For your own function write 'path/to/file.py:function' or 'package.module:function'."
    )


def _check_params(spec: str, name: str, factory: Callable, params: dict) -> None:
    signature = inspect.signature(factory)
    accepted = list(signature.parameters)
    for key in params:
        if key not in accepted:
            raise RewardSpecError(
                f"reward '{spec}': {name}() has no parameter '{key}'; its parameters are "
                f"{', '.join(accepted)}"
            )
    missing = [p.name for p in signature.parameters.values() if p.default is p.empty and p.name not in params]
    if missing:
        example = ", ".join(f"{m}=..." for m in missing)
        raise RewardSpecError(f"reward '{spec}': {name} needs {', '.join(missing)}; write it as {name}({example})")


def _from_import(spec: str, text: str) -> NamedReward:
    target, _, attr = text.rpartition(":")
    if not target or not attr.isidentifier():
        raise RewardSpecError(
            f"reward '{spec}': write it as 'path/to/file.py:function' or 'package.module:function'"
        )
    module, where = _load_file(spec, target) if target.endswith(".py") else _import_module(spec, target)
    if not hasattr(module, attr):
        functions = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(attr, functions, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise RewardSpecError(f"reward '{spec}': {where} has no function '{attr}'{hint}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise RewardSpecError(
            f"reward '{spec}': '{attr}' in {where} is a {type(fn).__name__}, not a function"
        )
    return NamedReward(attr, fn, spec)


def _load_file(spec: str, target: str) -> tuple[ModuleType, str]:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise RewardSpecError(f"reward '{spec}': file not found: {path}")
    # A name unique to the path: two reward files both called rewards.py must not clash.
    module_name = f"grpoflow_reward_file_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise RewardSpecError(f"reward '{spec}': running {path} failed: {type(e).__name__}: {e}") from e
    return module, target


def _import_module(spec: str, target: str) -> tuple[ModuleType, str]:
    try:
        return importlib.import_module(target), f"module '{target}'"
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise RewardSpecError(
                f"reward '{spec}': no module named '{target}'; install it or add its folder to "
                f"PYTHONPATH (for a file, write 'path/to/file.py:function')"
            ) from e
        raise RewardSpecError(f"reward '{spec}': importing '{target}' failed: {e}") from e
    except Exception as e:
        raise RewardSpecError(f"reward '{spec}': importing '{target}' failed: {type(e).__name__}: {e}") from e

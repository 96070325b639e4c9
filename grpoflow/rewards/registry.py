"""The names a config can use in `reward_funcs`.

Two kinds of entry:
- a reward: a function `(prompts, completions, **columns) -> list[float | None]`, used as is
  (`correctness`);
- a factory: a function of parameters that returns a reward (`regex(pattern="^Dear")`). A
  factory whose parameters all have defaults can be named bare (`proximity`).

Built-ins register themselves when `grpoflow.rewards` is imported. Loading by name, with
parameters, or from a file is in loader.py.
"""

from __future__ import annotations

from typing import Callable

REWARDS: dict[str, Callable] = {}
FACTORIES: dict[str, Callable[..., Callable]] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a reward function available in configs under `name`."""
    return lambda fn: _add(REWARDS, name, fn)


def register_factory(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a reward factory available in configs as `name(key=value, ...)`."""
    return lambda fn: _add(FACTORIES, name, fn)


def registered_names() -> list[str]:
    return sorted([*REWARDS, *FACTORIES])


def _add(table: dict[str, Callable], name: str, fn: Callable) -> Callable:
    existing = REWARDS.get(name) or FACTORIES.get(name)
    # The same function registering again is a module being reloaded (Jupyter autoreload).
    if existing is not None and _origin(existing) != _origin(fn):
        module, qualname = _origin(existing)
        raise ValueError(f"a reward named '{name}' is already registered, by {module}.{qualname}; pick another name")
    table[name] = fn
    return fn


def _origin(fn: Callable) -> tuple[str, str]:
    return getattr(fn, "__module__", ""), getattr(fn, "__qualname__", "")

"""Named registries of plain functions (rewards, advantage estimators, loss aggregations): a user adds
one with `@register("name")` in a module the config names in `plugins`, then names it in the rl section."""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def registrar(table: dict[str, F]) -> Callable[[str], Callable[[F], F]]:
    """A decorator factory that files functions into `table` under a name."""
    def register(name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            table[name] = fn
            return fn
        return add
    return register

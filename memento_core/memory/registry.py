"""The memory policies by name: a bank records its policy's name, and this finds the policy again.

Policies register themselves when their module is imported (``memento_core.memory`` imports them all),
so the bank, persistence and callers can turn a recorded name into the policy object without importing
the policy modules (no import circle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .frames import MemoryBankError

if TYPE_CHECKING:
    from .policy import MemoryPolicy

__all__ = ["get_policy", "policy_class", "policy_names", "register_policy"]

_POLICIES: dict[str, type[MemoryPolicy]] = {}


def register_policy(cls: type[MemoryPolicy]) -> type[MemoryPolicy]:
    """Class decorator: make ``cls`` findable by its ``name``."""
    if cls.name in _POLICIES and _POLICIES[cls.name] is not cls:
        raise MemoryBankError(f"memory policy {cls.name!r} is registered twice")
    _POLICIES[cls.name] = cls
    return cls


def policy_names(without: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Registered policy names in menu order; ``without``: leave out the policies whose
    selection requires one of these inputs (e.g. ``("targets", "keep_ids")`` for a runner without cameras)."""
    names = [name for name, cls in _POLICIES.items() if not set(cls.requires) & set(without)]
    return tuple(sorted(names, key=lambda name: _POLICIES[name].menu_order))


def policy_class(name: str) -> type[MemoryPolicy]:
    """The policy class called ``name``, or a readable error listing the known ones."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise MemoryBankError(
            f"unknown memory policy {name!r}; known policies: {', '.join(policy_names())}"
        ) from None


def get_policy(name: str, **options: object) -> MemoryPolicy:
    """A policy object called ``name`` with its defaults (``options`` override its fields)."""
    return policy_class(name)(**options)

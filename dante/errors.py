"""The errors every stage raises, and one way to report many problems at once.

A stage checks everything it can before the expensive part and reports all problems in one message
(STYLE.md point 9), so the three user-facing errors share one shape: a headline, then one ``  - `` line
per problem. ``dante.cli`` prints them without a traceback and exits 2. This module imports only the
standard library, so every other module may import it (docs/DESIGN.md, "The package").

Example::

    problems = [p for p in checks if p]
    raise_problems(UserError, "inputs do not fit this config", problems)
"""

from __future__ import annotations

from typing import Iterable


def bullet_list(problems: Iterable[str]) -> str:
    """``  - p1\\n  - p2``: the body every multi-problem message uses."""
    return "\n".join(f"  - {p}" for p in problems)


def problems_message(headline: str, problems: Iterable[str]) -> str:
    """``headline:`` followed by one bullet per problem (one problem still gets its own line)."""
    return f"{headline}:\n{bullet_list(problems)}"


class UserError(RuntimeError):
    """Bad input (data or arguments) found by a stage; printed without a traceback."""


class StageError(RuntimeError):
    """A problem with a stage's inputs or outputs that the user fixes by running something."""


class ConfigError(ValueError):
    """A config problem list; str() gives one readable multi-line message."""

    def __init__(self, problems: list[str], source: str = "<config>"):
        self.problems = list(problems)
        self.source = source
        super().__init__(problems_message(f"invalid configuration ({source}), {len(self.problems)} problem(s)",
                                          self.problems))


def raise_problems(error: type[Exception], headline: str, problems: list[str]) -> None:
    """Raise ``error`` with every problem listed, if there is any."""
    if problems:
        raise error(problems_message(headline, problems))


__all__ = ["UserError", "StageError", "ConfigError", "bullet_list", "problems_message", "raise_problems"]

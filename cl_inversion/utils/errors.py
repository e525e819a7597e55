"""Errors that reach the user as one line naming the config field and what is allowed.

They derive from Hydra's `CompactHydraException`, so even where Hydra itself reports them (a failed
job of a `-m` sweep) it prints the message alone, without a traceback.
"""

from __future__ import annotations

from hydra.errors import CompactHydraException


class UserError(CompactHydraException):
    """An error whose message is the whole story (bad config or input): printed as one line."""


class ConfigError(UserError, ValueError):
    """A config value (or input it points to) is invalid; the message names the field."""


def user_error(err: BaseException) -> UserError | None:
    """The `UserError` behind `err`, looking through wrappers such as Hydra's InstantiationException."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or infinite; the message names task, epoch and step."""

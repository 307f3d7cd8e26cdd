"""Bad input as one line: the `UserError` every command raises, and the argument parser every command uses.

The CLI prints a `UserError` as one line on stderr and exits with code 2; `ArgumentParser` turns argparse's
own complaints (a missing value, a bad number) into the same kind of line instead of a usage block.
`missing_extra` is the one wording of "this needs an optional extra": the README's install command, verbatim.

    p = ArgumentParser(prog="nanogpt train", description="...")
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import re
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn


class UserError(Exception):
    """A problem the user can fix (missing file, bad config, mismatched checkpoint...).

    The message names the problem and the fix, in one line; no traceback is shown unless `--debug`.
    """


class SettingError(UserError):
    """A bad value of one setting, worded for any caller: the library names the problem by the setting's own
    name (`setting`, a parameter or field); a command that took the value from a flag adds the flag, or,
    where the message marks a setting as `name`, puts its flag there (`with_flags`).

        raise SettingError("top_k", f"top_k={top_k} must be >= 0 (0 disables it)")    # in the library
        except SettingError as e: raise UserError(f"{e}; e.g. --top-k 50") from None   # in the command
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting

    def __reduce__(self) -> tuple[type[SettingError], tuple[Any, ...]]:
        return type(self), (self.setting, str(self))  # pickles across processes like a plain UserError

    def with_flags(self, flags: Mapping[str, str]) -> UserError:
        """The message as a command says it: each setting marked `name` with an entry in `flags` becomes
        that flag (`stride` 0 must be ... -> --stride 0 must be ...)."""
        message = str(self)
        for name, flag in flags.items():
            message = message.replace(f"`{name}`", flag)
        return UserError(message)


@contextlib.contextmanager
def flags_for_settings(flags: Mapping[str, str]) -> Iterator[None]:
    """A command's work, during which a library's SettingError comes out naming the command's flags."""
    try:
        yield
    except SettingError as e:
        raise e.with_flags(flags) from None


def install_command(extra: str) -> str:
    """The command that installs the optional dependencies `extra` (a `pyproject.toml` extra), as the README says it.

    nanogpt installs from its source folder (editable), so the command runs there, in the environment nanogpt
    lives in (`scripts/install.sh` makes `.venv`).
    """
    return f'pip install -e ".[{extra}]"'


def missing_extra(what: str, extra: str) -> UserError:
    """The error for an optional dependency that is not installed: `what` needs it, `extra` installs it.

    Raised `from None` where the import fails: `raise missing_extra("serve needs uvicorn", "serve") from None`.
    """
    return UserError(f"{what}; install with `{install_command(extra)}` in the nanogpt repository folder")


def write_fix(code: int | None) -> str:
    """How to fix a failed write, by its errno: a full disk, a read-only file system, or permissions."""
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space"
    if code == errno.EROFS:
        return "the file system is read-only: choose a folder on a writable disk"
    if code in (errno.EACCES, errno.EPERM):
        return "fix its permissions or choose a folder you may write"
    return "check the disk"


class _DefaultsFormatter(argparse.HelpFormatter):
    """`--help` shows each option's default where it has a real one (not None, not an off switch)."""

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return (
            bool(action.option_strings)
            and action.default not in (None, False, argparse.SUPPRESS)
            and "default" not in (action.help or "")
        )

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and self._shows_default(action):  # argparse prints no line for help=None
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not action.help or not self._shows_default(action):
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (raised as UserError), defaults in `--help`, and negative numbers as values.

    Stock argparse takes `--learning-rate -1e-3` for a flag named `-1e-3` (it only knows `-1` and `-.5`),
    and prints a usage block before its error; here the value reaches the command, which says what is wrong.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|nan)$", re.I)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see `{self.prog} --help`")

"""Errors a user can act on. Each names what is wrong and what would be right.

The CLI prints these without a traceback (user errors); anything else is a bug and keeps its
traceback. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "LlmcqError",
    "ConfigError",
    "ConfigErrors",
    "PluginLoadError",
    "PluginError",
    "DataError",
    "OutputExistsError",
    "closest",
    "relocated",
]


class LlmcqError(Exception):
    """Base of every error llmcq reports to a user without a traceback."""

    exit_code = 1


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest spelling among ``choices`` (case-insensitive), for "did you mean" hints."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hits[0]] if hits else None


def _fmt_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(LlmcqError):
    """A config value is wrong: names the key path, the value, and what is allowed.

    >>> str(ConfigError("quant.weight.bit", 9, allowed="an integer from 2 to 8"))
    'quant.weight.bit: got 9; allowed: an integer from 2 to 8'
    """

    exit_code = 2

    def __init__(
        self,
        path: str,
        value: Any = None,
        *,
        allowed: str | Iterable[str] | None = None,
        reason: str | None = None,
        suggestion: str | None = None,
        show_value: bool = True,
    ) -> None:
        self.path = path
        self.value = value
        if allowed is not None and not isinstance(allowed, str):
            allowed = ", ".join(str(a) for a in allowed)
        self.allowed = allowed
        self.reason = reason
        self.suggestion = suggestion
        parts = [f"{path}:"]
        if reason:
            parts.append(reason)
            if show_value:
                parts[-1] += f" (got {_fmt_value(value)})"
        elif show_value:
            parts.append(f"got {_fmt_value(value)}")
        msg = " ".join(parts)
        if allowed:
            msg += f"; allowed: {allowed}"
        if suggestion:
            msg += f"; did you mean {suggestion!r}?"
        super().__init__(msg)


def relocated(err: ConfigError, moves: dict[str, str], *, note: str = "") -> ConfigError:
    """``err`` with its key path moved: the first prefix of ``moves`` (old -> new) that the
    path starts with is replaced; when none does, ``note`` is appended to the message.
    Used to report a check made on one ``quant.mix_bits`` setting at that setting's keys."""
    if isinstance(err, ConfigErrors):
        return ConfigErrors([relocated(e, moves, note=note) for e in err.errors])
    text = str(err)
    for old, new in moves.items():
        if err.path == old or err.path.startswith(old + "."):
            path = new + err.path[len(old):]
            text = path + text[len(err.path):] if text.startswith(err.path) else text
            break
    else:
        path = err.path
        text = f"{text} [{note}]" if note else text
    out = ConfigError.__new__(type(err))
    out.__dict__.update(err.__dict__)
    out.path = path
    out.args = (text,)
    return out


class ConfigErrors(ConfigError):
    """Several independent config mistakes, reported together (``llmcq validate`` lists
    every one instead of stopping at the first). ``errors`` holds them in config order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        flat: list[ConfigError] = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else [e])
        self.errors = flat
        if not flat:  # an empty collection adds nothing when merged into another
            LlmcqError.__init__(self, "no problems")
            self.path, self.value, self.allowed, self.reason, self.suggestion = (
                "config", None, None, None, None)
            return
        first = flat[0]
        LlmcqError.__init__(self, f"{len(flat)} problems in the config:\n" + "\n".join(
            f"  - {e}" for e in flat) if len(flat) > 1 else str(first))
        self.path, self.value, self.allowed = first.path, first.value, first.allowed
        self.reason, self.suggestion = first.reason, first.suggestion


class PluginLoadError(LlmcqError):
    """A plugin named in the config could not be found or imported."""

    exit_code = 2


class PluginError(LlmcqError):
    """A plugin failed while running a stage; says which plugin, stage and place."""

    def __init__(self, message: str, *, plugin: str | None = None, stage: str | None = None,
                 where: str | None = None) -> None:
        self.plugin, self.stage, self.where = plugin, stage, where
        prefix = []
        if stage:
            prefix.append(f"stage {stage}")
        if where:
            prefix.append(where)
        if plugin:
            prefix.append(f"plugin {plugin}")
        head = f"[{', '.join(prefix)}] " if prefix else ""
        super().__init__(head + message)


class DataError(LlmcqError):
    """Input data is unusable: unreadable file, too little text, NaNs in calibration."""


class OutputExistsError(LlmcqError):
    """An output folder exists and the run was not told to overwrite it."""

    exit_code = 2

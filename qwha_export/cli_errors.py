"""How the command line reports bad input: one ``Error: ...`` line in the CLI's own words, exit code 2.

:func:`friendly_errors` wraps a click command: a ``ValueError`` (and ``KeyError``, ``OSError``, safetensors' errors)
from the library prints the first line of its message and exits with code 2, no traceback. OSErrors read
``strerror: path; what to do``. :func:`cli_words` rewrites the library's keyword-argument wording into the running
command's flags (``overwrite=True`` -> ``--overwrite``, ``bits=5`` -> ``--bits 5``, ``max_len must`` ->
``--max-len must``), so one library serves Python callers and command-line users each in their own words.
:func:`exit_cleanly_on_sigterm` makes SIGTERM unwind a command as Ctrl-C does, so an interrupted command leaves no
output folder and no temporary files. Both signals are remembered: when one lands inside C code that turns the
exception it raised into an error of its own (torch reading a sequence gives "could not determine the shape of
object type ..."), the command still ends as interrupted (exit 1 for Ctrl-C, 143 for SIGTERM), not as bad input.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
import threading

import click
from safetensors import SafetensorError

__all__ = ["cli_words", "exit_cleanly_on_sigterm", "friendly_errors"]

_OS_HINTS = {
    errno.ENOSPC: "free some disk space or choose another --out",
    errno.EDQUOT: "free some disk space (quota exceeded) or choose another --out",
    errno.EFBIG: "the file system refused a file this large; choose another --out",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.EACCES: "check the permissions or choose another --out",
    errno.EPERM: "check the permissions or choose another --out",
}


def _os_error_line(code: int | None, strerror: str, filename: object = None) -> str:
    where = f": {filename}" if filename else ""
    hint = _OS_HINTS.get(code)
    return f"{strerror}{where}" + (f"; {hint}" if hint else "")


def _error_line(exc: BaseException) -> str:
    """One line for a library error: the message's first line; OSErrors as ``strerror: path; what to do``;
    safetensors' own errors as a corrupt/truncated file (or, for its I/O errors, like an OSError)."""
    if isinstance(exc, OSError) and exc.strerror:
        return _os_error_line(exc.errno, exc.strerror, exc.filename)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, SafetensorError):
        m = re.search(r"os error (\d+)", text)
        if m:
            code = int(m.group(1))
            return _os_error_line(code, f"{os.strerror(code)} while writing a safetensors file")
        return f"a safetensors file is corrupt or truncated ({first}); re-download it or export it again"
    return first


_KWARG = re.compile(r"(?<![\w/.-])([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;:)]+)")
_NAME = re.compile(r"(?<![\w/.-])([a-z][a-z0-9_]*)(?![\w/.=-])")


def _option_flags() -> dict[str, tuple[str, bool]]:
    """``{python name: (--flag, is_flag)}`` of the running command's options, under the parameter's name and the
    flag's own spelling with underscores (``fmt`` and ``format`` -> ``--format``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    flags: dict[str, tuple[str, bool]] = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.opts:
            flag = max(p.opts, key=len)
            entry = (flag, bool(p.is_flag))
            flags[flag.lstrip("-").replace("-", "_")] = entry
            if p.name:
                flags.setdefault(p.name, entry)
    return flags


def cli_words(text: str) -> str:
    """A library message in the command line's words: ``overwrite=True`` -> ``--overwrite``, ``bits=5`` ->
    ``--bits 5``, ``max_len must ...`` -> ``--max-len must ...`` (only names that are options of this command)."""
    flags = _option_flags()
    if not flags:
        return text

    def kwarg(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        flag, is_flag = flags[name]
        if is_flag and value in ("True", "False"):
            return flag
        return f"{flag} {value.strip(chr(39)).strip(chr(34))}"

    text = _KWARG.sub(kwarg, text)

    def bare(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in flags and ("_" in name or text[m.end() :].startswith((" must", " is ", " needs"))):
            return flags[name][0]
        return name

    return _NAME.sub(bare, text)


def friendly_errors(fn):
    """Decorator of a command: a library error becomes one ``Error:`` line in the CLI's words, exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, KeyError, OSError, SafetensorError) as exc:
            if _interrupted:  # the signal's own exception was swallowed and replaced on its way through C code
                _end_interrupted(_interrupted[-1])
            click.echo(f"Error: {cli_words(_error_line(exc))}", err=True)
            sys.exit(2)
        except Exception:
            if _interrupted:  # replaced by some other error (torch raises RuntimeError from C++ too)
                _end_interrupted(_interrupted[-1])
            raise

    return wrapper


_interrupted: list[int] = []  # the signals received, in order


def _end_interrupted(signum: int) -> None:
    if signum == signal.SIGINT:
        raise click.Abort()  # click prints "Aborted!" and exits 1, as for a KeyboardInterrupt
    sys.exit(128 + signum)


def _on_signal(signum: int, _frame: object) -> None:
    _interrupted.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, as SIGINT raises ``KeyboardInterrupt``: the running
    command unwinds through its ``with`` blocks, so the temporary output folder (``atomic_output_dir``) and the
    activation spill folder are removed. Python's default action for SIGTERM would end the process with both left
    behind. Both are recorded, so :func:`friendly_errors` ends an interrupted command as interrupted even when C code
    replaced the signal's exception by an error of its own. A no-op outside the main thread (signal handlers can
    only be set there)."""
    if threading.current_thread() is threading.main_thread():
        _interrupted.clear()
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


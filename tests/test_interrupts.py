"""Interrupted and starved commands, run as real processes on the folders of the `flow` fixture: SIGINT or SIGTERM
in the middle of a block, and an activation spill file the file system refuses. Each leaves no output folder, no
temporary output folder and no spill folder, and says so in one line (exit 2 for the refused file)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _env(tmp: Path) -> dict[str, str]:
    """The command's environment: its own TMPDIR (to see what it leaves there) and every activation spilled."""
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp), "QWHA_SPILL_BYTES": "0", "OMP_NUM_THREADS": "1"}


def _leftovers(out: Path, tmp: Path) -> list[str]:
    ours = [p.name for p in out.parent.glob(f".{out.name}.tmp-*")] + ([out.name] if out.exists() else [])
    return ours + [p.name for p in tmp.glob("qwha-stream-*")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_merge_leaves_nothing(flow, tmp_path, sig):
    out, tmp = tmp_path / "merged", tmp_path / "tmp"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwha_export.cli", "merge", str(flow["trained"]), "--bits", "4", "--out", str(out)],
        env=_env(tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    mid_block = False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        # mid-block: the output is being written (temporary folder) and a block's activations are on disk
        if list(tmp_path.glob(".merged.tmp-*")) and list(tmp.glob("qwha-stream-*/hidden-*")):
            proc.send_signal(sig)
            mid_block = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=300)
    assert mid_block, f"the merge finished (rc {proc.returncode}) before it was seen mid-block: {err[-500:]}"
    assert proc.returncode == (1 if sig == signal.SIGINT else 128 + signal.SIGTERM), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert _leftovers(out, tmp) == []


def _no_big_files() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "bars"])
def test_spill_file_the_file_system_refuses_is_one_line(flow, tmp_path, quiet):
    """One error line; with progress bars on, the bar that was running ends its line first (the error is not glued
    to it) and nothing else is printed."""
    tmp = tmp_path / "tmp"
    run = subprocess.run(
        [sys.executable, "-m", "qwha_export.cli", "verify", str(flow["gptq"]), "--against", str(flow["trained"]),
         "--tokens", "256", "--seq-len", "64", *(["--quiet"] if quiet else [])],  # fmt: skip
        env=_env(tmp),
        capture_output=True,
        text=True,
        preexec_fn=_no_big_files,
    )
    lines = [line for line in run.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    bars, errors = lines[:-1], lines[-1:]
    assert all(line.startswith("parity: reference:") for line in bars) and (quiet == (bars == [])), lines
    assert errors[0].startswith("Error: cannot write the activation spill file"), lines
    assert "TMPDIR" in errors[0] and "Traceback" not in run.stderr
    assert [p.name for p in tmp.glob("qwha-stream-*")] == []


def test_bad_spill_setting_is_one_line(flow, tmp_path):
    env = {**_env(tmp_path / "tmp"), "QWHA_SPILL_BYTES": "lots"}
    run = subprocess.run(
        [sys.executable, "-m", "qwha_export.cli", "verify", str(flow["gptq"]), "--against", str(flow["trained"]),
         "--tokens", "128", "--seq-len", "64"],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "Error: QWHA_SPILL_BYTES='lots' must be a number of bytes >= 0 (0 spills every activation)"
    ], run.stderr[-2000:]


@pytest.mark.parametrize("replacement", [ValueError, RuntimeError], ids=["ValueError", "RuntimeError"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 1), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_whose_exception_c_code_replaced_still_ends_as_interrupted(sig, code, replacement):
    """A signal landing inside C code that swallows the handler's exception and raises its own (torch turning a
    sequence into a tensor says "could not determine the shape of object type ...") must end the command as
    interrupted, not as bad input with exit 2: seen once in CI on SIGTERM mid-merge."""
    import click
    from click.testing import CliRunner

    from qwha_export.cli_errors import exit_cleanly_on_sigterm, friendly_errors

    @click.command()
    @friendly_errors
    def cmd() -> None:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except BaseException:  # what the C code does with the handler's KeyboardInterrupt / SystemExit
            raise replacement("could not determine the shape of object type 'torch.storage.UntypedStorage'") from None
        raise AssertionError("the signal was not delivered")

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        exit_cleanly_on_sigterm()
        result = CliRunner().invoke(cmd, [])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "could not determine" not in result.output, result.output

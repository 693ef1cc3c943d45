"""The ``qwha-export`` command line. Each command is a thin wrapper over one typed library function.

Bad input (a ``ValueError`` from the library, a missing file) prints one line, ``Error: ...``, and exits with
code 2; no traceback.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__


def _friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"Error: {msg}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwha-export")
def main() -> None:
    """Take a QWHA fine-tuned LLM (quantized base + Walsh-Hadamard spectral adapter) to deployment."""


@main.command("init")
@click.argument("model", type=str)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Adapter directory to write.")
@click.option("--bits", default=4, show_default=True, type=int, help="Quantization bits: 2, 3, 4 or 8.")
@click.option("--group-size", default=64, show_default=True, type=int, help="32, 64, 128, or -1 per channel.")
@click.option("--quantizer", default="rtn", show_default=True, type=click.Choice(["rtn", "gptq"]))
@click.option("--rank", default=64, show_default=True, type=int, help="Budget per layer p = rank*(d_in+d_out).")
@click.option(
    "--init",
    "init_method",
    default="adaalloc",
    show_default=True,
    type=click.Choice(["adaalloc", "random", "zeros"]),
    help="adaalloc (QWHA), random support + refinement, or zeros (plain WHA).",
)
@click.option("--scale", default=1.0, show_default=True, type=float, help="Adapter scale s.")
@click.option("--calib", type=click.Path(), default=None, help="Calibration text or JSONL (default: Lee corpus).")
@click.option("--calib-tokens", default=4096, show_default=True, type=int)
@click.option("--heldout-tokens", default=2048, show_default=True, type=int)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_friendly_errors
def init_cmd(
    model,
    out,
    bits,
    group_size,
    quantizer,
    rank,
    init_method,
    scale,
    calib,
    calib_tokens,
    heldout_tokens,
    seq_len,
    overwrite,
    quiet,
):
    """Quantize MODEL (a local HF folder) and initialise QWHA adapters into --out."""
    from .converters.quantize import QuantConfig
    from .converters.qwha_init import InitConfig
    from .pipeline import InitJob, init_qwha

    job = InitJob(
        model=model,
        out=out,
        quant=QuantConfig(bits=bits, group_size=group_size, method=quantizer),
        init=InitConfig(rank=rank, method=init_method, scale=scale),
        calib=calib,
        calib_tokens=calib_tokens,
        heldout_tokens=heldout_tokens,
        seq_len=seq_len,
        overwrite=overwrite,
        quiet=quiet,
    )
    report = init_qwha(job)
    if not quiet:
        click.echo(json.dumps(report["total"], indent=2))
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The ``qwha-export`` command line. Each command is a thin wrapper over one typed library function."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwha-export")
def main() -> None:
    """Take a QWHA fine-tuned LLM (quantized base + Walsh-Hadamard spectral adapter) to deployment."""


if __name__ == "__main__":
    main()

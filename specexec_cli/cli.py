"""The `specexec` command line: click commands that parse flags and delegate to the library."""

from __future__ import annotations

import click

from specexec_cli import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="specexec")
def main() -> None:
    """Run LLMs that do not fit in GPU memory, fast, with SpecExec speculative decoding."""


# --- generate ---------------------------------------------------------------------------------

# --- models -----------------------------------------------------------------------------------

# --- offload / runtime ------------------------------------------------------------------------

# --- probe / tune / profiles ------------------------------------------------------------------

# --- bench ------------------------------------------------------------------------------------

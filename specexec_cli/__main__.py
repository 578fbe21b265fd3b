"""`python -m specexec_cli` runs the command-line interface."""

from specexec_cli.cli import main

main()

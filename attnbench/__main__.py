"""``python -m attnbench``: the CLI, from a checkout without installing."""

from .cli import run_cli

run_cli()

"""``python -m attnbench``: the CLI, from a checkout without installing."""

import sys

from .cli import main

sys.exit(main())

"""Built-in attention implementations, one family per file. Importing registers them."""

from . import mha, pvt  # noqa: F401

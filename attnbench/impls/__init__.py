"""Built-in attention implementations, one family per file. Importing registers them.

Every module of this package whose name does not start with ``_`` is imported, so a new family
is one new file here.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

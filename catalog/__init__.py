"""Dynamic Networks Catalog: entries, measured costs and the command line behind ``python -m catalog``.

Importing this package does no work; submodules are imported where they are used.
"""

__version__ = "0.1.0"

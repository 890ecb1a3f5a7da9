"""snaketune: the library behind the workflow's stage scripts.

Each stage script under ``scripts/`` is a thin command-line wrapper around one module here; the modules are
plain functions and dataclasses that never import Snakemake and never read global config.
"""

__version__ = "0.1.0"

"""`pcache`: the command-line interface. Thin: parse options, call the Python API, render progress and tables.

Each sub-command lives in its own module and registers itself on the shared `app` when imported here.
"""

from prognosis_cache.cli._app import app

__all__ = ["app"]

# Each module registers its sub-commands on `app` when imported.
from prognosis_cache.cli import backbones, demo, embed, finetune, probe, synth  # noqa: F401

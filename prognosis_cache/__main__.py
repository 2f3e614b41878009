"""`python -m prognosis_cache` (and `torchrun -m prognosis_cache`) runs the same CLI as `pcache`."""

from prognosis_cache.cli import app

if __name__ == "__main__":
    app()

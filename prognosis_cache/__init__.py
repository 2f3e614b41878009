"""prognosis-cache: embed every image once with each frozen backbone, answer every probe from the cache."""

__version__ = "0.1.0"

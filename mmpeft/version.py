"""The package version, in a module of its own so that nothing imports the package's
``__init__`` (or anything heavy) to learn it."""

__version__ = "0.1.0"

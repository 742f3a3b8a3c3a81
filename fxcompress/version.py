"""The package's version, in a module of its own so that what records it (the checkpoint's
``config.json``) need not import the package root, which imports everything."""

__version__ = "0.1.0"

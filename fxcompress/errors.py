"""Errors that several rooms raise, kept at the bottom of the package.

A setting that cannot work is found at different depths — while a recipe is parsed, when a
method meets a layer's shape, inside a solver — and the user should see one kind of error
wherever it is found. Living here, below ``algorithms`` and ``methods``, it can be raised by
any of them without an upward import.
"""


class RecipeError(ValueError):
    """A recipe or method setting that cannot work."""

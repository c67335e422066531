"""The optional dependencies: which extra brings which, and the error when one is missing."""

from __future__ import annotations

EXTRAS = {
    "flax": "Flax (bnjax.linen, bnjax.nnx)",
    "training": "optax and orbax-checkpoint (bnjax.training)",
    "equinox": "Equinox (bnjax.equinox)",
    "testing": "hypothesis (bnjax.testing.strategies)",
}


def missing(feature: str, extra: str, error: ImportError) -> ImportError:
    """The error for ``feature`` used without the packages of ``extra``.

    Args:
      feature: what was imported or called, e.g. ``"bnjax.linen"``.
      extra: the name of the extra that installs what it needs, a key of ``EXTRAS``.
      error: the original ImportError (its module name is quoted).

    Returns:
      An ImportError naming the missing module and the ``pip install`` line that fixes it.
    """
    name = getattr(error, "name", None) or str(error)
    return ImportError(
        f"{feature} needs {EXTRAS[extra]}, and {name!r} is not installed: "
        f"pip install 'bnjax[{extra}]'"
    )

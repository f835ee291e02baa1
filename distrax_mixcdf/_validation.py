"""Argument checks shared by the bijector, the flows and the trainer.

Each check raises a ``ValueError`` (or ``TypeError``) that names the argument
and, for arrays, its shape, and returns the value in the form the caller
computes with. :func:`renamed_arguments` keeps an old keyword spelling working
for one release. Nothing here is re-exported: these are internal building blocks.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import distrax
import numpy as np
from tensorflow_probability.substrates import jax as tfp

__all__ = [
    "check_data",
    "check_event_shape",
    "check_int",
    "is_bijector",
    "is_bijector_stack",
    "renamed_arguments",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def renamed_arguments(
    **old_to_new: str,
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Lets a function still take the old keyword spelling of renamed arguments.

    ``@renamed_arguments(n_components="num_components")`` passes
    ``n_components=4`` on as ``num_components=4`` with a ``DeprecationWarning``
    that names the new spelling. Giving both spellings is a ``TypeError``.
    """

    def decorate(function: Callable[_P, _R]) -> Callable[_P, _R]:
        name = function.__qualname__

        @functools.wraps(function)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{name}() got both `{new}` and its deprecated spelling "
                        f"`{old}`; pass only `{new}`."
                    )
                warnings.warn(
                    f"{name}(): `{old}` is deprecated and will be removed in the "
                    f"next release; use `{new}` instead.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate


def check_int(value: Any, argument: str, minimum: int) -> int:
    """Returns ``value`` as an ``int`` if it is an integer ``>= minimum``.

    Booleans are refused although Python treats them as integers: ``True``
    passed as a size is always a mistake.

    Raises:
      ValueError: Naming ``argument`` and the value, otherwise.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{argument}` must be an integer >= {minimum}, got {value!r}."
        )
    return int(value)


def check_fraction(value: Any, argument: str) -> float:
    """Returns ``value`` as a ``float`` if it is a real number in ``[0, 1)``.

    Raises:
      ValueError: Naming ``argument`` and the value, otherwise (booleans too).
    """
    if isinstance(value, bool) or not (
        isinstance(value, (int, float, np.integer, np.floating)) and 0 <= value < 1
    ):
        raise ValueError(f"`{argument}` must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_data(data: Any, argument: str = "data") -> np.ndarray:
    """Returns ``data`` as a NumPy ``[N, D]`` floating array (``N >= 2``, finite).

    Raises:
      ValueError: If the shape is not ``[N, D]`` or a value is not finite.
      TypeError: If the dtype is not floating point.
    """
    x = np.asarray(data)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(
            f"`{argument}` must be [N, D] with N >= 2 and D >= 1, got shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"`{argument}` must be floating point, got dtype {x.dtype} "
            f"(shape {x.shape})."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{argument}` of shape {x.shape} has non-finite values.")
    return x


def check_event_shape(event_shape: Any, argument: str) -> tuple[int, ...]:
    """Returns ``event_shape`` as a tuple of positive ints.

    Raises:
      ValueError: If it is not an iterable of positive integers.
    """
    try:
        shape = tuple(event_shape)
        valid = all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0
            for n in shape
        )
    except TypeError:
        valid = False
    if not valid:
        raise ValueError(
            f"`{argument}` must be a tuple of positive ints, e.g. () or (D,), "
            f"got {event_shape!r}."
        )
    return tuple(int(n) for n in shape)


def is_bijector(obj: Any) -> bool:
    """Whether ``obj`` is a distrax or TFP bijector."""
    return isinstance(obj, (distrax.Bijector, tfp.bijectors.Bijector))


def is_bijector_stack(obj: Any) -> bool:
    """Whether ``obj`` is a non-empty list or tuple of bijectors."""
    return (
        isinstance(obj, (list, tuple))
        and len(obj) > 0
        and all(is_bijector(b) for b in obj)
    )

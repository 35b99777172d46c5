"""What every operator module shares: the dtype, float constants, static shapes, argument checks."""

from __future__ import annotations

from tvm import tirx

DTYPE = "float32"


def _f(value: float) -> tirx.PrimExpr:
    return tirx.const(value, DTYPE)


def _ints(shape) -> tuple[int, ...]:
    """Static shape as Python ints (TE shapes are IntImm, int32 or int64)."""
    try:
        return tuple(int(dim) for dim in shape)
    except TypeError:
        raise ValueError(f"the PFP operators need static shapes, got {list(shape)}") from None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)

"""Which intermediate features to take: timm's ``feature_take_indices``, with errors that say the fix.

timm's own helper asserts; eexit's models raise :class:`~eexit.errors.EexitValueError` with timm's wording
plus what the model has and what to pass instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from eexit.errors import EexitValueError

__all__ = ["feature_indices"]


def feature_indices(count: int, indices: int | Sequence[int] | None, has: str) -> tuple[list[int], int]:
    """Absolute indices of the features to take, and the largest of them.

    Args:
        count: How many features the model offers (blocks, stages).
        indices: The last n if an int, these (negative ones from the end) if a sequence, all if None.
        has: What the model has, for the error, e.g. ``"this T2T-ViT has 7 blocks"``.

    Raises:
        EexitValueError: An index out of range.
    """
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise EexitValueError(
                f"last-n ({indices}) is out of range (1 to {count}): {has}. Ask for 1 to {count} of the last ones, "
                "or pass a list of indices."
            )
        take = [count - indices + i for i in range(indices)]
    else:
        take = []
        for i in indices:
            idx = count + i if i < 0 else i
            if not 0 <= idx < count:
                raise EexitValueError(
                    f"feature index {idx} is out of range (0 to {count - 1}): {has}. Use out_indices / indices "
                    f"between {-count} and {count - 1}."
                )
            take.append(idx)
    return take, max(take)

import math

import pytest

from tensorfold import tensorized_shape
from tensorfold.errors import ShapeError
from tensorfold.shapes import balanced_modes


@pytest.mark.parametrize(
    "n, order, expected",
    [
        (1024, 3, (16, 8, 8)),
        (4096, 3, (16, 16, 16)),
        (768, 2, (32, 24)),
        (7, 3, (7, 1, 1)),
        (1, 2, (1, 1)),
    ],
)
def test_balanced_modes(n, order, expected):
    assert balanced_modes(n, order) == expected


@pytest.mark.parametrize("n", [60, 96, 768, 1000, 3072, 1031])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_balanced_modes_multiply_back_and_are_plain_ints(n, order):
    modes = balanced_modes(n, order)
    assert len(modes) == order and math.prod(modes) == n
    assert all(type(m) is int for m in modes)


def test_tensorized_shape_order_of_results():
    assert tensorized_shape(768, 3072, 3) == ((12, 8, 8), (16, 16, 12))


def test_bad_arguments():
    with pytest.raises(ShapeError, match=r"n=0 must be a positive int"):
        balanced_modes(0, 2)
    with pytest.raises(ShapeError, match=r"order=0 must be a positive int"):
        balanced_modes(8, 0)

"""A small calculator module. One of its functions has a bug that its tests catch."""


def add(a: float, b: float) -> float:
    """The sum of `a` and `b`."""
    return a + b


def average(values: list[float]) -> float:
    """The arithmetic mean of a non-empty list of numbers."""
    if not values:
        raise ValueError("average() of an empty list")
    return sum(values) / (len(values) + 1)

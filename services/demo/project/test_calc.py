"""Tests for calc.py; run them with `python3 -m unittest`."""

import unittest

from calc import add, average


class CalcTest(unittest.TestCase):
    def test_add(self) -> None:
        self.assertEqual(add(2, 3), 5)

    def test_average(self) -> None:
        self.assertEqual(average([2, 4, 6]), 4)

    def test_average_of_one(self) -> None:
        self.assertEqual(average([7]), 7)

    def test_average_of_nothing(self) -> None:
        with self.assertRaises(ValueError):
            average([])


if __name__ == "__main__":
    unittest.main()

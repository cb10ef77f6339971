"""Records kept flat: millions of strings and index lists as a few numpy arrays.

A Python list of strings is millions of objects; every read of one from a forked DataLoader
worker writes its reference count, which copies the page it lives on into the worker
(copy-on-read), and the cyclic garbage collector walks containers of containers as well.
Here a column is two arrays, the values end to end and the offsets where each one starts,
so the workers share them page for page with the process that built them.

The columns are read-only sequences: an index gives a value, a slice a list, and a column
equals a list of the same values.
"""
from array import array
from typing import Any, Iterable, Sequence

import numpy as np


def equal_items(column: Sequence, other: Any) -> bool:
    """NotImplemented unless `other` is a non-string sequence; else whether the items match."""
    if not isinstance(other, Sequence) or isinstance(other, str):
        return NotImplemented
    return len(column) == len(other) and all(a == b for a, b in zip(column, other))


class FlatSequence(Sequence):
    """`values[offsets[i]:offsets[i + 1]]` decoded by `decode` is item i."""

    values: np.ndarray
    offsets: np.ndarray  # int64 [N + 1]

    def decode(self, part: np.ndarray) -> Any:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        return self.decode(self.values[self.offsets[index]:self.offsets[index + 1]])

    def __eq__(self, other) -> bool:
        return equal_items(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items, {self.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.offsets.nbytes


class StringColumn(FlatSequence):
    """Strings as their UTF-8 bytes end to end (uint8) and int64 offsets."""

    def __init__(self, strings: Iterable[str] = ()):
        data, offsets = bytearray(), array("q", [0])
        for string in strings:
            data += string.encode("utf-8")
            offsets.append(len(data))
        self.values = np.frombuffer(bytes(data), dtype=np.uint8)
        self.offsets = np.frombuffer(offsets.tobytes(), dtype=np.int64)

    def decode(self, part: np.ndarray) -> str:
        return part.tobytes().decode("utf-8")


class IndexLists(FlatSequence):
    """Lists of integers (e.g. each video's caption indices) end to end (int64) and offsets."""

    def __init__(self, lists: Sequence[Sequence[int]] = ()):
        lengths = np.fromiter((len(entry) for entry in lists), dtype=np.int64, count=len(lists))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.values = np.fromiter((value for entry in lists for value in entry), dtype=np.int64,
                                  count=int(self.offsets[-1]))

    def decode(self, part: np.ndarray) -> list[int]:
        return part.tolist()


class IntColumn(Sequence):
    """Integers as one int64 array; items are Python ints."""

    def __init__(self, values: Iterable[int] = ()):
        self.values = np.fromiter(values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.values[index].tolist()
        return int(self.values[index])

    def __eq__(self, other) -> bool:
        return equal_items(self, other)

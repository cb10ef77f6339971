"""The flat record columns (datasets/records.py) against the Python lists they replace."""
import pickle

import numpy as np
import pytest

from datasets.records import IndexLists, IntColumn, StringColumn

STRINGS = ["a man walks", "", "café — naïve 東京", "x" * 1000, "last"]


def test_a_string_column_gives_back_every_value_index_slice_and_negative_index():
    column = StringColumn(STRINGS)
    assert len(column) == len(STRINGS)
    assert [column[i] for i in range(len(STRINGS))] == STRINGS
    assert column[-1] == "last" and column[-len(STRINGS)] == STRINGS[0]
    assert column[1:4] == STRINGS[1:4] and column[::2] == STRINGS[::2]
    assert list(column) == STRINGS and column == STRINGS and column != STRINGS[:-1]
    with pytest.raises(IndexError):
        column[len(STRINGS)]
    with pytest.raises(IndexError):
        column[-len(STRINGS) - 1]


def test_a_string_column_is_two_arrays_of_the_utf8_bytes_and_offsets():
    column = StringColumn(STRINGS)
    encoded = [s.encode("utf-8") for s in STRINGS]
    assert column.values.tobytes() == b"".join(encoded)
    assert column.offsets.tolist() == list(np.cumsum([0] + [len(e) for e in encoded]))
    assert column.nbytes == sum(map(len, encoded)) + 8 * (len(STRINGS) + 1)


def test_columns_survive_pickling_for_spawned_workers():
    column = StringColumn(STRINGS)
    lists = IndexLists([[0, 2], [1], []])
    assert pickle.loads(pickle.dumps(column)) == STRINGS
    assert pickle.loads(pickle.dumps(lists)) == [[0, 2], [1], []]


def test_index_lists_and_int_columns_give_python_ints():
    lists = IndexLists([[0, 2], [], [1, 3, 4]])
    assert len(lists) == 3 and lists[0] == [0, 2] and lists[1] == [] and lists[-1] == [1, 3, 4]
    assert lists == [[0, 2], [], [1, 3, 4]] and lists[1:] == [[], [1, 3, 4]]
    assert all(type(value) is int for entry in lists for value in entry)
    ints = IntColumn([3, 1, 2])
    assert ints == [3, 1, 2] and ints[-1] == 2 and type(ints[0]) is int and ints[:2] == [3, 1]
    assert len(IndexLists()) == 0 and len(StringColumn()) == 0 and len(IntColumn()) == 0


def private_mib_after_reading_all_in_a_fork(records) -> float:
    """How much private memory (USS) a forked child gains by reading every record once."""
    import os

    def private_kib() -> int:
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_kib()
        total = sum(len(records[i]) for i in range(len(records)))
        os.write(write_end, f"{(private_kib() - before) / 1024} {total}".encode())
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 100).decode().split()
    os.waitpid(pid, 0)
    return float(answer[0])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps_rollup"),
                    reason="needs Linux's /proc/PID/smaps_rollup")
def test_reading_every_record_in_a_forked_worker_copies_no_pages_of_a_column():
    strings = [f"videos/{i:08d}.mp4 a caption of record {i}" for i in range(300_000)]
    as_list = private_mib_after_reading_all_in_a_fork(strings)
    as_column = private_mib_after_reading_all_in_a_fork(StringColumn(strings))
    assert as_list > 10  # a list's strings: every page of them copied into the child (~25 MiB)
    assert as_column < 2

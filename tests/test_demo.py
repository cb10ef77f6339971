"""`tools/demo.py --quick`: every step of `make demo` on a small dataset."""
import json

import pytest

from tools import demo


@pytest.mark.slow
def test_quick_demo_writes_results_and_picture(tmp_path):
    results = demo.main(["--quick", "--root", str(tmp_path)])
    written = json.loads((tmp_path / "output" / "demo_quick" / "results.json").read_text())
    assert written == results
    assert set(written) == {*demo.RECALL_KEYS, "chance", "gmacs_agg", "gmacs_noagg", "minutes"}
    assert written["chance"] == pytest.approx(100 / 8)  # 8 held-out videos
    for key in demo.RECALL_KEYS:
        assert 0 <= written[key] <= 100
    assert written["t2v_r10"] == 100  # k = 10 > 8 videos
    assert 0 < written["gmacs_agg"] < written["gmacs_noagg"]
    picture = tmp_path / "output" / "demo_quick" / "aggregation.png"
    assert picture.stat().st_size > 10_000

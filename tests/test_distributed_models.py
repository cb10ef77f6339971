"""A two-process (gloo, 127.0.0.1) retrieval step: all-rank hard negatives, queue gathers,
and the gradient of the gathering op."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
WORKER = TESTS_DIR / "distributed_retrieval_worker.py"


@pytest.mark.slow
def test_two_process_retrieval_step(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(WORKER), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    for rank in ranks:  # the queues hold both ranks' momentum features, in rank order
        torch.testing.assert_close(rank["image_queue"][:, :4], torch.cat(
            [ranks[0]["video_feat_m"], ranks[1]["video_feat_m"]]).t())
        torch.testing.assert_close(rank["text_queue"][:, :4], torch.cat(
            [ranks[0]["text_feat_m"], ranks[1]["text_feat_m"]]).t())
        assert rank["idx_queue"][0, :4].tolist() == [10, 10, 11, 11]
        assert rank["idx_queue"][0, 4:].tolist() == [-100] * 4
        assert int(rank["ptr_queue"]) == 4
        assert torch.isfinite(rank["losses"]).all()

    # DDP averaged the gradients, including those flowing through the gathered negatives
    torch.testing.assert_close(ranks[0]["itm_head_grad"], ranks[1]["itm_head_grad"])
    torch.testing.assert_close(ranks[0]["vision_grad"], ranks[1]["vision_grad"])
    assert ranks[0]["vision_grad"].abs().sum() > 0

    # all_gather_with_grad: each rank gets the gradient every rank's loss sends its slice
    weights = torch.arange(12.0).view(4, 3)
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(rank["gather_grad"], 3 * weights[2 * r:2 * r + 2])

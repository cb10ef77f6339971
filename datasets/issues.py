"""Bad-data bookkeeping: records skipped when a dataset is built, videos that fail to decode later.

Decode failures happen in DataLoader worker processes. Each dataset keeps one flag per video in a
shared-memory tensor that the workers inherit, so the main process reads the count directly.
"""
import logging
from collections import Counter

import torch

logger = logging.getLogger(__name__)

MAX_REPORTED = 20  # lines logged per dataset; further problems are only counted


class DataIssues:
    """Counts and reports (once, with path and reason) the bad data of one dataset."""

    def __init__(self, name: str):
        self.name = name
        self.files: list[str] = []  # the annotation files read, named by errors about the split
        self.skipped = Counter()
        self.seen = set()
        self.reported = 0
        self.decode_failed = torch.zeros(0, dtype=torch.bool)

    def _report(self, message: str) -> None:
        self.reported += 1
        if self.reported <= MAX_REPORTED:
            logger.warning("%s: %s", self.name, message)
        elif self.reported == MAX_REPORTED + 1:
            logger.warning("%s: more bad data; counted in the summary only", self.name)

    def reading(self, path: str) -> str:
        """`path`, noted as an annotation file of this dataset."""
        self.files.append(path)
        return path

    def skip(self, reason: str, where: str) -> None:
        """A record dropped while building the dataset; each (reason, where) is reported once."""
        self.skipped[reason] += 1
        if (reason, where) not in self.seen:
            self.seen.add((reason, where))
            self._report(f"skipped {where}: {reason}")

    def track_videos(self, num_videos: int) -> None:
        """Allocate one shared decode-failure flag per video (call once the videos are known)."""
        self.decode_failed = torch.zeros(max(num_videos, 1), dtype=torch.bool).share_memory_()

    def failed_videos(self) -> torch.Tensor:
        """The indices of the videos flagged so far, int32 (a checkpoint keeps them)."""
        return self.decode_failed.nonzero().flatten().to(torch.int32)

    def flag_failed(self, video_indices: torch.Tensor) -> bool:
        """Flag videos that failed before (a resumed run's), without reporting them again;
        False, flagging none, when an index is beyond this dataset's videos."""
        video_indices = video_indices.long()
        if video_indices.numel() and int(video_indices.max()) >= len(self.decode_failed):
            return False
        self.decode_failed[video_indices] = True
        return True

    def has_failed(self, video_index: int) -> bool:
        return bool(self.decode_failed[video_index])

    def record_decode_failure(self, video_index: int, error: Exception, fallback: str) -> None:
        """A video that failed to decode during an epoch; reported the first time only."""
        if not self.decode_failed[video_index]:
            self.decode_failed[video_index] = True
            logger.warning("%s: %s; %s", self.name, error, fallback)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def num_decode_failures(self) -> int:
        return int(self.decode_failed.sum())

    def skip_reasons(self) -> str:
        """'1 empty caption, 2 missing video' (sorted by reason), '' when nothing was skipped."""
        return ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))

    def summary(self, fallback: str) -> str:
        """One line, e.g. 'x/train: 2 records skipped at build (1 missing video, 1 empty caption);
        1 video failed to decode (next record used)'."""
        if not self.num_skipped and not self.num_decode_failures:
            return f"{self.name}: no bad data"
        parts = [f"{self.num_skipped} records skipped at build ({self.skip_reasons()})"
                 if self.num_skipped
                 else "no records skipped at build"]
        failures = self.num_decode_failures
        parts.append(f"{failures} video{'s' if failures != 1 else ''} failed to decode ({fallback})")
        return f"{self.name}: " + "; ".join(parts)

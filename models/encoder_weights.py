"""Loading the video encoder alone from a BLIP/TESTA checkpoint."""
from torch import nn

from models.checkpoint import LoadReport, load_checkpoint
from models.video_encoder import VideoEncoder


class VisualTower(nn.Module):
    """Holds an encoder as `visual_encoder`, so that checkpoint keys line up with it."""

    def __init__(self, encoder: VideoEncoder):
        super().__init__()
        self.visual_encoder = encoder


def load_visual_encoder(encoder: VideoEncoder, path: str) -> LoadReport:
    """Load the `visual_encoder.*` tensors of a BLIP/TESTA checkpoint into `encoder`, and
    print what was loaded and adapted."""
    report = load_checkpoint(VisualTower(encoder), path)  # refuses a file without the encoder
    print(f"{path}: loaded {report.loaded} visual_encoder tensors, "
          f"missing: {', '.join(report.missing) or 'none'}")
    for entry in report.interpolated + report.temporal_copied:
        print(f"  adapted: {entry}")
    return report

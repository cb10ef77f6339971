"""TESTA models: the aggregating TimeSformer video encoder and the BLIP-style heads."""
from models.video_encoder import VideoEncoder, build_video_encoder

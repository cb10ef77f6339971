"""TESTA models: the aggregating TimeSformer video encoder and the BLIP-style heads."""
from models.video_encoder import VideoEncoder, build_video_encoder
from models.text import build_tokenizer
from models.retrieval import RetrievalModel, build_retrieval_model
from models.videoqa import VideoQAModel, build_videoqa_model
from models.pretrain import PretrainModel, build_pretrain_model
from models.checkpoint import load_checkpoint
from models.checkpoint_reading import CheckpointError, read_checkpoint
from models.load_report import LoadReport

"""The one episodic harness: training loop, ``evaluate``, ``predict_volume`` and checkpoints."""
from fewshot_proto.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fewshot_proto.engine.evaluator import evaluate
from fewshot_proto.engine.predictor import predict_volume
from fewshot_proto.engine.trainer import TrainResult, train

__all__ = ["train", "TrainResult", "evaluate", "predict_volume", "save_checkpoint", "load_checkpoint",
           "model_from_checkpoint"]

"""Training: `train(TrainConfig) -> TrainResult`, the library entry behind `clip-pacl train`.

Run it as several processes with `torchrun --nproc-per-node N -m clip_pacl.train ARGS` (DDP).
"""

from clip_pacl.train.config import TrainConfig
from clip_pacl.train.loop import TrainResult, accumulate_gradients, train

__all__ = ["TrainConfig", "TrainResult", "accumulate_gradients", "train"]

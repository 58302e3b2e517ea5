"""Endpoint-feature distillation (the paper's loss) as a timm ``TrainingTask``, plus the Accelerate trainer."""
from .endpoints import EndpointAligner, channel_avg_pool, resize_grid
from .losses import feature_loss, mse_feature_loss, soft_kd_loss, spectral_feature_loss
from .task import DistillStudent, EndpointDistillationTask
from .teacher import FrozenTeacher, create_teacher_model

__all__ = [
    "DistillStudent", "EndpointAligner", "EndpointDistillationTask", "FrozenTeacher", "channel_avg_pool",
    "create_teacher_model", "feature_loss", "mse_feature_loss", "resize_grid", "soft_kd_loss",
    "spectral_feature_loss",
]

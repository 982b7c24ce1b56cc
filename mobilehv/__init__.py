"""mobilehv: hybrid CNN/Transformer mobile backbones — models, verified export, latency breakdowns."""
from mobilehv.checkpoints import CheckpointError, load_checkpoint
from mobilehv.export import ExportResult, export
from mobilehv.fold import fold
from mobilehv.profile import ProfileResult, profile
from mobilehv.registry import (InputRule, ResolutionError, UnknownModelError, create_model,
                               list_models, model_info)

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ExportResult", "InputRule", "ResolutionError", "UnknownModelError", "create_model",
    "export", "fold", "list_models", "load_checkpoint", "model_info", "ProfileResult", "profile",
    "__version__",
]

"""Models: the registry (`models.registry`) and one module per architecture family.

Importing this package registers every architecture; `build_model`, `get_head`, `stages`, `model_names`,
`register_model` and `BackdoorNet` are its surface.
"""
from models.registry import BackdoorNet, StageTap, build_model, get_head, model_label, model_names, register_model, stage_modules, stages
from models import resnet, smallcnn, swin, vgg  # noqa: F401,E402  (they register themselves)

__all__ = ["BackdoorNet", "StageTap", "build_model", "get_head", "model_label", "model_names", "register_model",
           "stage_modules", "stages"]

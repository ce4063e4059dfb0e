"""Models: the registry (`models.registry`) and one module per architecture family.

Importing this package registers every architecture; `build_model`, `get_head`, `stages`, `model_names`,
`register_model` and `BackdoorNet` are its surface.
"""
from models.registry import (BackdoorNet, StageTap, build_model, check_model_name, get_head, is_heavy, is_model_name,
                             light_model_names, model_label, model_names, name_check, register_model, register_prefix,
                             stage_modules, stages)
from models import resnet, smallcnn, swin, torchvision_net, vgg  # noqa: F401,E402  (they register themselves)

__all__ = ["BackdoorNet", "StageTap", "build_model", "check_model_name", "get_head", "is_heavy", "is_model_name",
           "light_model_names", "model_label", "model_names", "name_check", "register_model", "register_prefix", "stage_modules",
           "stages"]

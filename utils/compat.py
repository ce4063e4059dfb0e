"""The single place that imports torchvision.

The pinned torchvision wheel is built against CUDA torch. With the CPU-only torch wheel its import
fails while registering fake kernels for two detection operators (`nms`, `qnms`) whose schemas the
missing C++ extension would have defined. Defining those two schemas first lets the pure-Python
parts (datasets, model definitions) import normally; the detection operators themselves stay
unusable, which this toolkit never needs.
"""
from __future__ import annotations

import sys

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_shim_library = None  # kept alive: a torch.library.Library unregisters its ops when collected


def import_torchvision():
    """Return the torchvision module, patching the missing operator schemas when needed."""
    global _shim_library
    try:
        import torchvision
        return torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _shim_library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _shim_library.define(schema)
    import torchvision
    return torchvision

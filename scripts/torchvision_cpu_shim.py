"""Let PyPI's CUDA-only torchvision import next to a CPU build of torch (development venv only).

PyPI publishes torchvision only as CUDA builds; with the CPU torch its compiled ops cannot load and
``import torchvision`` dies with ``operator torchvision::nms does not exist`` while registering fake
kernels. Defining the two operator schemas it registers fake kernels for, before torchvision is
imported, lets its pure-Python parts (transforms, io helpers) work. scripts/bootstrap.sh installs
this module into the test venv with a ``.pth`` line that calls :func:`install_hook`; it is never part
of the node pack (users' ComfyUI has a matching torch and torchvision).
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_libs: list = []


def define_schemas() -> None:
    """Define ``torchvision::nms`` / ``torchvision::qnms`` if torchvision's C++ ops did not."""
    import torch

    for name, schema in _SCHEMAS.items():
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        except RuntimeError:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            lib.define(schema)
            _libs.append(lib)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            define_schemas()
        return None


def install_hook() -> None:
    """Run :func:`define_schemas` lazily, right before the first ``import torchvision``."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())

"""privimage: differentially private synthetic images with semantic-aware pretraining.

    >>> import privimage
    >>> model = privimage.PrivImage(epsilon=10, out="runs/mine").fit(images, labels)  # doctest: +SKIP
    >>> synthetic_images, synthetic_labels = model.sample(1000)                        # doctest: +SKIP

`PrivImage` and `privimage.data` are imported on first use, so `import privimage` stays fast (no torch).
"""

import importlib

from privimage.errors import UserError

__version__ = "0.1.0"
__all__ = ["PrivImage", "UserError", "__version__"]


def __getattr__(name: str):
    if name == "PrivImage":
        from privimage.api import PrivImage

        return PrivImage
    if name == "data":
        return importlib.import_module("privimage.data")
    raise AttributeError(f"module 'privimage' has no attribute {name!r}")

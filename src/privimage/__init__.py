"""privimage: differentially private synthetic images with semantic-aware pretraining.

    >>> import privimage
    >>> model = privimage.PrivImage(epsilon=10, out="runs/mine").fit(images, labels)  # doctest: +SKIP
    >>> synthetic_images, synthetic_labels = model.sample(1000)                        # doctest: +SKIP

`PrivImage` is imported on first use, so `import privimage` stays fast (no torch).
"""

from privimage.errors import UserError

__version__ = "0.1.0"
__all__ = ["PrivImage", "UserError", "__version__"]


def __getattr__(name: str):
    if name == "PrivImage":
        from privimage.api import PrivImage

        return PrivImage
    raise AttributeError(f"module 'privimage' has no attribute {name!r}")

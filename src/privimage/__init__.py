"""privimage: differentially private synthetic images with semantic-aware pretraining."""

__version__ = "0.1.0"

"""visionflow: annotated images to a deployed vision model."""
__version__ = "0.1.0"

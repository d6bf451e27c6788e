"""visionflow: annotated images to a deployed vision model."""
import os

# Albumentations asks PyPI for a newer version on import (an HTTPS request from every process,
# loader worker and offline cluster node). Nothing here goes to the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

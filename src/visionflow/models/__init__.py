"""Model builders: torchvision classifiers, detectors and segmenters (and our U-Net), with
ImageNet weights loaded from the local cache only, heads adapted to the classes."""
from __future__ import annotations

import threading

_IMPORT_LOCK = threading.Lock()


def load_torchvision():
    """torchvision, imported whole, once, under a lock. Each builder calls it first.

    A first import of torchvision from two threads at once is not safe: torchvision.models
    imports its subpackages, which import it back, and the second thread can be handed the
    partially initialised module ("partially initialized module 'torchvision.models' has no
    attribute 'get_model'"). Branches side by side in threads (`visionflow run --task-runner
    threads`) build their first models at once: evaluate stages after skipped trainings, or
    run.max_parallel_trainings above 1. After the first call, the import is a lookup."""
    with _IMPORT_LOCK:
        import torchvision
    return torchvision

"""Model builders: torchvision classifiers, detectors and segmenters (and our U-Net), with
ImageNet weights loaded from the local cache only, heads adapted to the classes."""

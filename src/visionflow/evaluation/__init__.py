"""Evaluation metrics computed from files: COCO detection / segmentation AP and AR (`coco`)."""

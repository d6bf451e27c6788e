"""Evaluation metrics: COCO detection / instance-segmentation AP and AR (`coco`, pycocotools'
numbers), semantic-segmentation metrics (`segmentation`)."""

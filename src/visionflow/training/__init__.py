"""The one training engine for every task, DDP under torchrun, and the augmentation pipelines."""

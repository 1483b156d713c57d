"""Transfer training module: Zoom-CNN and baselines, pretraining, fine-tuning, export."""

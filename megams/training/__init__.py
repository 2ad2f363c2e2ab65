"""Training: the loop (`trainer.main`), DeepSpeed engine set-up, schedule, checkpoints, metrics, MFU."""

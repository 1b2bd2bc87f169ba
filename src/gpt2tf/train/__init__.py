"""Fine-tuning: the run's config, its plan, the train step and optimizers, checkpoints, the loop."""

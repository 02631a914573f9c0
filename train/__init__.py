"""Training: config schemas, the Trainer, checkpoints, EMA, optimizers, logging."""

"""Model code: single-device only; parallelism is applied from vdit.train.parallel."""

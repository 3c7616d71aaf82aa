"""Training: the loop and what it is built from (model, optimizer, loaders, runtime), checkpoints, evaluation."""

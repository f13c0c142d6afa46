"""resumable-trainer: train subclassed Keras models with full-state checkpoints and exact resume."""

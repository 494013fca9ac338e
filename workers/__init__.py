"""GPU workers: the only part of cxr-node that loads a model (and imports torch)."""

"""Evaluation: accuracy on question sets and paired comparisons, for PyTorch models and artifacts."""

"""Evaluation: exact-match VQA accuracy with a report and a confusion matrix."""

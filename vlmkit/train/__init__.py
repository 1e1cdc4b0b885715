"""Training: freezing per stage, the one loop every preset and stage runs, and the staged run."""

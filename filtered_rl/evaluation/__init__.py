"""pass@1 / pass@k evaluation with coverage and diversity metrics."""

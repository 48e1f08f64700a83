"""What the cluster is doing: metrics (JSONL + TensorBoard), live progress, run reports."""

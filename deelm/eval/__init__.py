"""Measuring embeddings: the MTEB STS harness (sts), the turning-point and
degradation analyses (analysis), and mteb's model wrapper and offline tasks
(mteb_model, mteb_tasks)."""

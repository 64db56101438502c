"""Fine-tuning UNIMO on its downstream tasks (``unimo-jax finetune``).

Modules: ``heads`` (task heads on the pooled h[CLS] / h[IMG]), ``losses`` (classification,
regression, soft-score BCE, circle / softmax ranking), ``layouts`` (numpy row layouts for the
readers), ``tasks`` (forward pass and loss of each task on a global batch).
"""

"""Empirical neural tangent kernels of Hugging Face language models (needs transformers)."""

"""Builders the tests (and benchmarks) share: tiny GGUF and Hugging Face models made at run time."""

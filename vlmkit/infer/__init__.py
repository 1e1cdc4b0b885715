"""Inference: batched generation with a KV cache, and chat."""

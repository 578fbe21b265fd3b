"""Decoding algorithms: SpecExec, SpecInfer and plain autoregressive decoding over tensors."""

"""Benchmarks of ssb-fast: fused kernels against eager PyTorch (installed as ssb_fast.bench)."""

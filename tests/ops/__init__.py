"""The fused ops, one module per op (test_<op>.py): every test runs on every device (cpu; cuda where a
GPU is) and in both implementations (the compiled kernels, the pure-PyTorch reference), through the
``device`` and ``impl`` fixtures of tests/conftest.py, against PyTorch's own ops and hand-computed values.
What only CUDA has is in tests/cuda."""

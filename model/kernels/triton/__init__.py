"""The GPU kernels, in Triton: one file per operation, forward and backward, each computing a function of
model/kernels/reference.py (the tests compare them with it and with float64, on CUDA or in Triton's interpreter).
The switch in model/kernels/__init__.py decides when they run."""

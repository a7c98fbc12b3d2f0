"""The CPU side: small C kernels (built at first use by build.py, loaded through ctypes, each beside the Python that
wraps it) and oneDNN products (matmul.py). Each computes what a plain-PyTorch function computes (reference.py, or
the reference beside it for a storage format) and the tests compare them; without a C compiler, or with
MINICURIE_KERNELS=reference, that PyTorch runs instead."""

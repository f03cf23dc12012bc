"""Triton kernels. Each module imports triton itself, so `import mft.kernels` costs nothing."""

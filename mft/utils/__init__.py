"""Plumbing at the bottom of mft: errors, atomic folders, JSON and safetensors files, process groups,
sharded tensors, devices and dtypes. Nothing here imports from the rest of mft."""

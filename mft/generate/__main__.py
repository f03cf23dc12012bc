"""`python -m mft.generate` runs the same Hydra app as `mft-generate`."""

from mft.generate.cli import main

main()

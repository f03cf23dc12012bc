"""`python -m mft.train` (and `torchrun -m mft.train`) run the same Hydra app as `mft-train`."""

from mft.train.cli import main

main()

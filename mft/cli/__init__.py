"""mft's installed commands over the library: `mft-export` (export.py) and `mft-quantize` (quantize.py).

Each module is argument parsing plus library calls; `main(argv=None) -> int` turns a user error
(MftError) into one `<command>: error: ...` paragraph on stderr and exit status 1.
"""

import sys

import torch

from mft.utils.errors import MftError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def report_error(command: str, error: MftError) -> int:
    print(f"{command}: error: {error}", file=sys.stderr)
    return 1

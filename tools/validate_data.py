"""Check data files before training: every bad row as file:line: reason, statistics, --fix.

    python tools/validate_data.py train.jsonl --tokenizer v3 --seq-len 2048 [--fix]
    python tools/validate_data.py +experiment=chat_sft        # the files of a training config

Same as the `mft-validate-data` command; see mft/data/validate.py for every option.
"""

import sys

from mft.data.validate import main

if __name__ == "__main__":
    sys.exit(main())

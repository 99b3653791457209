"""``diffrec pretrain`` with the example model registered: python examples/pretrain_biased_mf.py [--options ...]"""

import sys
from pathlib import Path

import biased_mf  # noqa: F401  (registers model.arch biased_mf)

from minigpt4.cli import main

if __name__ == "__main__":
    config = Path(__file__).with_name("biased_mf_ml100k.yaml")
    sys.exit(main(["pretrain", "--cfg-path", str(config), *sys.argv[1:]]))

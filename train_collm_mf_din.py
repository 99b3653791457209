"""Joint training / evaluation, CoLLM's entry point: python train_collm_mf_din.py --cfg-path=train_configs/X.yaml"""

import sys

from minigpt4.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

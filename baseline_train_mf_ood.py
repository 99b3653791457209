"""Collaborative pre-training, CoLLM's entry point: python baseline_train_mf_ood.py --cfg-path=train_configs/X.yaml"""

import sys

from minigpt4.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))

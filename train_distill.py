#!/usr/bin/env python3
"""Distill a wide teacher into a Lift/WideLast (or any timm) student with Accelerate.

    python train_distill.py -c widelast_softkd_mse --data-dir /imagenet
    accelerate launch train_distill.py -c widelast_softkd_mse --data-dir /imagenet
    torchrun --nproc_per_node 2 train_distill.py ...   # two CPU processes (gloo)

The loop lives in :mod:`timm_widelast.distill.trainer` (importable: ``parse_args``, ``train``).
"""
import sys

from timm_widelast.distill.trainer import main

if __name__ == "__main__":
    sys.exit(main())

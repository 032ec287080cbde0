"""Test set-up: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton.jit decorates the kernels, i.e. before starshard's
kernel modules are imported, so it is set here at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

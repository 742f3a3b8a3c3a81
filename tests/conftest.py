"""Session setup shared by all tests.

Without CUDA, Triton kernels can only run under the Triton interpreter, and Triton decides
that when ``triton`` is first imported (its own ``@triton.jit`` helpers such as ``tl.sum``
are defined then). ``import fxcompress`` imports triton, so the switch must be set here,
before any test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Test set-up: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1).

The variable must be set before triton.jit decorates the kernels, i.e. before starshard's
kernel modules are imported, so it is set here at collection time.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cli(capsys):
    """``cli(argv)`` runs ``starshard ARGV...`` in this process: (exit code, stdout, stderr)."""
    from starshard.cli import main

    def run(argv):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


_MEGATRON_HEAD = r"""
import os, sys, torch
import torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
if sys.argv[2] == "nccl":
    torch.cuda.set_device(0)
dist.init_process_group(sys.argv[2], rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
import starshard as ss
from starshard.integrations import megatron as smeg
from starshard.ops.reference import reference_attention

class Reference(smeg.S2DotProductAttention):
    # the float64 dense-masked reference of the layer's layout, as core attention
    def forward(self, query, key, value, attention_mask, **kw):
        lay = self.layout or smeg.dense_layout(query.shape[2])
        out, _ = reference_attention(*(t.transpose(0, 1) for t in (query, key, value)), lay)
        return out.transpose(0, 1).reshape(query.shape[0], query.shape[1], -1).to(query.dtype)
"""


@pytest.fixture
def megatron_script():
    """Run ``body`` in a fresh one-process Megatron world (Megatron keeps global state): the
    head above (process group over ``backend``, model parallel of 1, a ``Reference`` core
    attention) runs first. Returns the CompletedProcess."""
    def run(body, backend="gloo", timeout=300):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1") if backend == "gloo" else dict(os.environ)
        return subprocess.run([sys.executable, "-c", _MEGATRON_HEAD + body, str(port), backend],
                              capture_output=True, text=True, timeout=timeout, env=env)
    return run

"""Triton kernels for the tests: compiled on a CUDA machine, else run by Triton's interpreter on tiny shapes.

Import this before triton: without a GPU it sets TRITON_INTERPRET=1, which triton reads when it is imported.
"""

from __future__ import annotations

import importlib
import os

import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def load_kernel(name: str, probe: str):
    """Import moeserve.kernels.<name>; on CPU re-import it if it was imported before the interpreter was set."""
    from moeserve.kernels import runtime

    mod = importlib.import_module(f"moeserve.kernels.{name}")
    if not CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        runtime.patch_interpreter_for_numpy()
        pdl = importlib.import_module("moeserve.kernels.pdl")  # every kernel calls its pdl_begin
        if not isinstance(pdl.pdl_begin, InterpretedFunction):
            importlib.reload(pdl)
        if not isinstance(getattr(mod, probe), InterpretedFunction) or mod.pdl_begin is not pdl.pdl_begin:
            mod = importlib.reload(mod)
    return mod

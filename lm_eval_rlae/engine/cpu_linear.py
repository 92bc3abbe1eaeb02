"""Linear layers of CPU members, computed in the layout MKL multiplies fastest when a forward is narrow.

A decoding forward multiplies a few rows (batch x new tokens) by every weight matrix, and is bound by
reading the weights. `F.linear` hands MKL `x @ W.T`; for one row MKL takes a matrix-vector path that
reads the weights at about a third of the memory bandwidth the two cores have, and for a few rows a
path that costs more than one row (on 2 cores: the plain pair's layers 48 ms at 1 row, 70 ms at 2).
Asking for the same product as `W @ x.T`, with one row given twice, reads each weight once at full
bandwidth: 20 ms at 1 or 2 rows, 30 ms at 4 (Gemma 3's 262,144-row output layer: 54 -> 17 ms at one
row). This is the premise of speculative decoding holding on a CPU too: a forward over a few drafted
tokens costs about one over one token. Same product, summed in another order: outputs agree with
`F.linear` to float rounding (about 1e-6 relative), as between batch sizes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

# Above this many rows (a prompt, a scoring forward) MKL's usual layout is as fast or faster (measured
# on 2 cores: the transposed layout gains up to 256 rows and loses at 512).
MAX_ROWS = 256


def narrow_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [M, in]; row-major, or MKL is as slow as before
    m = rows.shape[0]
    if m > MAX_ROWS or m == 0:
        return F.linear(x, self.weight, self.bias)
    if m == 1:
        rows = torch.cat([rows, rows])  # two columns keep MKL on its matrix-matrix path
    out = torch.mm(self.weight, rows.t())[:, :m].t().contiguous()  # [M, out], row-major for the next layer
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def use_narrow_linears(model: torch.nn.Module) -> int:
    """Route the float32 CPU `nn.Linear` layers of `model` through `narrow_linear_forward`; returns
    how many. Subclasses (quantized or adapter layers) keep their own forward."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(narrow_linear_forward, module)
            count += 1
    return count

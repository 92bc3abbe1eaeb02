"""CPU members' linear layers in the narrow layout: the same product as `F.linear` (to float rounding),
row-major output (a column-major one sends the next layer back to MKL's slow path), and only plain
float32 CPU `nn.Linear` layers are rerouted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm_eval_rlae.engine.cpu_linear import MAX_ROWS, narrow_linear_forward, use_narrow_linears
from lm_eval_rlae.engine.members import Member, MemberSpec


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (8, 1), (3, 5), (2, 200)])  # [B, T] rows of a forward
@pytest.mark.parametrize("bias", [False, True])
def test_narrow_linears_compute_f_linear(shape, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 96, bias=bias)
    x = torch.randn(*shape, 48)
    out = narrow_linear_forward(layer, x)
    assert out.shape == (*shape, 96)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_column_major_inputs_give_the_same_product():
    """The input of a layer fed by another narrow one can arrive transposed in memory."""
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(16, 3).t()  # [3, 16], column-major
    torch.testing.assert_close(narrow_linear_forward(layer, x), F.linear(x, layer.weight, layer.bias))


def test_wide_forwards_keep_f_linear():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(MAX_ROWS + 1, 8)
    assert torch.equal(narrow_linear_forward(layer, x), F.linear(x, layer.weight, layer.bias))


def test_only_plain_float32_linears_are_rerouted():
    class Adapter(torch.nn.Linear):  # a subclass (a quantized or adapter layer) keeps its forward
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Adapter(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Embedding(3, 4))
    assert use_narrow_linears(model) == 1
    assert model[0].forward.__func__ is narrow_linear_forward
    assert "forward" not in vars(model[1]) and "forward" not in vars(model[2])


def test_cpu_members_decode_with_narrow_linears(bpe_member):
    member = Member(MemberSpec.parse(str(bpe_member), {"device": "cpu"}))
    linears = [m for m in member.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(m.forward.__func__ is narrow_linear_forward for m in linears)

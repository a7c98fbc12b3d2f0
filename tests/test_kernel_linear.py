"""kernels.linear: float32 products in oneDNN on the CPU (model/kernels/cpu/matmul.py), forward and gradients.

The reference is float64 arithmetic on the same inputs. The tolerance is the textbook bound for a float32 sum of K
products in any order: |fl(sum) - sum| <= gamma_K * sum |terms|, gamma_K = K u / (1 - K u), u = 2^-24, taken
element by element (here sum |terms| = |x| @ |W|.T, computed in float64). A wrong operand, transpose or missing
term misses it by orders of magnitude; any correct float32 GEMM meets it.
"""
import pytest
import torch
import torch.nn.functional as F

from model.kernels import linear, matmul_nt, use_kernels
from model.kernels.cpu.matmul import _LINEAR_POINTWISE, use_onednn

pytestmark = pytest.mark.skipif(_LINEAR_POINTWISE is None, reason="this PyTorch build has no oneDNN linear op")

U = 2.0 ** -24


def assert_within_gamma(got: torch.Tensor, exact: torch.Tensor, abs_terms: torch.Tensor, k: int, what: str) -> None:
    gamma = k * U / (1 - k * U)
    err = (got.double() - exact).abs()
    bound = gamma * abs_terms + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: error {err.max().item():.3g} is {worst:.2f}x the float32 bound (K={k})"


def fresh(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2 + 0.5   # not centred, so sums do not cancel to nothing


SHAPES = [  # (leading dims of x, in, out)
    ((1,), 1, 1), ((1,), 576, 1536), ((5,), 7, 3), ((37,), 64, 96), ((2, 13), 33, 17), ((3, 1, 9), 100, 1),
    ((4, 6), 129, 257),
]


@pytest.mark.parametrize("lead, k, n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_every_gradient_against_float64(lead, k, n, with_bias):
    x = fresh(*lead, k, seed=1).requires_grad_()
    w = fresh(n, k, seed=2).requires_grad_()
    b = fresh(n, seed=3).requires_grad_() if with_bias else None
    y = linear(x, w, b)
    assert y.grad_fn is not None and "OneDNN" in type(y.grad_fn).__name__   # the path under test was taken
    dy = fresh(*y.shape, seed=4)
    y.backward(dy)

    x64, w64, dy64 = x.detach().double(), w.detach().double(), dy.double()
    exact = F.linear(x64, w64, None if b is None else b.detach().double())
    abs_terms = x64.abs() @ w64.abs().T + (0 if b is None else b.detach().double().abs())
    assert_within_gamma(y, exact, abs_terms, k + with_bias, "y")
    assert_within_gamma(x.grad, dy64 @ w64, dy64.abs() @ w64.abs(), n, "dx")
    dy2, x2 = dy64.reshape(-1, n), x64.reshape(-1, k)
    rows = dy2.shape[0]
    assert_within_gamma(w.grad, dy2.T @ x2, dy2.abs().T @ x2.abs(), rows, "dW")
    if b is not None:
        assert_within_gamma(b.grad, dy2.sum(0), dy2.abs().sum(0), rows, "db")


def test_frozen_weight_or_input_without_gradient():
    """LoRA's base: W frozen, only dx. The first layer: x needs no gradient, only dW. Neither: no autograd at all."""
    x, w, dy = fresh(3, 8, 40, seed=5), fresh(24, 40, seed=6), fresh(3, 8, 24, seed=7)
    xg = x.clone().requires_grad_()
    linear(xg, w).backward(dy)
    assert_within_gamma(xg.grad, dy.double() @ w.double(), dy.double().abs() @ w.double().abs(), 24, "dx")
    wg = w.clone().requires_grad_()
    linear(x, wg).backward(dy)
    dy2, x2 = dy.double().reshape(-1, 24), x.double().reshape(-1, 40)
    assert_within_gamma(wg.grad, dy2.T @ x2, dy2.abs().T @ x2.abs(), 24, "dW")
    y = linear(x, w)
    assert y.grad_fn is None
    assert_within_gamma(y, x.double() @ w.double().T, x.double().abs() @ w.double().abs().T, 40, "y")


def test_output_can_be_added_into_in_place_under_autograd():
    """LoRALinear adds its update into the base layer's output in place; the gradients must still be right."""
    x = fresh(2, 5, 16, seed=8).requires_grad_()
    w, a = fresh(12, 16, seed=9), fresh(12, 16, seed=10).requires_grad_()
    y = linear(x, w)                      # frozen base
    y.add_(linear(x, a), alpha=0.5)       # trainable update, in place
    dy = fresh(2, 5, 12, seed=11)
    y.backward(dy)
    x64, w64, a64, dy64 = x.detach().double(), w.double(), a.detach().double(), dy.double()
    assert_within_gamma(x.grad, dy64 @ (w64 + 0.5 * a64), dy64.abs() @ (w64.abs() + 0.5 * a64.abs()), 24, "dx")
    dy2, x2 = dy64.reshape(-1, 12), x64.reshape(-1, 16)
    assert_within_gamma(a.grad, 0.5 * dy2.T @ x2, 0.5 * dy2.abs().T @ x2.abs(), 10, "dA")


def test_matmul_nt_takes_transposed_views():
    """The backward multiplies by W.T and x.T views without copying them."""
    a, b = fresh(30, 20, seed=12), fresh(20, 45, seed=13)
    for left in (a, a.T.contiguous().T):          # contiguous, and the same values through a transposed view
        for right in (b.T, b.T.contiguous()):      # [45, 20] as a view of b and as its own tensor
            got = matmul_nt(left, right)
            assert got.shape == (30, 45)
            assert_within_gamma(got, a.double() @ b.double(), a.double().abs() @ b.double().abs(), 20, "a @ b")


def test_other_dtypes_devices_autocast_and_reference_switch_take_f_linear():
    x, w = fresh(4, 8, seed=14), fresh(3, 8, seed=15)
    assert use_onednn(x, w)
    assert not use_onednn(x.double(), w.double())
    assert not use_onednn(x.bfloat16(), w.bfloat16())
    assert not use_onednn(x.to("meta"), w.to("meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, w)
        assert linear(x, w).dtype == torch.bfloat16          # autocast's product, as F.linear gives
    with use_kernels("reference"):
        assert not use_onednn(x, w)
        xg = x.clone().requires_grad_()
        assert "OneDNN" not in type(linear(xg, w).grad_fn).__name__
        torch.testing.assert_close(linear(x, w), F.linear(x, w), atol=0, rtol=0)
    # float64 (the tests' exact models) is F.linear, bit for bit.
    torch.testing.assert_close(linear(x.double(), w.double()), F.linear(x.double(), w.double()), atol=0, rtol=0)


def test_the_decoder_and_lora_route_their_products_through_it(monkeypatch):
    """The wiring: every linear layer of the accelerated decoder (model.fast.apply), and LoRA's A and B, reach the
    oneDNN op in float32 on the CPU (forward and backward), so the speed measured in bench/ is the code path the tests check."""
    import model.kernels.cpu.matmul as matmul_module
    from lora import LoRAConfig, inject_lora
    from model.args import PRESETS
    from model.transformer import Transformer

    calls = []
    op = matmul_module._LINEAR_POINTWISE
    monkeypatch.setattr(matmul_module, "_LINEAR_POINTWISE", lambda *a: calls.append(a[1].shape) or op(*a))
    torch.manual_seed(0)
    args = PRESETS["tiny"]
    from model import fast
    net = fast.apply(Transformer(args))
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        net(tokens)
    assert len(calls) == 7 * args.n_layers + 1          # q, k, v, o, w1, w2, w3 per block, and the head

    inject_lora(net, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("wq", "w2")))
    calls.clear()
    net.train()
    loss = net(tokens[:, :-1], targets=tokens[:, 1:])   # the fused head + loss: its chunk products count too
    n_forward = len(calls)
    # + A and B of the two adapters per block; the fused head + loss forms its logits and, already in the forward
    # pass, their gradient with respect to h: two products for its one chunk.
    assert n_forward == (7 + 2 * 2) * args.n_layers + 2
    loss.backward()
    assert len(calls) > 2 * n_forward                       # input gradients, adapter gradients, head gradient


def test_mismatched_shapes_get_f_linears_error():
    x, w = fresh(3, 16, seed=1), fresh(8, 16, seed=2)
    for args in ((x[:, :15], w, None), (x, w, fresh(5, seed=3))):
        with pytest.raises(RuntimeError) as ours:
            linear(*args)
        with pytest.raises(RuntimeError) as theirs:
            F.linear(*args)
        assert str(ours.value) == str(theirs.value)     # not oneDNN's "could not create a primitive descriptor"


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")   # inside torch.func, torch.compile
def test_torch_func_forward_ad_and_torch_compile_take_f_linear():
    from torch.autograd import forward_ad
    x, w, b, t = fresh(3, 16, seed=4), fresh(8, 16, seed=5), fresh(8, seed=6), fresh(3, 16, seed=7)
    with forward_ad.dual_level():   # the raw oneDNN op has no forward-mode formula: the tangent would be lost
        tangent = forward_ad.unpack_dual(linear(forward_ad.make_dual(x, t), w, b)).tangent
    torch.testing.assert_close(tangent, t @ w.T)
    torch.testing.assert_close(torch.func.jvp(lambda v: linear(v, w, b), (x,), (t,))[1], t @ w.T)
    torch.testing.assert_close(torch.func.vmap(lambda v: linear(v, w, b))(x), F.linear(x, w, b))
    # Inductor has no lowering for the raw op: under torch.compile the product is F.linear's.
    compiled = torch.compile(lambda v: linear(v, w, b))
    torch.testing.assert_close(compiled(x), F.linear(x, w, b))

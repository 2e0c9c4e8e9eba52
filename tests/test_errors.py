"""Every bad input to the functional op raises a clear error naming the argument."""

import pytest
import torch

import fastlora


def _good(dtype=torch.float32):
    return dict(
        x=torch.randn(4, 8, dtype=dtype),
        weight=torch.randn(6, 8, dtype=dtype),
        bias=torch.randn(6, dtype=dtype),
        lora_A=torch.randn(2, 8, dtype=dtype),
        lora_B=torch.randn(6, 2, dtype=dtype),
        scaling=1.0,
    )


CASES = [
    ("x", torch.randint(0, 3, (4, 8)), TypeError, "x: expected a floating-point tensor.*got torch.int64"),
    ("x", torch.randn(4, 8, dtype=torch.complex64), TypeError, "x: expected a floating-point.*complex64"),
    ("x", torch.randn(4, 9), ValueError, r"x: expected last dimension in_features=8"),
    ("x", torch.tensor(1.0), ValueError, "x: expected at least 1 dimension"),
    ("x", torch.randn(4, 8, dtype=torch.float64), TypeError, "x: expected dtype torch.float32"),
    ("x", torch.randn(4, 8, device="meta"), ValueError, "x: expected a tensor with data, got a meta tensor"),
    ("x", [[1.0] * 8], TypeError, "x: expected a torch.Tensor, got list"),
    ("weight", torch.randn(6, 8, 1), ValueError, r"weight: expected a 2-D tensor, got shape \(6, 8, 1\)"),
    ("lora_A", torch.randn(2, 7), ValueError, r"lora_A: expected shape \[r, in_features\]=\[2, 8\]"),
    ("lora_A", torch.randn(16), ValueError, "lora_A: expected a 2-D tensor"),
    ("lora_A", torch.randn(0, 8), ValueError, "lora_A: expected r >= 1 rows, got 0"),
    ("lora_B", torch.randn(6, 3), ValueError, r"lora_B: expected shape \[out_features, r\]=\[6, 2\]"),
    ("lora_B", torch.randint(0, 2, (6, 2)), TypeError, "lora_B: expected a floating-point tensor"),
    ("bias", torch.randn(5), ValueError, r"bias: expected shape \[6\], got \(5,\)"),
    ("bias", torch.randn(6, dtype=torch.float64), TypeError, "bias: expected dtype torch.float32"),
    ("scaling", float("nan"), ValueError, "scaling: expected a finite float, got nan"),
    ("scaling", float("inf"), ValueError, "scaling: expected a finite float, got inf"),
    ("scaling", "2", ValueError, "scaling: expected a finite float, got '2'"),
]


@pytest.mark.parametrize("arg, value, exc, match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument(arg, value, exc, match):
    # the good arguments' signature is remembered (a repeat skips the checks): the bad
    # input differs from it in one argument and must still be refused, every time
    fastlora.lora_linear(**_good())
    kwargs = _good()
    kwargs[arg] = value
    for _ in range(2):
        with pytest.raises(exc, match=match):
            fastlora.lora_linear(**kwargs)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout(p):
    fastlora.lora_linear(**_good(), dropout_p=0.5, training=True)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"dropout_p: expected a float in \[0, 1\)"):
            fastlora.lora_linear(**_good(), dropout_p=p, training=True)


def test_meta_weight_is_refused():
    kwargs = _good()
    kwargs["weight"] = torch.randn(6, 8, device="meta")
    with pytest.raises(ValueError, match="weight: expected a tensor with data"):
        fastlora.lora_linear(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arg", ["weight", "bias", "lora_A", "lora_B"])
def test_mixed_devices_are_refused(arg):
    kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    kwargs[arg] = kwargs[arg].cpu()
    with pytest.raises(ValueError, match=f"{arg}: expected device cuda:0"):
        fastlora.lora_linear(**kwargs)

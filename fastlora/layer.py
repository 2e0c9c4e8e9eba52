"""``FastLoRALinear``: a drop-in ``nn.Linear`` with a LoRA update on a frozen base."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fastlora import bases, dora, fp8, inits
from fastlora.functional import lora_linear


def _check_hparams(r: object, lora_alpha: object, lora_dropout: object) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r: expected an integer >= 1, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")


def _check_use_dora(use_dora: object) -> None:
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora: expected a bool, got {use_dora!r}")


class LoRAAdapter(nn.Module):
    """A named adapter beside a layer's first one: ``lora_A`` [r, in], ``lora_B`` [out, r]
    (and DoRA's ``lora_magnitude_vector`` [out]) with their own r, alpha, dropout and rsLoRA.
    It carries the same attribute names as ``FastLoRALinear`` does for its first adapter, so
    either can be read as "an adapter" (``FastLoRALinear.adapter``)."""

    def __init__(self, layer: "FastLoRALinear", r: int, lora_alpha: float, lora_dropout: float,
                 use_rslora: bool, init_lora_weights: inits.InitMode, dtype: torch.dtype,
                 use_dora: bool = False) -> None:
        _check_hparams(r, lora_alpha, lora_dropout)
        _check_use_dora(use_dora)
        if inits.is_decomposition(init_lora_weights):
            raise ValueError(
                f"init_lora_weights={init_lora_weights!r}: PiSSA/OLoRA overwrite the shared base "
                "weight, which the layer's other adapters rely on; only the first adapter may use it"
            )
        super().__init__()
        device = layer.weight.device
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.use_dora = bool(use_rslora), bool(use_dora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.init_lora_weights = init_lora_weights
        self.lora_A = nn.Parameter(torch.empty(r, layer.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(layer.out_features, r, device=device, dtype=dtype))
        inits.init_plain_(self.lora_A, self.lora_B, init_lora_weights)
        if self.use_dora:
            norm = dora.weight_norm(layer.weight, self.lora_A, self.lora_B, self.scaling,
                                    layer._weight_sq_norm.get(layer.weight))
            self.lora_magnitude_vector = nn.Parameter(norm.to(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, use_dora={self.use_dora}")


class FastLoRALinear(nn.Linear):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with ``W``, ``b`` frozen.

    A subclass of ``nn.Linear``: ``weight`` [out, in] and ``bias`` [out] keep their names, so a
    base checkpoint loads into it. ``lora_A``: [r, in], ``lora_B``: [out, r];
    ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

    ``use_dora=True`` (PEFT's DoRA): a trainable magnitude ``lora_magnitude_vector`` [out],
    initialised to the row norms of ``W + scaling B A``, scales each output column by
    ``m / ||W + scaling B A||`` (see ``fastlora.dora``).

    Precision: the low-rank path runs in the input's dtype with fp32 accumulation; LoRA
    parameters may be kept in float32 beside a bf16/fp16 base (they are cast to the input's
    dtype for the matmuls) and receive gradients in their own dtype.

    Named adapters (``fastlora.multi_adapter``): the first adapter keeps the attributes above
    under the name ``adapter_name``; each further one is a ``LoRAAdapter`` in
    ``lora_adapters[name]``. ``_route`` is None for the plain forward of the first adapter;
    ``set_adapter`` and ``adapter_batch`` set it to a callable ``(layer, x) -> y``.
    """

    adapter_name = "default"
    _route = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        init_lora_weights: inits.InitMode = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
    ) -> None:
        _check_hparams(r, lora_alpha, lora_dropout)
        _check_use_dora(use_dora)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                        self.weight.device, self.weight.dtype, use_dora)

    def _init_lora(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, device, dtype,
                   use_dora=False):
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        self.use_dora = bool(use_dora)
        self._weight_sq_norm = dora.WeightNormCache()
        self._merged_norm: torch.Tensor | None = None
        if self.use_dora:
            self.lora_magnitude_vector = nn.Parameter(
                torch.empty(self.out_features, device=device, dtype=dtype))
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: inits.InitMode = True) -> None:
        """(Re)initialise ``lora_A``/``lora_B`` (PEFT's ``init_lora_weights`` values)."""
        if self.merged:
            raise RuntimeError("reset_lora_parameters: unmerge() the layer first")
        inits.initialize(self, init_lora_weights)
        self.init_lora_weights = init_lora_weights
        if self.use_dora:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: set ``lora_magnitude_vector`` to the row norms of ``W + scaling B A`` (PEFT's
        init, so the layer's output is unchanged by the decomposition)."""
        if not self.use_dora:
            raise RuntimeError("reset_magnitude: the layer was built without use_dora=True")
        self._weight_sq_norm.clear()
        self.lora_magnitude_vector.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W_n + scaling (B A)_n||`` [out], detached, in float32 (float64 for a
        float64 weight); ``||W_n||^2`` comes from a cache that a change of the weight voids."""
        return dora.weight_norm(self.weight, self.lora_A, self.lora_B, self.scaling,
                                self._weight_sq_norm.get(self.weight))

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: inits.InitMode = True,
        use_dora: bool = False,
    ) -> "FastLoRALinear":
        """Wrap ``linear`` without copying: the new layer holds the same ``weight``/``bias``
        parameters (frozen), and new LoRA factors on their device and dtype.

        ``linear`` may be a bitsandbytes ``Linear4bit`` (QLoRA): its packed ``Params4bit``
        weight and ``quant_state`` are kept as they are (memory stays 4-bit), its
        ``compute_dtype`` too (x is cast to it and the output back, as ``Linear4bit`` does);
        the factors take the compute dtype, or the dtype the weight was quantized from.

        ``linear`` may be an FP8 layer (``fastlora.fp8.Fp8Linear``, transformers'
        ``FP8Linear``): its e4m3 ``weight`` and ``weight_scale_inv`` are kept as they are (same
        names in the state dict), x's dtype is the compute dtype; the factors take the dtype
        the weight was quantized from (else the bias's, else float32)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"linear: expected a torch.nn.Linear, got {type(linear).__name__} "
                "(transposed Conv1D layers such as GPT-2's are not nn.Linear)"
            )
        if isinstance(linear, FastLoRALinear):
            raise TypeError("linear: expected a plain torch.nn.Linear, got a FastLoRALinear "
                            "(it already carries a LoRA update)")
        _check_hparams(r, lora_alpha, lora_dropout)
        _check_use_dora(use_dora)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        if bases.is_4bit(linear.weight):
            if bases.restore_standard_packing(linear):
                bases.warn_repacked(["linear"], "FastLoRALinear.from_linear")
            bases.base_of(linear.weight, "linear.weight")
            dtype = bases.factor_dtype(linear)
            layer.compute_dtype = bases.module_compute_dtype(linear)
        elif fp8.is_fp8_linear(linear):
            layer.weight_scale_inv = linear.weight_scale_inv
            layer.weight_scale_inv.requires_grad_(False)
            fp8.attach(linear.weight, linear.weight_scale_inv, fp8.module_block_size(linear))
            bases.base_of(linear.weight, "linear.weight")
            dtype = bases.fp8_factor_dtype(linear)
            layer.fp8_dtype = dtype  # what merge_lora returns
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer._init_lora(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                         linear.weight.device, dtype, use_dora)
        return layer

    # -- named adapters ------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        """The layer's adapters, first one first."""
        extra = self._modules.get("lora_adapters")
        return [self.adapter_name] + (list(extra) if extra is not None else [])

    def adapter(self, name: str) -> "FastLoRALinear | LoRAAdapter | None":
        """The object holding adapter ``name``'s factors and hyperparameters (the layer itself
        for its first adapter), or None when the layer does not have it."""
        if name == self.adapter_name:
            return self
        extra = self._modules.get("lora_adapters")
        return extra[name] if extra is not None and name in extra else None

    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: inits.InitMode = True,
                    use_dora: bool = False, dtype: torch.dtype | None = None) -> LoRAAdapter:
        """Add adapter ``name`` beside the existing ones (factors in ``dtype``, default the
        first adapter's)."""
        if self.adapter(name) is not None:
            raise ValueError(f"adapter_name: the layer already has an adapter named {name!r}")
        if self.merged:
            raise RuntimeError("add_adapter: unmerge() the layer first")
        new = LoRAAdapter(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                          dtype or self.lora_A.dtype, use_dora)
        if "lora_adapters" not in self._modules:
            self.lora_adapters = nn.ModuleDict()
        self.lora_adapters[name] = new
        return new

    _ADAPTER_ATTRS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "scaling",
                      "init_lora_weights")

    def promote(self, name: str) -> None:
        """Make adapter ``name`` the layer's first (its parameters become ``lora_A``,
        ``lora_B``...); the previous first one joins ``lora_adapters`` under its name."""
        if self.merged:
            raise RuntimeError("promote: unmerge() the layer first")
        if name == self.adapter_name:
            return
        extra = self._modules.get("lora_adapters")
        if extra is None or name not in extra:
            raise KeyError(f"adapter_name: the layer has no adapter {name!r}")
        new = extra[name]
        old = LoRAAdapter.__new__(LoRAAdapter)
        nn.Module.__init__(old)
        for attr in self._ADAPTER_ATTRS:
            setattr(old, attr, getattr(self, attr))
            setattr(self, attr, getattr(new, attr))
        old.lora_A, old.lora_B = self.lora_A, self.lora_B
        self.lora_A, self.lora_B = new.lora_A, new.lora_B
        if old.use_dora:
            old.lora_magnitude_vector = self._parameters.pop("lora_magnitude_vector")
        if self.use_dora:
            self.lora_magnitude_vector = new.lora_magnitude_vector
        rest = {n: a for n, a in extra.items() if n != name}
        self.lora_adapters = nn.ModuleDict({self.adapter_name: old, **rest})
        self.adapter_name = name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; removing the first one moves the next into its place."""
        if self.adapter(name) is None:
            raise KeyError(f"adapter_name: the layer has no adapter {name!r}")
        if name == self.adapter_name:
            extra = self._modules.get("lora_adapters")
            if extra is None or not len(extra):
                raise ValueError(f"delete_adapter: {name!r} is the layer's only adapter")
            self.promote(next(iter(extra)))
        del self.lora_adapters[name]
        if not len(self.lora_adapters):
            del self.lora_adapters

    def _forward_adapter(self, x: torch.Tensor, ad: "FastLoRALinear | LoRAAdapter | None") -> torch.Tensor:
        """The forward with adapter ``ad`` (None: the base alone)."""
        weight, bias = self.weight, self.bias
        if ad is None:
            if bases.is_4bit(weight):
                compute = getattr(self, "compute_dtype", None) or x.dtype
                b = None if bias is None else bias.to(compute)
                return F.linear(x.to(compute), bases.dense_weight(weight, compute), b).to(x.dtype)
            return F.linear(x, weight, bias)
        dora_args = ()
        if ad.use_dora:
            dora_args = (ad.lora_magnitude_vector, self._weight_sq_norm.get(weight))
        if bases.is_4bit(weight):
            compute = getattr(self, "compute_dtype", None) or x.dtype
            b = None if bias is None else bias.to(compute)
            y = lora_linear(x.to(compute), weight, b, ad.lora_A, ad.lora_B, ad.scaling,
                            ad.lora_dropout, self.training, *dora_args)
            return y.to(x.dtype)
        return lora_linear(x, weight, bias, ad.lora_A, ad.lora_B, ad.scaling, ad.lora_dropout,
                           self.training, *dora_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._route
        if route is not None:  # another active adapter, or a mixed batch
            return route(self, x)
        params = self._parameters  # one dict, not one Module.__getattr__ per tensor
        try:
            weight, lora_A, lora_B = params["weight"], params["lora_A"], params["lora_B"]
        except KeyError:  # a wrapper (FSDP) that set them as plain attributes
            weight, lora_A, lora_B = self.weight, self.lora_A, self.lora_B
        bias = params["bias"] if "bias" in params else self.bias
        if self.merged:
            return F.linear(x, weight, bias)
        if bases.is_quantized(weight):
            if "weight_scale_inv" in params:  # FP8: the scales a state-dict load put there
                self._attach_fp8(weight, params["weight_scale_inv"])
            return self._forward_4bit(x)
        if self.use_dora:
            return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, self.lora_dropout,
                               self.training, self.lora_magnitude_vector,
                               self._weight_sq_norm.get(weight))  # fmt: skip
        return lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, self.lora_dropout,
                           self.training)  # fmt: skip

    def _attach_fp8(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        # a load_state_dict(assign=True) replaces the parameters: the codes must name the
        # layer's current scales
        if getattr(weight, "fp8_scale_inv", None) is not scale:
            fp8.attach(weight, scale, getattr(weight, "fp8_block_size", None))

    def _forward_4bit(self, x: torch.Tensor) -> torch.Tensor:
        # as bitsandbytes' Linear4bit (and FP8Linear, compute_dtype unset): compute in
        # compute_dtype (x's dtype when unset), bias cast to it, output back in x's dtype
        compute = getattr(self, "compute_dtype", None) or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        dora_args = ()
        if self.use_dora:
            dora_args = (self.lora_magnitude_vector, self._weight_sq_norm.get(self.weight))
        y = lora_linear(x.to(compute), self.weight, bias, self.lora_A, self.lora_B,
                        self.scaling, self.lora_dropout, self.training, *dora_args)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if bases.is_4bit(self.weight):  # bitsandbytes' keys, as Linear4bit writes them
            for k, v in self.weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B A`` [out, in] in float32 at least (float64 for a float64 weight)."""
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)).mul_(self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scaling * B A`` into ``weight`` (float32 arithmetic at least, in place in the
        same tensor); forward becomes the plain linear. Merging twice warns and does nothing."""
        if self.merged:
            warnings.warn("merge: the layer is already merged (W holds W + s*B*A); "
                          "nothing done", UserWarning, stacklevel=2)
            return
        if bases.is_quantized(self.weight):
            kind = "an FP8" if bases.is_fp8(self.weight) else "a 4-bit"
            raise ValueError(
                f"merge: {kind} weight cannot hold W + s*B*A in place; fastlora.merge_lora(model) "
                "returns a dense nn.Linear in the compute dtype instead (re-quantizing it is lossy)"
            )
        delta = self.delta_weight()
        merged = self.weight.to(delta.dtype) + delta
        if self.use_dora:
            # PEFT: (m / ||W + s B A||) * (W + s B A), the norm kept for unmerge
            self._merged_norm = self.weight_norm().to(delta.dtype)
            factor = self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm
            merged.mul_(factor.unsqueeze(1))
        self.weight.copy_(merged)
        self._weight_sq_norm.clear()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (same arithmetic) and return to the LoRA forward."""
        if not self.merged:
            return
        delta = self.delta_weight()
        weight = self.weight.to(delta.dtype)
        if self.use_dora:
            factor = self.lora_magnitude_vector.to(delta.dtype) / self._merged_norm
            weight = weight / factor.unsqueeze(1)
            self._merged_norm = None
        self.weight.copy_(weight - delta)
        self._weight_sq_norm.clear()
        self.merged = False

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}, "
                f"use_dora={self.use_dora}, merged={self.merged}")

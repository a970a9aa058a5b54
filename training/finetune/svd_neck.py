"""SVD adaptation of the encoder neck (RobustMedSAM Sec. 3.4): train only the singular values.

Every convolution ``W`` (C_out x C_in x k x k) of ``image_encoder.neck`` is decomposed once as
``W = U diag(S) V^T`` (``W`` reshaped to C_out x C_in k^2); ``U`` and ``V`` stay frozen and only
``S`` (min(C_out, C_in k^2) values per convolution) is trained; the weight is rebuilt as ``U diag(S') V^T``.
:meth:`SVDNeck.merged_state_dict` writes the adapted weights back under the neck's own key names, so a
checkpoint trained with this option is an ordinary checkpoint of the base architecture.

Training with this option caches the neck's *input* instead of the image embedding (everything before the neck
is frozen) and runs the neck at every step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SVDConv2d(nn.Module):
    """A Conv2d whose weight is ``U diag(S) V^T`` with trainable ``S`` only."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        w = conv.weight.detach().float()
        self.shape = tuple(w.shape)
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        self.register_buffer("u", u)
        self.register_buffer("vh", vh)
        self.singular_values = nn.Parameter(s.clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def weight(self) -> Tensor:
        return ((self.u * self.singular_values) @ self.vh).reshape(self.shape)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class SVDNeck(nn.Module):
    """A copy of ``image_encoder.neck`` with every Conv2d replaced by :class:`SVDConv2d`."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = copy.deepcopy(neck)
        self.conv_names: list[str] = []
        for name, module in list(self.neck.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Conv2d):
                    setattr(module, child_name, SVDConv2d(child))
                    self.conv_names.append(f"{name}.{child_name}" if name else child_name)
        for p in self.neck.parameters():
            p.requires_grad_(False)
        for m in self.neck.modules():
            if isinstance(m, SVDConv2d):
                m.singular_values.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [m.singular_values for m in self.neck.modules() if isinstance(m, SVDConv2d)]

    def forward(self, x: Tensor) -> Tensor:
        return self.neck(x)

    @torch.no_grad()
    def merged_state_dict(self, prefix: str = "image_encoder.neck.") -> dict[str, Tensor]:
        """The adapted neck as plain tensors under the original key names (conv ``weight``/``bias``, norms)."""
        out: dict[str, Tensor] = {}
        for name, module in self.neck.named_modules():
            if isinstance(module, SVDConv2d):
                out[f"{prefix}{name}.weight"] = module.weight().detach().clone()
                if module.bias is not None:
                    out[f"{prefix}{name}.bias"] = module.bias.detach().clone()
        for key, value in self.neck.state_dict().items():
            parts = key.split(".")
            owner = ".".join(parts[:-1])
            if owner in self.conv_names:
                continue  # u / vh / singular_values / bias of an SVD conv: already merged above
            out[prefix + key] = value.detach().clone()
        return out

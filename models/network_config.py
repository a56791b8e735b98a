"""Architecture settings of the global-local network, without torch: model cards load them anywhere."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, model_validator


class NetworkConfig(BaseModel):
    """Architecture of a :class:`models.network.GlobalLocalUNet`; stored in the model card."""

    in_channels: int = 1
    out_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 128)
    kernels: tuple[tuple[int, int, int], ...] = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    norm: str = "instance"
    # 2: a slice-wise plan, the patch is one slice thick and the layers are 2D (the in-plane part of kernels and
    # strides); 3: volumetric layers
    spatial_dims: Literal[2, 3] = 3

    @model_validator(mode="after")
    def _in_plane_when_2d(self) -> NetworkConfig:
        if self.spatial_dims == 2 and any(k[0] != 1 for k in (*self.kernels, *self.strides)):
            raise ValueError("a 2D plan has kernels and strides of depth 1")
        return self

    def in_plane(self, sizes: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, ...], ...]:
        """Kernels or strides as the layers take them: in-plane only for a 2D plan."""
        return tuple(tuple(k[3 - self.spatial_dims :]) for k in sizes)

    @property
    def norm_layer(self) -> tuple:
        """MONAI norm spec; instance and batch norms get learnable affine parameters (adapted by ``tent``)."""
        return (self.norm, {"affine": True})

"""Architecture settings of the global-local network, without torch: model cards load them anywhere."""

from __future__ import annotations

from pydantic import BaseModel


class NetworkConfig(BaseModel):
    """Architecture of a :class:`models.network.GlobalLocalUNet`; stored in the model card."""

    in_channels: int = 1
    out_channels: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 128)
    kernels: tuple[tuple[int, int, int], ...] = ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    strides: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    norm: str = "instance"

    @property
    def norm_layer(self) -> tuple:
        """MONAI norm spec; instance and batch norms get learnable affine parameters (adapted by ``tent``)."""
        return (self.norm, {"affine": True})

"""Global-local 3D UNet for anisotropic scans (MAPSeg's global-local collaboration).

One encoder sees both the local patch and the whole scan downsampled to the patch grid. At the bottleneck the
region of the global features that matches the local patch is cropped, resized to the local grid and fused with
the local features; the decoder segments the fused local features, and an auxiliary head segments the global
view. Kernels are in-plane only (1, 3, 3) and strides leave the slice axis alone in the first levels, as nnU-Net
plans do for thick-slice scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetOutBlock, UnetResBlock, UnetUpBlock
from torch import nn

from models.network_config import NetworkConfig


class GlobalLocalOutput(NamedTuple):
    """Outputs of one global-local forward pass."""

    local_logits: torch.Tensor
    global_logits: torch.Tensor
    local_features: torch.Tensor
    global_context: torch.Tensor


def crop_resize(features: torch.Tensor, box: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the normalised ``box`` (B, 6) out of ``features`` (B, C, D, H, W) and resize it to ``size``.

    Nearest-neighbour sampling through a single gather, so it exports to ONNX with dynamic boxes.
    """
    b, c, d, h, w = features.shape
    axes = []
    for i, (n, m) in enumerate(zip((d, h, w), size, strict=True)):
        lo, hi = box[:, i : i + 1], box[:, i + 3 : i + 4]
        t = (torch.arange(m, device=features.device, dtype=features.dtype) + 0.5) / m
        idx = torch.floor((lo + t * (hi - lo)) * n).clamp(0, n - 1).long()  # (B, m)
        axes.append(idx)
    iz, iy, ix = axes
    flat = (iz[:, :, None, None] * h + iy[:, None, :, None]) * w + ix[:, None, None, :]
    flat = flat.reshape(b, 1, -1).expand(b, c, -1)
    return torch.gather(features.reshape(b, c, -1), 2, flat).reshape(b, c, *size)


class GlobalLocalUNet(nn.Module):
    """Residual encoder-decoder with a shared encoder for the local patch and the global view."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or NetworkConfig()
        ch, k, s, d = cfg.channels, cfg.in_plane(cfg.kernels), cfg.in_plane(cfg.strides), cfg.spatial_dims
        self.encoder = nn.ModuleList(
            UnetResBlock(d, cfg.in_channels if i == 0 else ch[i - 1], ch[i], k[i], s[i], cfg.norm_layer)
            for i in range(len(ch))
        )
        self.fuse = UnetResBlock(d, 2 * ch[-1], ch[-1], 1, 1, cfg.norm_layer)
        self.decoder = nn.ModuleList(
            UnetUpBlock(d, ch[i + 1], ch[i], k[i], 1, s[i + 1], cfg.norm_layer)
            for i in reversed(range(len(ch) - 1))
        )
        # 1x1x1 heads on (B, C, z, y, x) features, whatever the plan's dimensions
        self.head = UnetOutBlock(3, ch[0], cfg.out_channels)
        self.global_head = UnetOutBlock(3, ch[0], cfg.out_channels)
        self.reconstruction_head = UnetOutBlock(3, ch[0], cfg.in_channels)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every level, finest first."""
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def decode(self, feats: list[torch.Tensor], bottleneck: torch.Tensor) -> torch.Tensor:
        """Full-resolution decoder features from the skips and a (possibly fused) bottleneck."""
        x = bottleneck
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            x = block(x, skip)
        return x

    def features(
        self, local: torch.Tensor, global_view: torch.Tensor, box: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder features of the local patch (fused with global context) and of the global view.

        Both views go through the encoder and decoder as one batch, so batch normalisation sees the same mixture
        of local and global statistics in training, in inference and when statistics are re-estimated.
        """
        b, flat = local.shape[0], self.config.spatial_dims == 2
        x = torch.cat([local, global_view], dim=0)
        feats = self.encode(x[:, :, 0] if flat else x)  # a 2D plan's patch is one slice: (B, C, y, x)
        local_bottleneck, global_bottleneck = feats[-1][:b], feats[-1][b:]
        if flat:
            size = (1, *local_bottleneck.shape[2:])
            context = crop_resize(global_bottleneck[:, :, None], box, size)[:, :, 0]
        else:
            context = crop_resize(global_bottleneck, box, local_bottleneck.shape[2:])
        fused = self.fuse(torch.cat([local_bottleneck, context], dim=1))
        decoded = self.decode(feats, torch.cat([fused, global_bottleneck], dim=0))
        if flat:  # back to the (B, C, z, y, x) layout of the rest of the pipeline
            decoded, local_bottleneck, context = (
                decoded[:, :, None],
                local_bottleneck[:, :, None],
                context[:, :, None],
            )
        return decoded[:b], decoded[b:], local_bottleneck, context

    def forward(self, local: torch.Tensor, global_view: torch.Tensor, box: torch.Tensor) -> GlobalLocalOutput:
        """Segment the local patch with global context, and the global view with the auxiliary head."""
        local_dec, global_dec, lf, context = self.features(local, global_view, box)
        return GlobalLocalOutput(self.head(local_dec), self.global_head(global_dec), lf, context)

    def reconstruct(self, local: torch.Tensor, global_view: torch.Tensor, box: torch.Tensor) -> tuple:
        """Intensity reconstructions of both views (masked-autoencoder pretraining)."""
        local_dec, global_dec, _, _ = self.features(local, global_view, box)
        return self.reconstruction_head(local_dec), self.reconstruction_head(global_dec)


class LocalPredictor(nn.Module):
    """Inference wrapper: local logits only; the graph that is exported to ONNX."""

    def __init__(self, net: GlobalLocalUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, local: torch.Tensor, global_view: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        return self.net(local, global_view, box).local_logits


def cosine_consistency(local_features: torch.Tensor, global_context: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity between local bottleneck features and the matching global context."""
    return 1.0 - F.cosine_similarity(local_features, global_context, dim=1).mean()


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def flops_per_patch(net: GlobalLocalUNet, patch: Sequence[int]) -> int:
    """Floating-point operations of one inference pass (local patch + global view) measured by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, net.config.in_channels, *patch)
    box = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    was_training = net.training
    net.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, x, box)
    net.train(was_training)
    return int(counter.get_total_flops())

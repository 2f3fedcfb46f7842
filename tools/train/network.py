"""The PCB defect detector: a small single-image, anchor-free network for 640x640 binarised boards.

Defects are 20-170 px boxes, some only a few pixels of missing or extra copper, so the network keeps full
resolution at the input, predicts on one stride-8 grid (an 80x80 grid at 640 px: every defect box covers at
least 2x2 cells), and gets its context (receptive field > 200 px) from a stride-16/32 pathway folded back into
the stride-8 map. Its exported output follows the YOLOv8/YOLO11 ONNX convention the pipeline expects:
``[B, 4 + num_classes, N]`` with cx, cy, w, h in input pixels, then one sigmoid score per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDE = 8


class ConvBnAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.SiLU(inplace=True),
        )


class Residual(nn.Module):
    """Two 3x3 convolutions with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(ConvBnAct(channels, channels), ConvBnAct(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PcbDefectDetector(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 48, 96, 128)):
        super().__init__()
        w1, w2, w8, w16, w32 = widths
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.stride8 = nn.Sequential(
            ConvBnAct(in_channels, w1, stride=2),
            ConvBnAct(w1, w2, stride=2),
            ConvBnAct(w2, w8, stride=2),
            Residual(w8),
        )
        self.stride16 = nn.Sequential(ConvBnAct(w8, w16, stride=2), Residual(w16))
        self.stride32 = nn.Sequential(ConvBnAct(w16, w32, stride=2), Residual(w32))
        self.lateral32 = ConvBnAct(w32, w16, kernel=1)
        self.fuse16 = ConvBnAct(w16, w16)
        self.lateral16 = ConvBnAct(w16, w8, kernel=1)
        self.fuse8 = ConvBnAct(w8, w8)
        self.head = ConvBnAct(w8, w8)
        self.box_out = nn.Conv2d(w8, 4, 1)
        self.class_out = nn.Conv2d(w8, num_classes, 1)
        # Start with a low class prior (focal-loss practice) so early training is not swamped by background.
        nn.init.constant_(self.class_out.bias, -4.6)

    def raw_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (box distances l,t,r,b in pixels [B,N,4], class logits [B,N,C]) on the stride-8 grid."""
        f8 = self.stride8(images)
        f16 = self.stride16(f8)
        f32 = self.stride32(f16)
        p16 = self.fuse16(f16 + F.interpolate(self.lateral32(f32), size=f16.shape[-2:], mode="nearest"))
        p8 = self.fuse8(f8 + F.interpolate(self.lateral16(p16), size=f8.shape[-2:], mode="nearest"))
        h = self.head(p8)
        distances = F.softplus(self.box_out(h)) * STRIDE
        logits = self.class_out(h)
        return distances.flatten(2).transpose(1, 2), logits.flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The exported contract: [B, 4 + C, N] with cx, cy, w, h in input pixels and sigmoid class scores."""
        distances, logits = self.raw_outputs(images)
        centers = grid_centers(images.shape[-2], images.shape[-1], images.device)
        boxes = distances_to_cxcywh(centers, distances)
        return torch.cat([boxes, logits.sigmoid()], dim=2).transpose(1, 2)


def grid_centers(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel centres [N, 2] (x, y) of the stride-8 cells, row-major as the outputs are flattened."""
    ys, xs = torch.meshgrid(
        torch.arange(height // STRIDE, device=device, dtype=torch.float32),
        torch.arange(width // STRIDE, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return (torch.stack([xs, ys], dim=-1).reshape(-1, 2) + 0.5) * STRIDE


def distances_to_cxcywh(centers: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    left, top, right, bottom = distances.unbind(-1)
    cx = centers[:, 0] + (right - left) / 2
    cy = centers[:, 1] + (bottom - top) / 2
    return torch.stack([cx, cy, left + right, top + bottom], dim=-1)


def distances_to_xyxy(centers: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    left, top, right, bottom = distances.unbind(-1)
    return torch.stack([centers[:, 0] - left, centers[:, 1] - top, centers[:, 0] + right, centers[:, 1] + bottom], -1)

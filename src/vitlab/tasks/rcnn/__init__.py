"""Mask R-CNN on vitlab backbones (ViTDet-style on plain ViTs; FPN on Swin / PVT)."""

"""fla_tl: the linear-attention kernels of flash-linear-attention rebuilt in TileLang."""

__version__ = "0.1.0"

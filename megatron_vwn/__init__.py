"""megatron-vwn: Virtual Width Networks and their family on NVIDIA Megatron-Core."""

__version__ = "0.1.0"

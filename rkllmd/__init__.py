"""rkllmd: the daemon that owns the NPU (or the CPU reference backend) and serves it."""

__version__ = "0.1.0"

"""The NPU as the kernel shows it: its device nodes and its driver's version.

The rknpu driver registers as a DRM driver on current vendor kernels: the NPU is a
``/dev/dri/card*`` node and its ``renderD*`` sibling (``card1``/``renderD129`` on
RK3588), whose ``/sys/class/drm/<node>/device/driver`` is the driver called ``RKNPU``;
the NPU runtime opens those. Older drivers (and some BSPs) provide a misc device,
``/dev/rknpu``. The driver prints its version into ``rknpu/version`` under debugfs
(``CONFIG_ROCKCHIP_RKNPU_DEBUG_FS``, readable by root only) or procfs
(``CONFIG_ROCKCHIP_RKNPU_PROC_FS``), as ``RKNPU driver: v0.9.8``. Sources in docs/npu.md.

Every function takes the roots to look under, so that a check can be pointed at
another tree (the tests do).
"""

from __future__ import annotations

import os
from pathlib import Path

DRIVER_NAME = "rknpu"


def npu_nodes(dev: Path = Path("/dev"), sysfs: Path = Path("/sys")) -> list[Path]:
    """The NPU's device nodes: ``/dev/rknpu`` if present, then the DRM nodes of the rknpu driver."""
    nodes = [dev / "rknpu"] if os.path.exists(dev / "rknpu") else []
    for entry in sorted((sysfs / "class" / "drm").glob("*")):
        if not entry.name.startswith(("card", "renderD")) or "-" in entry.name:  # card1-HDMI-A-1: a connector
            continue
        driver = entry / "device" / "driver"
        node = dev / "dri" / entry.name
        if os.path.exists(driver) and DRIVER_NAME in driver.resolve().name.lower() and os.path.exists(node):
            nodes.append(node)
    return nodes


def driver_version(sysfs: Path = Path("/sys"), proc: Path = Path("/proc")) -> tuple[str | None, str]:
    """The driver's own version line, and where it came from (or why there is none)."""
    candidates = (sysfs / "kernel" / "debug" / "rknpu" / "version", proc / "rknpu" / "version")
    for path in candidates:
        try:
            return path.read_text().strip(), str(path)
        except OSError:
            continue
    return None, f"none readable: {candidates[0]} (debugfs, root only), {candidates[1]} (procfs builds only)"

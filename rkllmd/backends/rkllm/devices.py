"""The NPU as the kernel shows it: its device nodes, its driver and that driver's version.

The vendor's rknpu driver registers as a DRM driver on current vendor kernels: the NPU is
a ``/dev/dri/card*`` node and its ``renderD*`` sibling (``card1``/``renderD129`` on
RK3588), whose ``/sys/class/drm/<node>/device/driver`` is the driver called ``RKNPU``;
the NPU runtime opens those. Older drivers (and some BSPs) provide a misc device,
``/dev/rknpu``.

The driver's version, as its source (``rknpu_driver_0.9.8_20241009.tar.bz2`` of
airockchip/rknn-llm) publishes it: ``MODULE_VERSION("0.9.8")`` in ``rknpu_drv.c``, which
the kernel shows to anyone as ``/sys/module/rknpu/version``; and ``RKNPU driver: v0.9.8``
in ``rknpu/version`` under debugfs (``CONFIG_ROCKCHIP_RKNPU_DEBUG_FS``, on by default;
debugfs is readable by root only) or procfs (``CONFIG_ROCKCHIP_RKNPU_PROC_FS``). Drivers
older than the module version give only the debugfs file. Mainline Linux (6.18 on) drives
the same NPU with another driver, ``rocket`` (DRM accel: ``/dev/accel/accel0``), which the
vendor runtime cannot use. Sources in docs/npu.md.

Every function takes the roots to look under, so that a check can be pointed at another
tree (the tests build one; ``rkllmd check --root``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DRIVER_NAME = "rknpu"
MAINLINE_DRIVER = "rocket"


def npu_nodes(dev: Path = Path("/dev"), sysfs: Path = Path("/sys")) -> list[Path]:
    """The NPU's device nodes: ``/dev/rknpu`` if present, then the DRM nodes of the rknpu driver."""
    nodes = [dev / "rknpu"] if os.path.exists(dev / "rknpu") else []
    for entry in _entries(sysfs / "class" / "drm", ""):
        if not entry.name.startswith(("card", "renderD")) or "-" in entry.name:  # card1-HDMI-A-1: a connector
            continue
        driver = entry / "device" / "driver"
        node = dev / "dri" / entry.name
        if os.path.exists(driver) and DRIVER_NAME in driver.resolve().name.lower() and os.path.exists(node):
            nodes.append(node)
    return nodes


@dataclass(frozen=True)
class Driver:
    """What can be known of the NPU driver without opening the device."""

    #: (major, minor, patch), or None when no file said it.
    version: tuple[int, int, int] | None
    #: The line read, as the driver wrote it ("RKNPU driver: v0.9.8", "0.9.8").
    text: str | None
    #: The file it was read from, or None.
    source: str | None
    #: Why no version could be read (None when one was).
    why: str | None
    #: Mainline's rocket driver holds the NPU (what shows it), or None.
    mainline: str | None

    def describe(self) -> dict[str, object]:
        return {"version": ".".join(map(str, self.version)) if self.version else None, "text": self.text,
                "source": self.source, "why_unreadable": self.why, "mainline_driver": self.mainline}


def read_driver(sysfs: Path = Path("/sys"), proc: Path = Path("/proc"), dev: Path = Path("/dev")) -> Driver:
    """The driver's version from the first file that gives it: the module's version (anyone
    may read it), debugfs (root), procfs; else why none could be read."""
    mainline = mainline_driver(sysfs, dev)
    debugfs = sysfs / "kernel" / "debug"
    candidates = (sysfs / "module" / DRIVER_NAME / "version", debugfs / DRIVER_NAME / "version", proc / DRIVER_NAME / "version")
    refused = None
    for path in candidates:
        try:
            text = path.read_text().strip()
        except PermissionError:
            refused = refused or path
            continue
        except OSError:
            continue
        found = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
        if found:
            return Driver(tuple(int(n) for n in found.groups()), text, str(path), None, mainline)  # type: ignore[arg-type]
    return Driver(None, None, None, _why_unreadable(sysfs, proc, debugfs, refused, mainline), mainline)


def _why_unreadable(sysfs: Path, proc: Path, debugfs: Path, refused: Path | None, mainline: str | None) -> str:
    if mainline is not None:
        return f"the NPU is driven by mainline Linux's {MAINLINE_DRIVER} driver ({mainline}), not the vendor's {DRIVER_NAME}"
    if refused is not None:
        return f"{refused} is readable by root only (debugfs): run rkllmd check with sudo"
    mount = "" if _mounted(proc, "debugfs") else f"; debugfs is not mounted (sudo mount -t debugfs none {debugfs})"
    if not _driver_bound(sysfs):
        return f"no {DRIVER_NAME} driver is loaded{mount}"
    if mount:
        return f"the driver declares no module version (older ones show it only in debugfs){mount}"
    return f"the driver shows no version: no module version, no {debugfs}/{DRIVER_NAME}/version (built without CONFIG_ROCKCHIP_RKNPU_DEBUG_FS)"


def _driver_bound(sysfs: Path) -> bool:
    """Whether the kernel has the rknpu driver: its module entry, or a DRM device it drives."""
    if os.path.exists(sysfs / "module" / DRIVER_NAME):
        return True
    drivers = ((entry / "device" / "driver") for entry in _entries(sysfs / "class" / "drm", ""))
    return any(os.path.exists(d) and DRIVER_NAME in d.resolve().name.lower() for d in drivers)


def mainline_driver(sysfs: Path = Path("/sys"), dev: Path = Path("/dev")) -> str | None:
    """What shows mainline's ``rocket`` driver holding the NPU (its module, an accel node of
    it), or None."""
    if os.path.exists(sysfs / "module" / MAINLINE_DRIVER):
        return str(sysfs / "module" / MAINLINE_DRIVER)
    for entry in _entries(sysfs / "class" / "accel", "accel"):
        driver = entry / "device" / "driver"
        if os.path.exists(driver) and driver.resolve().name == MAINLINE_DRIVER:
            return str(dev / "accel" / entry.name)
    return None


def _entries(folder: Path, prefix: str) -> list[Path]:
    """``folder``'s entries starting with ``prefix``, sorted; none where it cannot be listed."""
    try:
        return sorted(folder / name for name in os.listdir(folder) if name.startswith(prefix))
    except OSError:
        return []


def _mounted(proc: Path, fstype: str) -> bool:
    """Whether a filesystem of ``fstype`` is mounted (/proc/self/mounts); True when it cannot be told."""
    try:
        lines = (proc / "self" / "mounts").read_text().splitlines()
    except OSError:
        return True
    return any(len(fields) > 2 and fields[2] == fstype for fields in (line.split() for line in lines))


def board_soc(sysfs: Path = Path("/sys")) -> str | None:
    """The SoC the device tree names ("rk3588", "rk3576", ...; an RK3588S is an RK3588 to the
    NPU), or None off a Rockchip board."""
    try:
        compatible = (sysfs / "firmware" / "devicetree" / "base" / "compatible").read_bytes()
    except OSError:
        return None
    for entry in compatible.split(b"\0"):
        found = re.fullmatch(rb"rockchip,(r[kv]\d{4}[a-z]?)", entry)
        if found:
            return soc_family(found.group(1).decode())
    return None


def soc_family(name: str) -> str:
    """The NPU's platform name of a SoC: "rk3588s" -> "rk3588"."""
    name = name.lower()
    return name[:-1] if re.fullmatch(r"rk35\d\ds", name) else name

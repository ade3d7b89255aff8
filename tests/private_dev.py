"""A board's /dev on a machine without an NPU: a command run in a private mount namespace
(``unshare -m``, root only) whose /dev holds the usual nodes and, when asked, /dev/rknpu
(the numbers of /dev/null, with the mode given) and the driver's version file in a
private debugfs. Nothing of it is visible outside the command.
"""

from __future__ import annotations

import os
import shutil

from conftest import skip_without

SCRIPT = r"""
set -e
mode=$1; shift
dev=$(mktemp -d /tmp/rkdev.XXXXXX)
mount -t tmpfs -o mode=0755 rkdev "$dev"
for n in null zero full random urandom tty; do touch "$dev/$n"; mount --bind "/dev/$n" "$dev/$n"; done
ln -s /proc/self/fd "$dev/fd"
mkdir "$dev/shm" "$dev/pts"
if [ "$mode" != none ]; then
    mknod -m "$mode" "$dev/rknpu" c 1 3
    mount -t tmpfs -o mode=0700 rkdebug /sys/kernel/debug
    mkdir /sys/kernel/debug/rknpu
    echo "RKNPU driver: v0.9.8" > /sys/kernel/debug/rknpu/version
fi
mount --move "$dev" /dev
rmdir "$dev"
exec "$@"
"""


def needs_namespaces() -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        skip_without("root and unshare(1), for a private mount namespace")


def prefix(npu_mode: str | None) -> list[str]:
    """The command prefix: /dev/rknpu with ``npu_mode`` (e.g. "0660"), or none at all."""
    needs_namespaces()
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRIPT, "sh", npu_mode or "none"]

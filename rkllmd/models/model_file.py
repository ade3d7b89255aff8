"""Whether a pulled file is a model this daemon can run, as far as the file tells.

A ``.gguf`` starts with the magic ``GGUF``. A ``.rkllm`` starts with the format's magic
(``MODEL_MAGIC``) and ends with the release of rkllm-toolkit that converted it ("rkllm-toolkit
version: 1.2.1", docs/npu.md); the platform it was converted for is not in any documented
part of the file, but converters name it in the file's name ("..._w8a8_rk3588.rkllm"). The
rules are the runtime's own (docs/npu.md, step 5): a model of another platform fails at init,
a toolkit newer than the runtime or older than 1.1.0 is refused. ``rkllmd check`` warns about
the same facts of the configured model; a pull refuses them before the file is a model.
"""

from __future__ import annotations

from pathlib import Path

from ..backends.rkllm import devices
from ..backends.rkllm.backend import MODEL_MAGIC
from ..backends.rkllm.library import RkllmStartupError, find_library, read_markers
from ..check import NAMED_PLATFORM, OLDEST_TOOLKIT, TOOLKIT_FOOTER, _release, _what_is
from ..config import Config
from ..protocol import ErrorCode, WireError

GGUF_MAGIC = b"GGUF"
SUFFIXES = (".gguf", ".rkllm")
HEAD_BYTES = 4
TAIL_BYTES = 64


def refused(reason: str, message: str) -> WireError:
    return WireError(ErrorCode.MODEL_FILE, message, reason=reason)


def check_name(file: str) -> None:
    """A ``.gguf`` (the CPU backend's) or ``.rkllm`` (the NPU's) name, or ``not_a_model_file``."""
    if not file.lower().endswith(SUFFIXES):
        raise refused("not_a_model_file", f"{file} is not a model file: rkllmd runs .gguf files (CPU) and .rkllm files (NPU)")


def check_head(file: str, head: bytes) -> None:
    """The file's first bytes are its format's magic, or ``magic``."""
    rkllm = file.lower().endswith(".rkllm")
    magic = MODEL_MAGIC if rkllm else GGUF_MAGIC
    if head[: len(magic)] != magic:
        what = _what_is(head) if rkllm else f"its first bytes are {head.hex(' ')}, not the magic {magic.hex(' ')} (GGUF)"
        raise refused("magic", f"{file} is not a {'converted .rkllm model' if rkllm else 'GGUF file'}: {what}")


def npu_platform(config: Config) -> str | None:
    """The SoC the NPU's models are for: ``[rkllm] platform``, else the board's (None off a board)."""
    configured = config.rkllm.platform.strip()
    return devices.soc_family(configured) if configured else devices.board_soc()


def runtime_release(config: Config) -> str | None:
    """The release of the runtime library rkllmd would load (None: none found, or it does not say)."""
    try:
        path = find_library(Path(config.rkllm.library).expanduser() if config.rkllm.library else None)
        markers = read_markers(path)
    except (RkllmStartupError, OSError):
        return None
    return markers[0].release if len(markers) == 1 else None


def check_platform(file: str, platform: str | None) -> None:
    """A ``.rkllm`` whose name says another platform than ours: ``platform``."""
    named = {devices.soc_family(m) for m in NAMED_PLATFORM.findall(Path(file).name)}
    if file.lower().endswith(".rkllm") and platform is not None and len(named) == 1 and named != {platform}:
        raise refused("platform", f"{file} was converted for {named.pop()} (its name says), but this NPU is {platform}: the runtime would refuse it "
                                  "(\"The model target_platform does not match!\"); pull the model converted for " + platform)


def check_toolkit(path: Path, file: str, runtime: str | None) -> str | None:
    """The toolkit release a ``.rkllm`` ends with; ``toolkit`` when the runtime cannot run it."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        found = TOOLKIT_FOOTER.search(f.read(TAIL_BYTES))
    toolkit = found.group(1).decode() if found else None
    made, runs = _release(toolkit), _release(runtime)
    if made is not None and made < OLDEST_TOOLKIT:
        raise refused("toolkit", f"{file} was converted by rkllm-toolkit {toolkit}, whose models runtimes from 1.1.0 refuse "
                                 "(\"the model version is too old, please use the latest toolkit to reconvert the model\")")
    if made is not None and runs is not None and made > runs:
        raise refused("toolkit", f"{file} was converted by rkllm-toolkit {toolkit}, newer than this runtime ({runtime}); it would refuse it "
                                 "(\"The rkllm-runtime version is lower than the rkllm-toolkit version\")")
    return toolkit

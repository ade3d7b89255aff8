"""Backends, and the one place that decides which one runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import Config
from ..models.registry import Model
from ..templates import TemplateError
from .base import Backend, BackendError


def _path(value: str) -> Path | None:
    return Path(value).expanduser() if value else None


def pick(config: Config) -> tuple[str, str]:
    """The backend kind ``daemon.backend`` leads to here ("cpu" or "rkllm"), and a sentence
    saying why (shown by status and ``rkllmd check``). Nothing is loaded."""
    wanted = config["daemon.backend"]  # one of config.BACKENDS: the typed configuration checked it
    if wanted != "auto":
        return wanted, "requested by configuration"
    from .rkllm.backend import detect

    usable, why = detect(_path(config["rkllm.library"]), _path(config["rkllm.model"]))
    if usable:
        return "rkllm", f"auto: {why}"
    return "cpu", f"auto: NPU backend not usable ({why}); using the CPU reference backend"


def choose(
    config: Config, weights_dir: Path | None = None, kernels_dir: Path | None = None
) -> tuple[Backend, str]:
    """The backend ``pick`` names, configured, and the reason.

    ``weights_dir``: where the CPU backend keeps dequantized weights between starts (None:
    nowhere); ``kernels_dir``: where it keeps its compiled decode step (None: built per process).
    """
    kind, reason = pick(config)
    if kind == "rkllm":
        from .rkllm.backend import RkllmBackend

        try:
            backend = RkllmBackend(
                model_path=_path(config["rkllm.model"]),
                library=_path(config["rkllm.library"]),
                runtime=config["rkllm.runtime"],
                template=config["rkllm.template"],
                context_length=config["model.context_length"],
                max_new_tokens=config["rkllm.max_new_tokens"],
                n_keep=config["rkllm.n_keep"],
                cpu_mask=config["rkllm.cpu_mask"],
                base_domain_id=config["rkllm.base_domain_id"],
                temperature=config["sampling.temperature"],
                top_k=config["sampling.top_k"],
                top_p=config["sampling.top_p"],
                repeat_penalty=config["sampling.repeat_penalty"],
                frequency_penalty=config["sampling.frequency_penalty"],
                presence_penalty=config["sampling.presence_penalty"],
                tokenizer=_path(config["rkllm.tokenizer"]),
            )
        except (ValueError, TemplateError) as exc:  # rkllm.template or rkllm.runtime is unusable
            raise BackendError(f"[rkllm] {exc}") from None
        backend.embedding_only = config["model.embedding_only"]
        return backend, reason
    from .cpu.backend import CpuBackend

    backend = CpuBackend(
        model_path=_path(config["model.path"]),
        context_length=config["model.context_length"],
        prefill_chunk=config["model.prefill_chunk"],
        weights_dir=weights_dir,
        kernels_dir=kernels_dir,
        kernels_mode=config["model.kernels"],
        chat_template=config["model.chat_template"],
        weights_huge_pages=config["model.weights_huge_pages"],
    )
    backend.embedding_only = config["model.embedding_only"]
    return backend, reason


def config_for(config: Config, model: Model) -> Config:
    """The configuration that loads ``model``'s weights file with the default model's
    other settings: a .rkllm file on the NPU, a .gguf file on the CPU backend. A .rkllm
    model's tokenizer is its own (``[models.NAME] tokenizer``), never the default model's:
    without one its token counts are bounded (docs/npu.md, "The context")."""
    if model.path.endswith(".rkllm"):
        return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, backend="rkllm"),
                                   rkllm=dataclasses.replace(config.rkllm, model=model.path, template=model.template or config.rkllm.template,
                                                             tokenizer=model.tokenizer),
                                   model=dataclasses.replace(config.model, embedding_only=model.embedding_only))
    return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon, backend="cpu"),
                               model=dataclasses.replace(config.model, path=model.path, chat_template=model.template, embedding_only=model.embedding_only))


def memory_estimate(config: Config) -> int:
    """Bytes the model ``config`` loads takes in memory, as the pool's ``daemon.models_memory_mb``
    counts it, read from the file's header without loading it: on the NPU, the .rkllm file
    (the runtime maps it whole); on the CPU backend, its weights as float32 (a Q4_1 file
    takes about 6 times its size) plus one context of KV cache. An unreadable file counts
    its size: loading it fails with the reason."""
    if pick(config)[0] == "rkllm":
        return _size(_path(config["rkllm.model"]))
    from .cpu.backend import bundled_model_path
    from .cpu.gguf import GGUFError, GGUFFile
    from .cpu.architecture import ModelConfig

    path = _path(config["model.path"]) or bundled_model_path()
    try:
        gguf = GGUFFile(path)  # type: ignore[arg-type]
    except (GGUFError, TypeError):
        return _size(path)
    try:
        weights = 4 * sum(tensor.n_elements for tensor in gguf.tensors.values())
        return weights + config["model.context_length"] * ModelConfig.from_gguf_metadata(gguf.metadata).kv_bytes_per_token
    except (KeyError, ValueError):
        return _size(path)
    finally:
        gguf.close()


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path else 0
    except OSError:
        return 0

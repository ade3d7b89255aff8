"""ctypes mirror of the RKLLM runtime's C interface (``rkllm.h``), per interface generation.

Two generations are in use on boards: "1.2" (releases 1.2.1-1.2.3) and "1.3" (1.3.0);
``library.RELEASES`` maps a library's release to its generation.
They share most structs but differ in ``RKLLMParam``, ``RKLLMInput``, ``RKLLMInferParam``
and in the third argument of ``rkllm_init`` (a function pointer in 1.2, a pointer to an
``RKLLMCallback`` struct in 1.3). A layout that differs from the vendor header by one
byte silently corrupts memory, so every definition here is checked field by field
against sizes measured from the vendor headers (``tests/test_rkllm_abi.py``), and

    python -m rkllmd.backends.rkllm.abi --layout 1.2|1.3|<release>

prints our sizes, alignments and offsets in the same JSON shape as those measurements,
so a new vendor header can be checked against this module before anyone runs it.

Conventions that keep the layout right on both LP64 (aarch64) and ILP32 (armhf):
pointers are ctypes pointer types, ``size_t`` is ``c_size_t``, C++ ``bool`` is
``c_bool``, C enums are ``c_int``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

# --- enums (C int) -------------------------------------------------------------------
# LLMCallState. These numbers changed after 1.0.x (FINISH used to be 1).
RKLLM_RUN_NORMAL = 0
RKLLM_RUN_WAITING = 1  # the text is an incomplete UTF-8 sequence, joined with the next
RKLLM_RUN_FINISH = 2  # the perf stats are filled only on this callback
RKLLM_RUN_ERROR = 3

# RKLLMInputType
RKLLM_INPUT_PROMPT = 0
RKLLM_INPUT_TOKEN = 1
RKLLM_INPUT_EMBED = 2
RKLLM_INPUT_MULTIMODAL = 3

# RKLLMInferMode
RKLLM_INFER_GENERATE = 0
RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
RKLLM_INFER_GET_LOGITS = 2

# What the result callback returns to the runtime.
CALLBACK_CONTINUE = 0
CALLBACK_PAUSE = 1  # stop this generation after the current token
CALLBACK_FREE_OUTPUT = 2  # 1.3 only: free the current output buffer

GENERATIONS = ("1.2", "1.3")
# Release tag -> interface generation, for every release whose header was measured
# (tests/data/rkllm_layouts.json) or equals a measured one field for field (1.2.2 only
# renames a type).
RELEASES = {"1.2.1": "1.2", "1.2.2": "1.2", "1.2.3": "1.2", "1.3.0": "1.3"}
# The vendor renamed one struct between releases without changing it.
_RELEASE_STRUCT_NAMES = {release: {"RKLLMMultiModalInput": "RKLLMMultiModelInput"} for release in ("1.2.1", "1.2.2")}


# --- structs shared by both generations ----------------------------------------------
class RKLLMExtendParam(Structure):
    _fields_ = [
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    ]


class RKLLMLoraAdapter(Structure):
    _fields_ = [
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    ]


class RKLLMEmbedInput(Structure):
    _fields_ = [("embed", POINTER(c_float)), ("n_tokens", c_size_t)]


class RKLLMTokenInput(Structure):
    _fields_ = [("input_ids", POINTER(c_int32)), ("n_tokens", c_size_t)]


class RKLLMLoraParam(Structure):
    _fields_ = [("lora_adapter_name", c_char_p)]


class RKLLMPromptCacheParam(Structure):
    _fields_ = [("save_prompt_cache", c_int), ("prompt_cache_path", c_char_p)]


class RKLLMCrossAttnParam(Structure):
    _fields_ = [
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    ]


class RKLLMResultLastHiddenLayer(Structure):
    _fields_ = [("hidden_states", POINTER(c_float)), ("embd_size", c_int), ("num_tokens", c_int)]


class RKLLMResultLogits(Structure):
    _fields_ = [("logits", POINTER(c_float)), ("vocab_size", c_int), ("num_tokens", c_int)]


class RKLLMPerfStat(Structure):
    _fields_ = [
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    ]


class RKLLMResult(Structure):
    _fields_ = [
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    ]


# int cb(RKLLMResult*, void* userdata, LLMCallState state), in both generations.
ResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, c_int)

# --- generation 1.2 (1.2.1-1.2.3) ----------------------------------------------------


class RKLLMParam12(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    ]


class RKLLMMultiModalInput12(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class _RKLLMInputUnion12(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput12),
    ]


class RKLLMInput12(Structure):
    _anonymous_ = ("_input",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_int),
        ("_input", _RKLLMInputUnion12),
    ]


class RKLLMInferParam12(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    ]


# --- generation 1.3 (1.3.0) ----------------------------------------------------------


class RKLLMParam13(Structure):
    _fields_ = [
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("ignore_eos_token", c_bool),
        ("is_async", c_bool),
        ("extend_param", RKLLMExtendParam),
    ]


class _RKLLMImageInput13(Structure):
    _fields_ = [
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_start", c_char_p),
        ("image_end", c_char_p),
        ("image_content", c_char_p),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    ]


class _RKLLMVideoInput13(Structure):
    _fields_ = [
        ("video_embed", POINTER(c_float)),
        ("n_frame_tokens", c_size_t),
        ("n_frame_per_video", c_size_t),
        ("n_video", c_size_t),
        ("video_start", c_char_p),
        ("video_end", c_char_p),
        ("video_content", c_char_p),
        ("frame_width", c_size_t),
        ("frame_height", c_size_t),
    ]


class RKLLMMultiModalInput13(Structure):
    _fields_ = [
        ("prompt", c_char_p),
        ("image", _RKLLMImageInput13),
        ("video", _RKLLMVideoInput13),
    ]


class _RKLLMInputUnion13(Union):
    _fields_ = [
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput13),
    ]


class RKLLMInput13(Structure):
    _anonymous_ = ("_input",)
    _fields_ = [
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_int),
        ("_input", _RKLLMInputUnion13),
    ]


class RKLLMSamplingParam(Structure):
    _fields_ = [
        ("top_k", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
    ]


class RKLLMInferParam13(Structure):
    _fields_ = [
        ("mode", c_int),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("sampling_params", POINTER(RKLLMSamplingParam)),  # NULL: the init values
        ("keep_history", c_int),
        ("max_new_tokens", c_int32),  # <= 0: the init value
    ]


# int tokenizer(void* userdata, const char* text, int32_t text_len, int32_t* tokens, int32_t n_max)
TokenizerCallback = CFUNCTYPE(c_int, c_void_p, c_char_p, c_int32, POINTER(c_int32), c_int32)
# int embed(void* userdata, int32_t* tokens, uint64_t num_tokens, void* embed, uint64_t len)
EmbedCallback = CFUNCTYPE(c_int, c_void_p, POINTER(c_int32), c_uint64, c_void_p, c_uint64)


class RKLLMCallback(Structure):
    _fields_ = [
        ("result_callback", ResultCallback),
        ("result_userdata", c_void_p),
        ("tokenizer_callback", TokenizerCallback),
        ("tokenizer_userdata", c_void_p),
        ("embed_callback", EmbedCallback),
        ("embed_userdata", c_void_p),
    ]


# --- one generation's view -----------------------------------------------------------
LLMHandle = c_void_p


@dataclass(frozen=True)
class Abi:
    """Everything that differs between generations, plus the struct table for ``--layout``.

    ``callback_arg`` is the ctypes type of ``rkllm_init``'s third argument: the result
    callback itself in 1.2, a pointer to ``RKLLMCallback`` in 1.3.
    """

    generation: str
    RKLLMParam: type[Structure]
    RKLLMInput: type[Structure]
    RKLLMInferParam: type[Structure]
    callback_arg: Any
    per_request_sampling: bool  # RKLLMInferParam has sampling_params and max_new_tokens
    structs: dict[str, type[Structure]]

    def prototypes(self) -> dict[str, tuple[Any, list[Any]]]:
        """Every exported function: name -> (restype, argtypes)."""
        h = LLMHandle
        return {
            "rkllm_createDefaultParam": (self.RKLLMParam, []),
            "rkllm_init": (c_int, [POINTER(LLMHandle), POINTER(self.RKLLMParam), self.callback_arg]),
            "rkllm_load_lora": (c_int, [h, POINTER(RKLLMLoraAdapter)]),
            "rkllm_load_prompt_cache": (c_int, [h, c_char_p]),
            "rkllm_release_prompt_cache": (c_int, [h]),
            "rkllm_destroy": (c_int, [h]),
            "rkllm_run": (c_int, [h, POINTER(self.RKLLMInput), POINTER(self.RKLLMInferParam), c_void_p]),
            "rkllm_run_async": (c_int, [h, POINTER(self.RKLLMInput), POINTER(self.RKLLMInferParam), c_void_p]),
            "rkllm_abort": (c_int, [h]),
            "rkllm_is_running": (c_int, [h]),
            "rkllm_clear_kv_cache": (c_int, [h, c_int, POINTER(c_int), POINTER(c_int)]),
            "rkllm_get_kv_cache_size": (c_int, [h, POINTER(c_int)]),
            "rkllm_set_chat_template": (c_int, [h, c_char_p, c_char_p, c_char_p]),
            "rkllm_set_function_tools": (c_int, [h, c_char_p, c_char_p, c_char_p]),
            "rkllm_set_cross_attn_params": (c_int, [h, POINTER(RKLLMCrossAttnParam)]),
        }


_SHARED = {
    "RKLLMExtendParam": RKLLMExtendParam,
    "RKLLMLoraAdapter": RKLLMLoraAdapter,
    "RKLLMEmbedInput": RKLLMEmbedInput,
    "RKLLMTokenInput": RKLLMTokenInput,
    "RKLLMLoraParam": RKLLMLoraParam,
    "RKLLMPromptCacheParam": RKLLMPromptCacheParam,
    "RKLLMCrossAttnParam": RKLLMCrossAttnParam,
    "RKLLMResultLastHiddenLayer": RKLLMResultLastHiddenLayer,
    "RKLLMResultLogits": RKLLMResultLogits,
    "RKLLMPerfStat": RKLLMPerfStat,
    "RKLLMResult": RKLLMResult,
}

ABI: dict[str, Abi] = {
    "1.2": Abi(
        generation="1.2",
        RKLLMParam=RKLLMParam12,
        RKLLMInput=RKLLMInput12,
        RKLLMInferParam=RKLLMInferParam12,
        callback_arg=ResultCallback,
        per_request_sampling=False,
        structs={
            **_SHARED,
            "RKLLMParam": RKLLMParam12,
            "RKLLMMultiModalInput": RKLLMMultiModalInput12,
            "RKLLMInput": RKLLMInput12,
            "RKLLMInferParam": RKLLMInferParam12,
        },
    ),
    "1.3": Abi(
        generation="1.3",
        RKLLMParam=RKLLMParam13,
        RKLLMInput=RKLLMInput13,
        RKLLMInferParam=RKLLMInferParam13,
        callback_arg=POINTER(RKLLMCallback),
        per_request_sampling=True,
        structs={
            **_SHARED,
            "RKLLMParam": RKLLMParam13,
            "RKLLMMultiModalInput": RKLLMMultiModalInput13,
            "RKLLMInput": RKLLMInput13,
            "RKLLMInferParam": RKLLMInferParam13,
            "RKLLMSamplingParam": RKLLMSamplingParam,
            "RKLLMCallback": RKLLMCallback,
        },
    ),
}


def struct_layout(cls: type[Structure]) -> dict[str, int]:
    """``{size, align, field: offset}`` with anonymous unions' members listed by name."""
    out = {"size": ctypes.sizeof(cls), "align": ctypes.alignment(cls)}
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for name, ftype, *_ in cls._fields_:
        base = getattr(cls, name).offset
        if name in anonymous:
            for member, *_ in ftype._fields_:
                out[member] = base + getattr(ftype, member).offset
        else:
            out[name] = base
    return out


def layout(version: str) -> dict[str, dict[str, int]]:
    """Our layout for a generation ("1.2") or a release ("1.2.1"), named as that release names it."""
    generation = RELEASES.get(version, version)
    if generation not in ABI:
        raise ValueError(f"unknown RKLLM interface {version!r}; known: {', '.join([*GENERATIONS, *RELEASES])}")
    renames = _RELEASE_STRUCT_NAMES.get(version, {})
    return {renames.get(name, name): struct_layout(cls) for name, cls in ABI[generation].structs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rkllmd.backends.rkllm.abi",
        description="Print our ctypes structs' sizes, alignments and field offsets as JSON.",
    )
    parser.add_argument("--layout", required=True, metavar="VERSION", choices=[*GENERATIONS, *RELEASES],
                        help="interface generation (1.2, 1.3) or release tag (1.2.1, 1.2.2, 1.2.3, 1.3.0)")
    args = parser.parse_args(argv)
    json.dump(layout(args.layout), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

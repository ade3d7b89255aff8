"""tools/rkllm_layouts.py on headers written here: a header in the vendor's style (C++,
extern "C", enums, callback typedefs, comments, an anonymous union) declaring the 1.2.3
structs as documented (../shared/rkllm-abi/README.md), and altered copies of it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "data" / "rkllm_layouts.json"

HEADER_1_2_3 = """\
#ifndef _RKLLM_H_
#define _RKLLM_H_
#include <cstddef>
#include <cstdint>
#ifdef __cplusplus
extern "C" {
#endif
typedef void* LLMHandle;
typedef enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 } LLMCallState;
typedef enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_EMBED = 2,
               RKLLM_INPUT_MULTIMODAL = 3 } RKLLMInputType;
typedef enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
               RKLLM_INFER_GET_LOGITS = 2 } RKLLMInferMode;

/* Extended parameters: {cpus} and friends. */
typedef struct {
    int32_t base_domain_id;   // memory domain
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char* model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
    int32_t n_keep;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
    bool is_async;
    const char* img_start;
    const char* img_end;
    const char* img_content;
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct { const char* lora_adapter_path; const char* lora_adapter_name; float scale; } RKLLMLoraAdapter;
typedef struct { float* embed; size_t n_tokens; } RKLLMEmbedInput;
typedef struct { int32_t* input_ids; size_t n_tokens; } RKLLMTokenInput;
typedef struct {
    char* prompt;
    float* image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;

typedef struct {
    const char* role;
    bool enable_thinking;
    RKLLMInputType input_type;
    union {
        const char* prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct { const char* lora_adapter_name; } RKLLMLoraParam;
typedef struct {
    int save_prompt_cache;
    const char* prompt_cache_path;
} RKLLMPromptCacheParam;
typedef struct {
    float* encoder_k_cache; float* encoder_v_cache; float* encoder_mask; int32_t* encoder_pos; int num_tokens;
} RKLLMCrossAttnParam;
typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam* lora_params;
    RKLLMPromptCacheParam* prompt_cache_params;
    int keep_history;
} RKLLMInferParam;
typedef struct { const float* hidden_states; int embd_size; int num_tokens; } RKLLMResultLastHiddenLayer;
typedef struct { const float* logits; int vocab_size; int num_tokens; } RKLLMResultLogits;
typedef struct {
    float prefill_time_ms; int prefill_tokens; float generate_time_ms; int generate_tokens; float memory_usage_mb;
} RKLLMPerfStat;
typedef struct {
    const char* text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int(*LLMResultCallback)(RKLLMResult* result, void* userdata, LLMCallState state);
int rkllm_init(LLMHandle* handle, RKLLMParam* param, LLMResultCallback callback);
#ifdef __cplusplus
}
#endif
#endif
"""

SWAPPED = HEADER_1_2_3.replace(
    "    int save_prompt_cache;\n    const char* prompt_cache_path;",
    "    const char* prompt_cache_path;\n    int save_prompt_cache;",
)


@pytest.fixture(autouse=True)
def needs_a_cxx_compiler():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.fail("the layouts tool needs a C++ compiler (g++)")


def headers(folder: Path, releases: dict[str, str]) -> Path:
    """``folder/<release>/include/rkllm.h`` for each release."""
    for release, text in releases.items():
        path = folder / release / "include" / "rkllm.h"
        path.parent.mkdir(parents=True)
        path.write_text(text)
    return folder


def tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "rkllm_layouts.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_the_documented_header_matches_the_table(tmp_path):
    out = tool(str(headers(tmp_path, {"1.2.3": HEADER_1_2_3})))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == "the table matches the headers"
    assert "1.2.3: 15 structs measured from" in out.stdout


def test_a_header_that_differs_is_reported_field_by_field(tmp_path):
    out = tool(str(headers(tmp_path, {"1.2.3": SWAPPED})))
    assert out.returncode == 1
    assert "1.2.3: RKLLMPromptCacheParam.save_prompt_cache: header 8, table 0" in out.stdout
    assert "1.2.3: RKLLMPromptCacheParam.prompt_cache_path: header 0, table 8" in out.stdout
    assert out.stdout.splitlines()[-1] == "2 differences"


def test_write_adds_a_release_and_keeps_the_rest(tmp_path):
    table = tmp_path / "layouts.json"
    shutil.copy(TABLE, table)
    out = tool(str(headers(tmp_path / "h", {"1.2.3": HEADER_1_2_3, "1.2.9": SWAPPED})), "--table", str(table), "--write")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1.2.9: not in the table" in out.stdout
    written = json.loads(table.read_text())
    original = json.loads(TABLE.read_text())
    assert list(written["releases"]) == ["1.2.1", "1.2.3", "1.2.9", "1.3.0"]
    assert {k: v for k, v in written["releases"].items() if k != "1.2.9"} == original["releases"]
    assert written["releases"]["1.2.9"]["RKLLMPromptCacheParam"] == {
        "size": 16, "align": 8, "prompt_cache_path": 0, "save_prompt_cache": 8}
    assert table.read_text() == json.dumps(written, indent=1)  # the table's own format

    rewritten = tmp_path / "again.json"
    shutil.copy(TABLE, rewritten)
    assert tool(str(headers(tmp_path / "h2", {"1.2.3": HEADER_1_2_3})), "--table", str(rewritten), "--write").returncode == 0
    assert rewritten.read_bytes() == TABLE.read_bytes()  # measuring the same header changes nothing


def test_a_folder_without_headers_is_refused(tmp_path):
    out = tool(str(tmp_path))
    assert out.returncode == 2 and "no <release>/.../rkllm.h under" in out.stderr

/*
 * A fake librkllmrt.so for rkllmd's tests: the vendor's exported functions with the
 * vendor's signatures, for one interface generation chosen at build time
 * (cc -shared -fPIC -DRKLLM_ABI=12 or -DRKLLM_ABI=13), and the vendor's strings with the
 * release marker of one release (-DFAKE_RELEASE, see "strings of the real library").
 *
 * Its purpose is to make a wrong binding fail loudly on machines without an NPU.
 * Every struct the caller hands in is read at the VENDOR's byte offsets (the C
 * definitions below are pinned to them with static asserts) and checked for
 * plausibility; anything off makes the call return a distinct FAKE_E_* code and print
 * "fake-rkllm: <function>: <what is wrong>" on stderr. In particular rkllm_init checks
 * the shape of its third argument: under 1.2 it must be code (the result callback),
 * under 1.3 data (an RKLLMCallback struct whose first member is code); the fake tells
 * code from data by the permissions of the mapping holding the address
 * (/proc/self/maps).
 *
 * Behaviour (deterministic, so tests can assert exact results):
 *  - A "token" is one byte of the templated prompt: a prompt of N bytes prefills N
 *    tokens, minus the bytes a loaded prompt cache has in common with its start. With
 *    FAKE_RKLLM_TOKENS=words (read at rkllm_init) the model's vocabulary is whole words
 *    instead: a prompt's token is a word and its trailing spaces (or a run of leading
 *    spaces), cut as its answers are (below) but never inside a character; counts,
 *    prefill, matches, the history and the context are then in those tokens. Its
 *    tokenizer.json is tests/fake_rkllm/build.py's write_tokenizer(path, "words").
 *  - The reply is "echo: " + the content of the last ChatML user turn
 *    ("<|im_start|>user\n...<|im_end|>") of what the model sees (the history it holds,
 *    then this run's templated prompt), or of the whole prompt when it has none. With
 *    "[[fake:recall]]" anywhere in what it sees the reply is instead "recall: " + the
 *    contents of every user turn it sees, joined by " | ": a leaked history shows.
 *    It is streamed one word (with its trailing spaces) per token; a word holding a
 *    multi-byte UTF-8 character is split right after the character's first byte, and
 *    that first piece is delivered with state WAITING. (So a generated answer may hold
 *    more tokens than the same text sent as a prompt, as a real model's output may be
 *    tokenized otherwise than its tokenizer would cut the text.)
 *  - The reply ends (FINISH, with perf stats) after its last word, or earlier at
 *    max_new_tokens (RKLLMParam, or RKLLMInferParam's under 1.3 when > 0; <= 0 means
 *    no limit), or after a callback returned 1 (pause).
 *  - rkllm_abort (from any thread) is honoured between tokens: the run returns 0
 *    without a FINISH callback, and no prompt cache is written.
 *  - Triggers in the prompt: "[[fake:error]]" sends one token, then an ERROR callback,
 *    and rkllm_run returns FAKE_E_GENERATION; "[[fake:endless]]" repeats the reply
 *    until a limit, a pause or an abort; "[[fake:segfault]]" sends two tokens, then the
 *    process gets SIGSEGV inside rkllm_run, as a crash in the vendor's runtime would
 *    (segfaults are reported in its tracker).
 *  - A model file must start with the .rkllm magic (RKLLM_MODEL_MAGIC; build.py's
 *    write_model writes one), else rkllm_init says "invalid rknn llm model magic" and
 *    returns FAKE_E_MODEL_MAGIC; one containing FAKE_INIT_FAIL makes it return FAKE_E_INIT.
 *  - "says=WORD" in a model file makes its replies start "WORD: " instead of "echo: ", so
 *    two models loaded at once answer distinguishably.
 *  - Several handles at once, and the NPU's memory: each live handle holds as much NPU
 *    memory as its model file is large (the weights are what the real runtime maps; a test
 *    makes a large file sparse). FAKE_RKLLM_NPU_MB bounds their sum (unset: no bound). An
 *    rkllm_init that would pass it fails as the vendor's 1.2.x runtimes are reported to when
 *    the NPU's memory runs out (rknn-llm #335, #232; #522: "second rkllm_init ret=-1,
 *    handle=0"): it prints "E RKNN: [time] failed to allocate handle, ret: -1, errno: 12,
 *    errstr: Cannot allocate memory", "E RKNN: [time] failed to malloc npu memory, size: N,
 *    flags: 0x2", "E RKNN: [time] load model file error!" and "E rkllm: rkllm_init failed"
 *    on stderr, leaves *handle NULL and returns -1 (FAKE_E_NPU_MEMORY). The 1.3.0 runtime is
 *    reported to crash there instead (#522, "Segmentation fault"): the fake built as 1.3.0
 *    does so too (SIGSEGV) after the same lines. rkllm_init and rkllm_destroy log
 *    handles=<live handles> npu_used_mb=<their memory, MiB, rounded up>. The NPU is one
 *    device for every process, as its driver accounts its memory: with FAKE_RKLLM_NPU_DEVICE
 *    naming a file, the live handles and their memory are those of every process using it
 *    (a line per handle, "pid bytes id", read and rewritten under flock; the lines of a
 *    process that ended are dropped, as the driver frees what a dead process held), so a
 *    daemon with a runner process per model runs out as one process with several handles
 *    would. Without it, one process's handles are counted.
 *  - rkllm_createDefaultParam leaves n_batch, use_cross_attn and reserved unwritten
 *    (0xA5), as the vendor's does; rkllm_init refuses them unless the caller set them.
 *  - Chat template: like the vendor runtime, the fake wraps each prompt in a built-in
 *    ChatML template until rkllm_set_chat_template replaces it (rkllmd sets it empty).
 *  - Prompt caches: a run with save_prompt_cache=1 writes, after the run, a file
 *    holding the run's templated prompt (format: a "FAKE-RKLLM-PROMPT-CACHE abi=N len=L"
 *    line, then L bytes). rkllm_load_prompt_cache refuses a second load before a
 *    release, and files of another format or generation. A loaded cache is matched
 *    against each following prompt; only the differing tail is prefilled. As users
 *    report for the vendor's (#399 upstream), a loaded cache is matched only while the
 *    history is empty: a run that continues a history prefills its whole input.
 *  - History (KV cache): a run sees the history the handle holds, then its own input.
 *    After a run with keep_history=1 that returned 0 (finished, paused or aborted) the
 *    history is what the run saw plus the text of every token it generated (no end
 *    token: the reply has none); keep_history=0 drops it after the run, which is why a
 *    run with keep_history=0 still sees an earlier history (the leftovers users report,
 *    #272 upstream). rkllm_clear_kv_cache empties it (keep_system_prompt=1 keeps the
 *    template's system prompt when the history starts with it); a failed run drops it.
 *    rkllm_get_kv_cache_size reports its length in tokens: its inputs' tokens, one per
 *    generated piece.
 *  - The context (max_context_len): an input longer than all of it aborts the process, as
 *    a too long prompt is reported to crash the vendor's runtime (upstream #11). A history
 *    that would overflow it, before the prefill or during the answer, is shifted as the
 *    vendor header describes n_keep: the first n_keep tokens kept (none for -1), half of
 *    the rest dropped, until it fits; the reply is then made from what is left (a recall
 *    misses the dropped turns: silently wrong, as on a board). Each shift is logged
 *    ("rkllm_context_shift") and said on stderr.
 *  - rkllm_destroy while rkllm_run is in progress aborts the process (the vendor's would
 *    free memory the run still uses).
 *
 *  - Logits mode (infer mode GET_LOGITS, shared/rkllm-abi "Logits, hidden states"): the run
 *    prefills its input and generates nothing: one NORMAL callback carries the logits block
 *    (text NULL), then FINISH with the perf stats (generate_tokens 0). The model file gives
 *    the vocabulary size ("vocab_size=N" in its text; without it GET_LOGITS is refused). The
 *    logits are deterministic pseudo-logits of what the model has seen (its KV cache's
 *    text, this input included): with h = FNV-1a 64 of those bytes, logit[i] =
 *    (splitmix64(h + i) >> 40) / 2^20 - 8 (exact in float32, so a test can recompute them).
 *    num_tokens is min(input tokens, 2): a row for the position before the last (the bytes
 *    seen minus the last one), then the last row, which is the one to use.
 *  - Hidden-layer mode (infer mode GET_LAST_HIDDEN_LAYER, shared/rkllm-abi): the run prefills
 *    its input and generates nothing: one NORMAL callback carries the last_hidden_layer block,
 *    a row per token of this input (num_tokens rows of embd_size floats; "embd_size=N" in the
 *    model file, else 64), then FINISH. Row t holds the pseudo-values above of the bytes the
 *    model has seen up to the end of the input's token t (history included), with
 *    embd_size in place of the vocabulary: a test recomputes them. The block is overwritten
 *    and freed once the callback returns, as the runtime's buffer is.
 *  - Token input (RKLLM_INPUT_TOKEN, ids below vocab_size): no chat template; each id is one
 *    token of the KV cache, whose text is "<[id]>". With keep_history=1 a logits run keeps
 *    what it saw, so a caller that feeds each chosen token back as token input drives
 *    decoding itself, as the runtime's logits mode is used.
 *
 * Environment: FAKE_RKLLM_NPU_MB bounds the NPU memory of the live handles (above);
 * FAKE_RKLLM_LOG names a file that gets one line per call (function name,
 * then key=value pairs; paths are printed raw; a run's prompt_len, kv_before and matched
 * are tokens); FAKE_RKLLM_TOKENS=words makes a prompt's tokens words (above); FAKE_RKLLM_PREFILL_US and
 * FAKE_RKLLM_DECODE_US add that many microseconds per prefilled / generated token,
 * so timing (TTFT, abort from another thread) can be exercised. A prompt holding the
 * text of FAKE_RKLLM_HANG_ON makes rkllm_run hang for good, deaf to rkllm_abort, as a
 * stuck native call would (tests of the service watchdog). FAKE_RKLLM_END_TOKEN=1 makes
 * the history keep the end-of-generation token of a reply that ended by itself (a KV
 * position without text, not in the FINISH statistics, seen in rkllm_get_kv_cache_size):
 * whether the vendor's does is not documented (docs/npu.md).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <errno.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#if !defined(RKLLM_ABI) || (RKLLM_ABI != 12 && RKLLM_ABI != 13)
#error "build with -DRKLLM_ABI=12 or -DRKLLM_ABI=13"
#endif

/* Error codes (parsed by tests/fake_rkllm/build.py: keep the "(-N)" form). */
#define FAKE_E_ARGUMENT (-1001)    /* NULL or unreadable pointer, or a bad plain argument */
#define FAKE_E_HANDLE (-1002)      /* not a handle rkllm_init returned */
#define FAKE_E_PARAM (-1003)       /* an RKLLMParam field is implausible at its offset */
#define FAKE_E_CALLBACK (-1004)    /* rkllm_init's 3rd argument has the wrong shape */
#define FAKE_E_NPU_MEMORY (-1)     /* the NPU's memory ran out (the vendor's own return value) */
#define FAKE_E_INPUT (-1005)       /* an RKLLMInput field is implausible */
#define FAKE_E_INFER (-1006)       /* an RKLLMInferParam field is implausible */
#define FAKE_E_BUSY (-1007)        /* a run is already in progress on this handle */
#define FAKE_E_CACHE_STATE (-1008) /* load while another prompt cache is loaded */
#define FAKE_E_UNSUPPORTED (-1009) /* valid for the vendor, not simulated by the fake */
#define FAKE_E_MODEL (-2001)       /* model file unreadable */
#define FAKE_E_INIT (-2002)        /* model file asks for an init failure */
#define FAKE_E_GENERATION (-2003)  /* the prompt asked for a generation error */
#define FAKE_E_CACHE_FILE (-2004)  /* prompt cache file missing, foreign or unwritable */
#define FAKE_E_MODEL_MAGIC (-2005) /* the model file does not start with the .rkllm magic */

/* ---- strings of the real library ----------------------------------------------------
 * What a strings(1) dump of the vendor's aarch64 librkllmrt.so shows (the texts are
 * copied from ../shared/rkllm-abi/README.md, "What the real library file says about
 * its release"). The release is in the marker only; every other string below is a decoy
 * that names another version or none. -DFAKE_RELEASE="\"1.2.1b1\"" embeds the marker
 * and the bare release line; without it the library has no marker at all. The build
 * field is the one of the real 1.2.1b1 marker (the only one quoted).
 */
#ifdef FAKE_RELEASE
#define FAKE_MARKER "RKLLM SDK (version: " FAKE_RELEASE " | target: Linux | build: 27637c95 2025-05-02 17:46:07)\0" \
                    FAKE_RELEASE "\0"
#else
#define FAKE_MARKER ""
#endif
__attribute__((used)) static const char vendor_strings[] =
    "I rkllm: rkllm-runtime version: %s, rknpu driver version: %s, platform: %s\n\0"
    "rknn llm lib version: 2.3.3b0 (c54da5763@2025-04-18T15:37:10)\0"
    "librknnrt version: 2.3.3b0\0"
    FAKE_MARKER
    "E rkllm: The rkllm-runtime version is lower than the rkllm-toolkit version.\0"
    "RKLLM model version is \0"
    ", but current librkllmrt.so is support model version <= \0"
    "RKNN Driver Information, version: %d.%d.%d\0"
    "rkllm.version\0"
    "general.version\0"
    "invalid rknn llm model magic\0"
    "the model version is too old, please use the latest toolkit to reconvert the model\0";

/* The first bytes of a .rkllm model: the container's "GGUF" magic under the format's
 * byte mask (from a public reverse-engineering of the format, observed on 1.3.1 models;
 * docs/npu.md). The real runtime refuses other files with "invalid rknn llm model magic". */
#define RKLLM_MODEL_MAGIC "\xda\xee\xb3\x36"

/* ---- the vendor interface, at the vendor's offsets --------------------------------- */
typedef void *LLMHandle;
enum { RKLLM_RUN_NORMAL = 0, RKLLM_RUN_WAITING = 1, RKLLM_RUN_FINISH = 2, RKLLM_RUN_ERROR = 3 };
enum { RKLLM_INPUT_PROMPT = 0, RKLLM_INPUT_TOKEN = 1, RKLLM_INPUT_MULTIMODAL = 3 };
enum { RKLLM_INFER_GENERATE = 0, RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1, RKLLM_INFER_GET_LOGITS = 2 };

typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;

typedef struct {
    const char *model_path;
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
#if RKLLM_ABI == 13
    bool ignore_eos_token;
#endif
    bool is_async;
#if RKLLM_ABI == 12
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if RKLLM_ABI == 12
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#endif

typedef struct {
    const char *role;
    bool enable_thinking;
    int input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#if RKLLM_ABI == 13
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    int mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if RKLLM_ABI == 13
    RKLLMSamplingParam *sampling_params;
#endif
    int keep_history;
#if RKLLM_ABI == 13
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
    RKLLMResultLogits logits;
    RKLLMPerfStat perf;
} RKLLMResult;

typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, int state);

#if RKLLM_ABI == 13
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    void *tokenizer_callback;
    void *tokenizer_userdata;
    void *embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* Pinned to the sizes and offsets measured from the vendor headers (LP64). */
#define PIN_SIZE(T, n) _Static_assert(sizeof(T) == (n), "sizeof " #T)
#define PIN_OFFSET(T, f, n) _Static_assert(offsetof(T, f) == (n), #T "." #f)
PIN_SIZE(RKLLMExtendParam, 120);
PIN_OFFSET(RKLLMExtendParam, enabled_cpus_mask, 8);
PIN_OFFSET(RKLLMExtendParam, n_batch, 12);
PIN_OFFSET(RKLLMExtendParam, reserved, 14);
PIN_SIZE(RKLLMPromptCacheParam, 16);
PIN_OFFSET(RKLLMPromptCacheParam, prompt_cache_path, 8);
PIN_SIZE(RKLLMResult, 72);
PIN_OFFSET(RKLLMResult, perf, 48);
PIN_OFFSET(RKLLMInput, input_type, 12);
PIN_OFFSET(RKLLMInput, prompt_input, 16);
PIN_OFFSET(RKLLMParam, skip_special_token, 56);
#if RKLLM_ABI == 12
PIN_SIZE(RKLLMParam, 208);
PIN_OFFSET(RKLLMParam, is_async, 57);
PIN_OFFSET(RKLLMParam, img_start, 64);
PIN_OFFSET(RKLLMParam, extend_param, 88);
PIN_SIZE(RKLLMInput, 64);
PIN_SIZE(RKLLMInferParam, 32);
PIN_OFFSET(RKLLMInferParam, keep_history, 24);
#else
PIN_SIZE(RKLLMParam, 184);
PIN_OFFSET(RKLLMParam, ignore_eos_token, 57);
PIN_OFFSET(RKLLMParam, is_async, 58);
PIN_OFFSET(RKLLMParam, extend_param, 60);
PIN_SIZE(RKLLMInput, 160);
PIN_SIZE(RKLLMMultiModalInput, 144);
PIN_SIZE(RKLLMSamplingParam, 36);
PIN_SIZE(RKLLMInferParam, 40);
PIN_OFFSET(RKLLMInferParam, sampling_params, 24);
PIN_OFFSET(RKLLMInferParam, keep_history, 32);
PIN_OFFSET(RKLLMInferParam, max_new_tokens, 36);
PIN_SIZE(RKLLMCallback, 48);
#endif

/* ---- diagnostics -------------------------------------------------------------------- */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void call_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void call_log(const char *fmt, ...) {
    const char *path = getenv("FAKE_RKLLM_LOG");
    if (!path || !*path) return;
    pthread_mutex_lock(&log_lock);
    FILE *f = fopen(path, "a");
    if (f) {
        va_list ap;
        va_start(ap, fmt);
        vfprintf(f, fmt, ap);
        va_end(ap);
        fputc('\n', f);
        fclose(f);
    }
    pthread_mutex_unlock(&log_lock);
}

/* Report a rejected call on stderr and in the call log; return its code. */
static int fail(int code, const char *fn, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(int code, const char *fn, const char *fmt, ...) {
    char why[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fake-rkllm: %s: %s (returning %d)\n", fn, why, code);
    fflush(stderr);
    call_log("%s FAILED code=%d", fn, code);
    return code;
}

/* The permissions ("r-xp", ...) of the mapping holding addr; false if unmapped. */
static bool mapping_perms(const void *addr, char perms[5]) {
    FILE *f = fopen("/proc/self/maps", "r");
    if (!f) return false;
    uintptr_t a = (uintptr_t)addr;
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned long lo, hi;
        char p[5];
        if (sscanf(line, "%lx-%lx %4s", &lo, &hi, p) == 3 && a >= lo && a < hi) {
            memcpy(perms, p, 5);
            found = true;
        }
    }
    fclose(f);
    return found;
}

static bool is_readable(const void *p, size_t n) {
    char perms[5];
    if (!p || !mapping_perms(p, perms) || perms[0] != 'r') return false;
    return mapping_perms((const char *)p + n - 1, perms) && perms[0] == 'r';
}

static bool is_code(const void *p) {
    char perms[5];
    return p && mapping_perms(p, perms) && perms[2] == 'x';
}

static bool is_string(const char *s) {
    return is_readable(s, 1) && is_readable(s, strlen(s) + 1);
}

static bool plausible(float v, float lo, float hi) { return isfinite(v) && v >= lo && v <= hi; }

/* ---- the KV cache ----------------------------------------------------------------------- */
/* The text of its tokens and where each ends: a prompt's tokens are its bytes, a generated
 * token is the piece its callback streamed (one position each, as on the real runtime). */
typedef struct {
    char *text; /* NUL-terminated */
    size_t bytes;
    size_t *ends; /* ends[i]: the byte offset where token i ends */
    size_t tokens;
    size_t text_cap, ends_cap;
} kv_cache;

static void kv_push(kv_cache *kv, const char *p, size_t n, bool one_token) {
    size_t new_tokens = one_token ? 1 : n;
    if (kv->bytes + n + 1 > kv->text_cap) kv->text = realloc(kv->text, kv->text_cap = 2 * (kv->bytes + n + 1));
    if (kv->tokens + new_tokens > kv->ends_cap)
        kv->ends = realloc(kv->ends, (kv->ends_cap = 2 * (kv->tokens + new_tokens)) * sizeof *kv->ends);
    memcpy(kv->text + kv->bytes, p, n);
    for (size_t i = 0; i < new_tokens; i++) kv->ends[kv->tokens++] = kv->bytes + (one_token ? n : i + 1);
    kv->bytes += n;
    kv->text[kv->bytes] = '\0';
}

/* Keep the first `tokens` tokens. */
static void kv_truncate(kv_cache *kv, size_t tokens) {
    if (tokens >= kv->tokens) return;
    kv->tokens = tokens;
    kv->bytes = tokens ? kv->ends[tokens - 1] : 0;
    if (kv->text) kv->text[kv->bytes] = '\0';
}

/* Remove the tokens [first, first + count). */
static void kv_drop(kv_cache *kv, size_t first, size_t count) {
    size_t from = first ? kv->ends[first - 1] : 0, to = kv->ends[first + count - 1], cut = to - from;
    memmove(kv->text + from, kv->text + to, kv->bytes - to + 1);
    for (size_t i = first + count; i < kv->tokens; i++) kv->ends[i - count] = kv->ends[i] - cut;
    kv->tokens -= count;
    kv->bytes -= cut;
}

static kv_cache kv_copy(const kv_cache *kv) {
    kv_cache copy = {0};
    copy.text = malloc(copy.text_cap = kv->bytes + 1);
    memcpy(copy.text, kv->text ? kv->text : "", kv->bytes + 1);
    copy.bytes = kv->bytes;
    copy.ends = malloc((copy.ends_cap = kv->tokens + 1) * sizeof *copy.ends);
    if (kv->tokens) memcpy(copy.ends, kv->ends, kv->tokens * sizeof *kv->ends);
    copy.tokens = kv->tokens;
    return copy;
}

static void kv_free(kv_cache *kv) {
    free(kv->text);
    free(kv->ends);
    memset(kv, 0, sizeof *kv);
}

/* ---- handles ------------------------------------------------------------------------ */
#define MAX_HANDLES 64
#define PATH_MAX_LEN 4096

typedef struct {
    RKLLMParam param;
    char model_path[PATH_MAX_LEN];
    LLMResultCallback callback;
    void *callback_userdata;
    atomic_int abort_requested;
    atomic_int running;
    char *tmpl_system, *tmpl_prefix, *tmpl_postfix;
    char *cache_text; /* the loaded prompt cache's templated prompt, or NULL */
    size_t cache_len;
    kv_cache history; /* what the KV cache holds: earlier runs' inputs and generated tokens */
    bool word_tokens; /* FAKE_RKLLM_TOKENS=words: a prompt's tokens are its words, else its bytes */
    int vocab_size; /* from the model file's "vocab_size=N" (0: none, no logits mode) */
    int embd_size; /* from the model file's "embd_size=N" (default 64): the hidden layer's width */
    char says[64]; /* from the model file's "says=WORD" (default "echo"): its replies' first word */
    size_t npu_bytes; /* the NPU memory this handle holds: its model file's size */
} fake_handle;

static fake_handle *handles[MAX_HANDLES];
static size_t npu_used; /* the live handles' NPU memory, bytes (under handles_lock) */
static int live_handles; /* (under handles_lock) */
static pthread_mutex_t handles_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t mib_up(size_t bytes) { return (bytes + (1u << 20) - 1) >> 20; }

/* The vendor's log prefix time, "[hh:mm:ss.mmm]". */
static void log_time(char out[32]) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    localtime_r(&ts.tv_sec, &tm);
    snprintf(out, 32, "[%02d:%02d:%02d.%03ld]", tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
}

/* The device file (FAKE_RKLLM_NPU_DEVICE), opened and locked; NULL when there is none. */
static FILE *device_open(void) {
    const char *path = getenv("FAKE_RKLLM_NPU_DEVICE");
    if (!path || !*path) return NULL;
    FILE *f = fopen(path, "a+");
    if (f) flock(fileno(f), LOCK_EX);
    return f;
}

/* The device's live handles (lines of processes still running), but this process's handle
 * `skip` (NULL: none): their count and memory; the lines kept go to `kept`. */
static size_t device_read(FILE *f, const void *skip, int *live, char *kept, size_t room, size_t *kept_len) {
    char line[160];
    size_t used = 0;
    *live = 0;
    *kept_len = 0;
    rewind(f);
    while (fgets(line, sizeof line, f)) {
        long pid;
        size_t bytes;
        unsigned long long id;
        if (sscanf(line, "%ld %zu %llx", &pid, &bytes, &id) != 3) continue;
        if (kill((pid_t)pid, 0) != 0 && errno == ESRCH) continue; /* freed with its process */
        if (pid == (long)getpid() && id == (unsigned long long)(uintptr_t)skip) continue;
        used += bytes;
        (*live)++;
        int n = snprintf(kept + *kept_len, room - *kept_len, "%s", line);
        if (n > 0 && (size_t)n < room - *kept_len) *kept_len += (size_t)n;
    }
    return used;
}

/* Rewrite the device file: the lines kept, and this process's new handle `add` if any; unlock. */
static void device_close(FILE *f, const char *kept, size_t kept_len, const void *add, size_t bytes) {
    if (ftruncate(fileno(f), 0) == 0) {
        fwrite(kept, 1, kept_len, f);
        if (add) fprintf(f, "%ld %zu %llx\n", (long)getpid(), bytes, (unsigned long long)(uintptr_t)add);
    }
    fflush(f);
    flock(fileno(f), LOCK_UN);
    fclose(f);
}

/* What rkllm_init does when the model does not fit the NPU's memory (see the header). */
static int npu_memory_exhausted(LLMHandle *handle, size_t want, size_t used, size_t bound) {
    char t[32];
    log_time(t);
    fprintf(stderr, "E RKNN: %s failed to allocate handle, ret: -1, errno: 12, errstr: Cannot allocate memory\n"
                    "E RKNN: %s failed to malloc npu memory, size: %zu, flags: 0x2\n"
                    "E RKNN: %s load model file error!\n"
                    "E rkllm: rkllm_init failed\n", t, t, want, t);
    fflush(stderr);
    call_log("rkllm_init FAILED code=%d npu_memory want_mb=%zu used_mb=%zu bound_mb=%zu", FAKE_E_NPU_MEMORY, mib_up(want),
             mib_up(used), bound >> 20);
    *handle = NULL;
#ifdef FAKE_RELEASE
    if (!strcmp(FAKE_RELEASE, "1.3.0")) { /* rknn-llm #522: 1.3.0 crashes where 1.2.x returned -1 */
        fprintf(stderr, "Segmentation fault\n");
        fflush(stderr);
        raise(SIGSEGV);
    }
#endif
    return FAKE_E_NPU_MEMORY;
}

static fake_handle *lookup(LLMHandle h) {
    fake_handle *found = NULL;
    pthread_mutex_lock(&handles_lock);
    for (int i = 0; i < MAX_HANDLES && h; i++)
        if (handles[i] == h) found = handles[i];
    pthread_mutex_unlock(&handles_lock);
    return found;
}

#define REQUIRE_HANDLE(fn, h, var)                                                     \
    fake_handle *var = lookup(h);                                                      \
    if (!var) return fail(FAKE_E_HANDLE, fn, "handle %p was not returned by rkllm_init", h)

static void set_template(fake_handle *fh, const char *sys, const char *prefix, const char *postfix) {
    free(fh->tmpl_system);
    free(fh->tmpl_prefix);
    free(fh->tmpl_postfix);
    fh->tmpl_system = strdup(sys);
    fh->tmpl_prefix = strdup(prefix);
    fh->tmpl_postfix = strdup(postfix);
}

static void release_cache(fake_handle *fh) {
    free(fh->cache_text);
    fh->cache_text = NULL;
    fh->cache_len = 0;
}

/* ---- parameter checks ----------------------------------------------------------------- */
static int check_param(const RKLLMParam *p) {
    const char *fn = "rkllm_init";
    const uint8_t *raw = (const uint8_t *)p;
    if (!is_readable(p, sizeof *p)) return fail(FAKE_E_ARGUMENT, fn, "param %p is not readable", (void *)p);
    if (!is_string(p->model_path)) return fail(FAKE_E_PARAM, fn, "model_path (offset 0) is not a string");
    if (p->max_context_len <= 0 || p->max_context_len > (1 << 20))
        return fail(FAKE_E_PARAM, fn, "max_context_len (offset 8) = %d", p->max_context_len);
    if (p->max_new_tokens < -1 || p->max_new_tokens > (1 << 20))
        return fail(FAKE_E_PARAM, fn, "max_new_tokens (offset 12) = %d", p->max_new_tokens);
    if (p->top_k < 0 || p->top_k > (1 << 20)) return fail(FAKE_E_PARAM, fn, "top_k (offset 16) = %d", p->top_k);
    if (p->n_keep < -1 || p->n_keep > p->max_context_len)
        return fail(FAKE_E_PARAM, fn, "n_keep (offset 20) = %d", p->n_keep);
    if (!plausible(p->top_p, 0, 1)) return fail(FAKE_E_PARAM, fn, "top_p (offset 24) = %g", p->top_p);
    if (!plausible(p->temperature, 0, 100)) return fail(FAKE_E_PARAM, fn, "temperature = %g", p->temperature);
    if (!plausible(p->repeat_penalty, 0, 100)) return fail(FAKE_E_PARAM, fn, "repeat_penalty = %g", p->repeat_penalty);
    if (!plausible(p->frequency_penalty, -100, 100) || !plausible(p->presence_penalty, -100, 100))
        return fail(FAKE_E_PARAM, fn, "frequency/presence penalty out of range");
    if (p->mirostat < 0 || p->mirostat > 2) return fail(FAKE_E_PARAM, fn, "mirostat = %d", p->mirostat);
    if (!plausible(p->mirostat_tau, 0, 100) || !plausible(p->mirostat_eta, 0, 10))
        return fail(FAKE_E_PARAM, fn, "mirostat_tau/eta out of range");
    size_t bools[] = {offsetof(RKLLMParam, skip_special_token), offsetof(RKLLMParam, is_async),
#if RKLLM_ABI == 13
                      offsetof(RKLLMParam, ignore_eos_token),
#endif
    };
    for (size_t i = 0; i < sizeof bools / sizeof bools[0]; i++)
        if (raw[bools[i]] > 1) return fail(FAKE_E_PARAM, fn, "bool at offset %zu holds %u", bools[i], raw[bools[i]]);
#if RKLLM_ABI == 12
    const char *imgs[] = {p->img_start, p->img_end, p->img_content};
    for (int i = 0; i < 3; i++)
        if (imgs[i] && !is_string(imgs[i])) return fail(FAKE_E_PARAM, fn, "img_* pointer %d is not a string", i);
#endif
    const RKLLMExtendParam *e = &p->extend_param;
    size_t base = offsetof(RKLLMParam, extend_param);
    if (e->base_domain_id < 0 || e->base_domain_id > 65535)
        return fail(FAKE_E_PARAM, fn, "extend_param.base_domain_id (offset %zu) = %d", base, e->base_domain_id);
    if (e->embed_flash < 0 || e->embed_flash > 1) return fail(FAKE_E_PARAM, fn, "embed_flash = %d", e->embed_flash);
    if (e->enabled_cpus_num != __builtin_popcount(e->enabled_cpus_mask))
        return fail(FAKE_E_PARAM, fn, "enabled_cpus_num (offset %zu) = %d but enabled_cpus_mask (offset %zu) = 0x%x",
                    base + 5, e->enabled_cpus_num, base + 8, e->enabled_cpus_mask);
    if (e->n_batch > 1) return fail(FAKE_E_PARAM, fn, "n_batch = %u (values > 1 crash the vendor runtime)", e->n_batch);
    if (e->use_cross_attn < 0 || e->use_cross_attn > 1)
        return fail(FAKE_E_PARAM, fn, "use_cross_attn = %d", e->use_cross_attn);
    for (size_t i = 0; i < sizeof e->reserved; i++)
        if (e->reserved[i])
            return fail(FAKE_E_PARAM, fn, "extend_param.reserved[%zu] (offset %zu) = 0x%02x, must be 0", i,
                        base + 14 + i, e->reserved[i]);
    return 0;
}

static int check_callback_arg(void *arg, LLMResultCallback *cb, void **userdata) {
    const char *fn = "rkllm_init";
#if RKLLM_ABI == 12
    if (!is_code(arg))
        return fail(FAKE_E_CALLBACK, fn,
                    "3rd argument %p is not code: the 1.2 interface takes the result callback itself "
                    "(was a 1.3 RKLLMCallback* passed?)", arg);
    *cb = (LLMResultCallback)arg;
    *userdata = NULL;
#else
    const RKLLMCallback *c = arg;
    if (!arg || is_code(arg))
        return fail(FAKE_E_CALLBACK, fn,
                    "3rd argument %p is %s: the 1.3 interface takes a pointer to an RKLLMCallback struct "
                    "(was a 1.2 function pointer passed?)", arg, arg ? "code" : "NULL");
    if (!is_readable(c, sizeof *c)) return fail(FAKE_E_CALLBACK, fn, "RKLLMCallback %p is not readable", arg);
    if (!is_code((void *)c->result_callback))
        return fail(FAKE_E_CALLBACK, fn, "RKLLMCallback.result_callback (offset 0) = %p is not code",
                    (void *)c->result_callback);
    if ((c->tokenizer_callback && !is_code(c->tokenizer_callback)) || (c->embed_callback && !is_code(c->embed_callback)))
        return fail(FAKE_E_CALLBACK, fn, "RKLLMCallback tokenizer/embed callback (offsets 16/32) is not code");
    *cb = c->result_callback;
    *userdata = c->result_userdata;
#endif
    return 0;
}

static int check_input(const RKLLMInput *in) {
    const char *fn = "rkllm_run";
    const uint8_t *raw = (const uint8_t *)in;
    if (!is_readable(in, offsetof(RKLLMInput, prompt_input) + sizeof(char *)))
        return fail(FAKE_E_ARGUMENT, fn, "input %p is not readable", (const void *)in);
    if (in->role && !(is_string(in->role) && (!strcmp(in->role, "user") || !strcmp(in->role, "tool"))))
        return fail(FAKE_E_INPUT, fn, "role (offset 0) must be NULL, \"user\" or \"tool\"");
    if (raw[offsetof(RKLLMInput, enable_thinking)] > 1)
        return fail(FAKE_E_INPUT, fn, "enable_thinking (offset 8) holds %u", raw[offsetof(RKLLMInput, enable_thinking)]);
    if (in->input_type < RKLLM_INPUT_PROMPT || in->input_type > RKLLM_INPUT_MULTIMODAL)
        return fail(FAKE_E_INPUT, fn, "input_type (offset 12) = %d", in->input_type);
    if (in->input_type == RKLLM_INPUT_TOKEN) {
        const RKLLMTokenInput *t = &in->token_input;
        if (t->n_tokens == 0 || t->n_tokens > (1u << 20) || !is_readable(t->input_ids, t->n_tokens * sizeof(int32_t)))
            return fail(FAKE_E_INPUT, fn, "token_input (offset 16) = {%p, %zu} is not an array of token ids",
                        (void *)t->input_ids, t->n_tokens);
        return 0;
    }
    if (in->input_type != RKLLM_INPUT_PROMPT)
        return fail(FAKE_E_UNSUPPORTED, fn, "input_type %d: the fake simulates PROMPT and TOKEN input only", in->input_type);
    if (!is_string(in->prompt_input)) return fail(FAKE_E_INPUT, fn, "prompt_input (offset 16) is not a string");
    return 0;
}

static int check_infer(const RKLLMInferParam *ip) {
    const char *fn = "rkllm_run";
    if (!is_readable(ip, sizeof *ip)) return fail(FAKE_E_ARGUMENT, fn, "infer param %p is not readable", (const void *)ip);
    if (ip->mode < RKLLM_INFER_GENERATE || ip->mode > RKLLM_INFER_GET_LOGITS)
        return fail(FAKE_E_INFER, fn, "mode (offset 0) = %d", ip->mode);
    if (ip->lora_params && !(is_readable(ip->lora_params, sizeof *ip->lora_params) &&
                             is_string(ip->lora_params->lora_adapter_name)))
        return fail(FAKE_E_INFER, fn, "lora_params (offset 8) is not an RKLLMLoraParam*");
    const RKLLMPromptCacheParam *pc = ip->prompt_cache_params;
    if (pc) {
        if (!is_readable(pc, sizeof *pc)) return fail(FAKE_E_INFER, fn, "prompt_cache_params (offset 16) not readable");
        if (pc->save_prompt_cache != 0 && pc->save_prompt_cache != 1)
            return fail(FAKE_E_INFER, fn, "prompt_cache_params->save_prompt_cache (offset 0) = %d, must be 0 or 1",
                        pc->save_prompt_cache);
        if (pc->save_prompt_cache && !is_string(pc->prompt_cache_path))
            return fail(FAKE_E_INFER, fn, "prompt_cache_params->prompt_cache_path (offset 8) is not a string");
    }
    if (ip->keep_history != 0 && ip->keep_history != 1)
        return fail(FAKE_E_INFER, fn, "keep_history (offset %zu) = %d, must be 0 or 1",
                    offsetof(RKLLMInferParam, keep_history), ip->keep_history);
#if RKLLM_ABI == 13
    const RKLLMSamplingParam *s = ip->sampling_params;
    if (s) {
        if (!is_readable(s, sizeof *s)) return fail(FAKE_E_INFER, fn, "sampling_params (offset 24) not readable");
        if (s->top_k < 0 || s->top_k > (1 << 20) || !plausible(s->top_p, 0, 1) || !plausible(s->temperature, 0, 100) ||
            !plausible(s->repeat_penalty, 0, 100) || !plausible(s->frequency_penalty, -100, 100) ||
            !plausible(s->presence_penalty, -100, 100) || s->mirostat < 0 || s->mirostat > 2 ||
            !plausible(s->mirostat_tau, 0, 100) || !plausible(s->mirostat_eta, 0, 10))
            return fail(FAKE_E_INFER, fn, "sampling_params values are implausible (top_k=%d top_p=%g temperature=%g)",
                        s->top_k, s->top_p, s->temperature);
    }
    if (ip->max_new_tokens < -1 || ip->max_new_tokens > (1 << 20))
        return fail(FAKE_E_INFER, fn, "max_new_tokens (offset 36) = %d", ip->max_new_tokens);
#endif
    return 0;
}

/* ---- generation helpers ------------------------------------------------------------- */
static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_us(long us) {
    if (us <= 0) return;
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

static long env_us(const char *name) {
    const char *v = getenv(name);
    return v ? atol(v) : 0;
}

/* "echo: " + the last ChatML user turn's content (or the whole prompt). */
/* "recall: " + the content of every ChatML user turn in what the model sees. */
static char *recall_reply(const char *seen) {
    const char *marker = "<|im_start|>user\n";
    size_t cap = strlen(seen) + 16, n = 0;
    char *reply = malloc(cap);
    n += (size_t)sprintf(reply, "recall: ");
    int turns = 0;
    for (const char *p = strstr(seen, marker); p; p = strstr(p + 1, marker)) {
        const char *start = p + strlen(marker), *close = strstr(start, "<|im_end|>");
        size_t len = close ? (size_t)(close - start) : strlen(start);
        if (turns++) n += (size_t)sprintf(reply + n, " | ");
        memcpy(reply + n, start, len);
        n += len;
    }
    reply[n] = '\0';
    return reply;
}

static char *make_reply(const fake_handle *fh, const char *prompt) {
    if (strstr(prompt, "[[fake:recall]]")) return recall_reply(prompt);
    const char *start = prompt, *end = prompt + strlen(prompt);
    const char *marker = "<|im_start|>user\n";
    for (const char *p = strstr(prompt, marker); p; p = strstr(p + 1, marker)) start = p + strlen(marker);
    if (start != prompt) {
        const char *close = strstr(start, "<|im_end|>");
        if (close) end = close;
    }
    size_t n = (size_t)(end - start), head = strlen(fh->says) + 2;
    char *reply = malloc(n + head + 1);
    snprintf(reply, head + 1, "%s: ", fh->says);
    memcpy(reply + head, start, n);
    reply[head + n] = '\0';
    return reply;
}

/* The length of the word at text[pos] with its trailing spaces (a run of spaces alone
 * where the text has no word before them). */
static size_t word_at(const char *text, size_t len, size_t pos) {
    size_t end = pos;
    while (end < len && text[end] != ' ') end++;
    while (end < len && text[end] == ' ') end++;
    return end - pos;
}

/* The next token of text at *pos: a word and its trailing spaces, cut right after the
 * first byte of a multi-byte character (then reported WAITING). Returns the length. */
static size_t next_piece(const char *text, size_t len, size_t pos, int *state) {
    size_t end = pos + word_at(text, len, pos);
    *state = RKLLM_RUN_NORMAL;
    for (size_t i = pos; i < end; i++) {
        if ((unsigned char)text[i] >= 0xC0) {
            end = i + 1;
            *state = RKLLM_RUN_WAITING;
            break;
        }
    }
    return end - pos;
}

/* The length of the prompt token at text[pos]: a byte, or a word (FAKE_RKLLM_TOKENS=words). */
static size_t prompt_token_at(const fake_handle *fh, const char *text, size_t len, size_t pos) {
    return fh->word_tokens ? word_at(text, len, pos) : 1;
}

/* How many of the prompt's tokens end within its first `bytes` bytes. */
static size_t prompt_tokens(const fake_handle *fh, const char *text, size_t len, size_t bytes) {
    size_t n = 0;
    for (size_t pos = 0; pos < len;) {
        pos += prompt_token_at(fh, text, len, pos);
        if (pos > bytes) break;
        n++;
    }
    return n;
}

static void kv_push_prompt(const fake_handle *fh, kv_cache *kv, const char *text, size_t len) {
    for (size_t pos = 0, n; pos < len; pos += n) {
        n = prompt_token_at(fh, text, len, pos);
        kv_push(kv, text + pos, n, true);
    }
}

/* Make room for n more tokens in a KV cache: while it would overflow max_context_len, shift
 * the window as the vendor header describes n_keep ("number of kv cache to keep at the
 * beginning when shifting context window"): keep the first n_keep tokens (none for the
 * default -1) and drop half of the rest, as llama.cpp's context shift does. Nothing tells
 * the caller but the call log: the continuation is silently wrong. */
static void make_room(fake_handle *fh, kv_cache *kv, size_t n) {
    size_t context = (size_t)fh->param.max_context_len;
    size_t keep = fh->param.n_keep > 0 ? (size_t)fh->param.n_keep : 0;
    while (kv->tokens + n > context && kv->tokens > keep) {
        size_t drop = (kv->tokens - keep + 1) / 2;
        kv_drop(kv, keep, drop);
        fprintf(stderr, "fake-rkllm: rkllm_run: context full: shifting the KV window, %zu tokens dropped after the first %zu\n",
                drop, keep);
        call_log("rkllm_context_shift dropped=%zu kept=%zu", drop, keep);
    }
}

static int write_cache(const char *path, const char *text, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    fprintf(f, "FAKE-RKLLM-PROMPT-CACHE abi=%d len=%zu\n", RKLLM_ABI, len);
    size_t written = fwrite(text, 1, len, f);
    return (fclose(f) == 0 && written == len) ? 0 : -1;
}

/* ---- the exported vendor functions ------------------------------------------------------ */
/* Like the vendor's (a public decompilation of an older release): the fields are written
 * one by one, and the bytes that release had as reserved (n_batch, use_cross_attn and
 * reserved since 1.2.1) are left as they were: here, visibly not zero. */
RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0xA5, sizeof p);
    p.model_path = NULL;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.is_async = false;
#if RKLLM_ABI == 12
    p.img_start = p.img_end = p.img_content = NULL;
#else
    p.ignore_eos_token = false;
#endif
    p.extend_param.base_domain_id = 0;
    p.extend_param.embed_flash = 1;
    p.extend_param.enabled_cpus_mask = sysconf(_SC_NPROCESSORS_CONF) >= 8 ? 0xF0 : 0xF;
    p.extend_param.enabled_cpus_num = 4;
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
    p.n_keep = -1;
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = true;
    call_log("rkllm_createDefaultParam");
    return p;
}

int rkllm_init(LLMHandle *handle, RKLLMParam *param, void *callback) {
    const char *fn = "rkllm_init";
    if (!handle || !is_readable(handle, sizeof *handle)) return fail(FAKE_E_ARGUMENT, fn, "handle pointer is invalid");
    LLMResultCallback cb = NULL;
    void *userdata = NULL;
    int rc = check_callback_arg(callback, &cb, &userdata);
    if (!rc) rc = check_param(param);
    if (rc) return rc;

    FILE *f = fopen(param->model_path, "rb");
    if (!f) return fail(FAKE_E_MODEL, fn, "cannot open model %s", param->model_path);
    char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    if (n < 4 || memcmp(buf, RKLLM_MODEL_MAGIC, 4) != 0) {
        fprintf(stderr, "E RKNN: invalid rknn llm model magic\nE RKNN: load model file error!\n");
        return fail(FAKE_E_MODEL_MAGIC, fn, "model %s: invalid rknn llm model magic", param->model_path);
    }
    if (memmem(buf, n, "FAKE_INIT_FAIL", 14)) return fail(FAKE_E_INIT, fn, "model %s asks to fail", param->model_path);
    struct stat st;
    size_t npu_bytes = stat(param->model_path, &st) == 0 ? (size_t)st.st_size : n;
    const char *bound_mb = getenv("FAKE_RKLLM_NPU_MB");
    size_t bound = bound_mb && *bound_mb ? (size_t)atoll(bound_mb) << 20 : 0;

    fake_handle *fh = calloc(1, sizeof *fh);
    fh->param = *param;
    snprintf(fh->model_path, sizeof fh->model_path, "%s", param->model_path);
    fh->param.model_path = fh->model_path;
    fh->callback = cb;
    fh->callback_userdata = userdata;
    const char *tokens = getenv("FAKE_RKLLM_TOKENS");
    fh->word_tokens = tokens && !strcmp(tokens, "words");
    const char *vocab = memmem(buf, n, "vocab_size=", 11);
    fh->vocab_size = vocab ? atoi(vocab + 11) : 0;
    const char *embd = memmem(buf, n, "embd_size=", 10);
    fh->embd_size = embd ? atoi(embd + 10) : 64;
    const char *says = memmem(buf, n, "says=", 5);
    snprintf(fh->says, sizeof fh->says, "%.*s", says ? (int)strcspn(says + 5, " \n\r\t") : 4, says ? says + 5 : "echo");
    fh->npu_bytes = npu_bytes;
    set_template(fh, "<|im_start|>system\nYou are a fake model.<|im_end|>\n", "<|im_start|>user\n",
                 "<|im_end|>\n<|im_start|>assistant\n");
    pthread_mutex_lock(&handles_lock);
    static char kept[1 << 14];
    size_t kept_len = 0;
    int device_live = 0;
    FILE *device = device_open();
    size_t used = device ? device_read(device, NULL, &device_live, kept, sizeof kept, &kept_len) : npu_used;
    bool fits = !bound || used + npu_bytes <= bound;
    int slot = -1;
    for (int i = 0; i < MAX_HANDLES && slot < 0 && fits; i++)
        if (!handles[i]) slot = i;
    if (slot >= 0) {
        handles[slot] = fh;
        npu_used += npu_bytes;
        live_handles++;
    }
    int live = device ? device_live + (slot >= 0) : live_handles;
    size_t used_now = device ? used + (slot >= 0 ? npu_bytes : 0) : npu_used;
    if (device) device_close(device, kept, kept_len, slot >= 0 ? fh : NULL, npu_bytes);
    pthread_mutex_unlock(&handles_lock);
    if (!fits) {
        free(fh);
        return npu_memory_exhausted(handle, npu_bytes, used, bound);
    }
    if (slot < 0) {
        free(fh);
        return fail(FAKE_E_UNSUPPORTED, fn, "too many open handles");
    }
    *handle = fh;

    const RKLLMParam *p = param;
    const RKLLMExtendParam *e = &p->extend_param;
    call_log("rkllm_init abi=%d max_context_len=%d max_new_tokens=%d top_k=%d n_keep=%d top_p=%.3f "
             "temperature=%.3f repeat_penalty=%.3f frequency_penalty=%.3f presence_penalty=%.3f mirostat=%d "
             "skip_special_token=%d is_async=%d"
#if RKLLM_ABI == 13
             " ignore_eos_token=%d"
#endif
             " base_domain_id=%d embed_flash=%d enabled_cpus_num=%d enabled_cpus_mask=0x%x n_batch=%u "
             "use_cross_attn=%d handles=%d npu_used_mb=%zu model=%s",
             RKLLM_ABI, p->max_context_len, p->max_new_tokens, p->top_k, p->n_keep, p->top_p, p->temperature,
             p->repeat_penalty, p->frequency_penalty, p->presence_penalty, p->mirostat, p->skip_special_token,
             p->is_async,
#if RKLLM_ABI == 13
             p->ignore_eos_token,
#endif
             e->base_domain_id, e->embed_flash, e->enabled_cpus_num, e->enabled_cpus_mask, e->n_batch,
             e->use_cross_attn, live, mib_up(used_now), p->model_path);
    return 0;
}

int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                            const char *prompt_postfix) {
    const char *fn = "rkllm_set_chat_template";
    REQUIRE_HANDLE(fn, handle, fh);
    if (!is_string(system_prompt) || !is_string(prompt_prefix) || !is_string(prompt_postfix))
        return fail(FAKE_E_ARGUMENT, fn, "all three template parts must be strings");
    set_template(fh, system_prompt, prompt_prefix, prompt_postfix);
    call_log("%s system_len=%zu prefix_len=%zu postfix_len=%zu", fn, strlen(system_prompt), strlen(prompt_prefix),
             strlen(prompt_postfix));
    return 0;
}

int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                             const char *tool_response_str) {
    const char *fn = "rkllm_set_function_tools";
    REQUIRE_HANDLE(fn, handle, fh);
    (void)fh;
    if (!is_string(system_prompt) || !is_string(tools) || !is_string(tool_response_str))
        return fail(FAKE_E_ARGUMENT, fn, "all three arguments must be strings");
    call_log("%s tools_len=%zu", fn, strlen(tools));
    return 0;
}

int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    const char *fn = "rkllm_set_cross_attn_params";
    REQUIRE_HANDLE(fn, handle, fh);
    (void)fh;
    if (!is_readable(cross_attn_params, sizeof *cross_attn_params))
        return fail(FAKE_E_ARGUMENT, fn, "cross_attn_params is not readable");
    call_log("%s num_tokens=%d", fn, cross_attn_params->num_tokens);
    return 0;
}

int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    const char *fn = "rkllm_load_lora";
    REQUIRE_HANDLE(fn, handle, fh);
    (void)fh;
    if (!is_readable(lora_adapter, sizeof *lora_adapter) || !is_string(lora_adapter->lora_adapter_path) ||
        !is_string(lora_adapter->lora_adapter_name))
        return fail(FAKE_E_ARGUMENT, fn, "lora_adapter is not an RKLLMLoraAdapter*");
    call_log("%s name=%s scale=%.3f", fn, lora_adapter->lora_adapter_name, lora_adapter->scale);
    return 0;
}

int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    const char *fn = "rkllm_load_prompt_cache";
    REQUIRE_HANDLE(fn, handle, fh);
    if (!is_string(prompt_cache_path)) return fail(FAKE_E_ARGUMENT, fn, "prompt_cache_path is not a string");
    call_log("%s path=%s", fn, prompt_cache_path);
    if (fh->cache_text) return fail(FAKE_E_CACHE_STATE, fn, "a prompt cache is loaded: release it first");
    FILE *f = fopen(prompt_cache_path, "rb");
    if (!f) return fail(FAKE_E_CACHE_FILE, fn, "cannot open %s", prompt_cache_path);
    int abi = 0;
    size_t len = 0;
    char *text = NULL;
    if (fscanf(f, "FAKE-RKLLM-PROMPT-CACHE abi=%d len=%zu", &abi, &len) == 2 && fgetc(f) == '\n' &&
        abi == RKLLM_ABI && len < (1u << 30)) {
        text = malloc(len + 1);
        if (fread(text, 1, len, f) != len) {
            free(text);
            text = NULL;
        }
    }
    fclose(f);
    if (!text) return fail(FAKE_E_CACHE_FILE, fn, "%s is not a prompt cache of this runtime", prompt_cache_path);
    text[len] = '\0';
    fh->cache_text = text;
    fh->cache_len = len;
    return 0;
}

int rkllm_release_prompt_cache(LLMHandle handle) {
    const char *fn = "rkllm_release_prompt_cache";
    REQUIRE_HANDLE(fn, handle, fh);
    call_log("%s loaded=%d", fn, fh->cache_text != NULL);
    release_cache(fh);
    return 0;
}

int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos) {
    const char *fn = "rkllm_clear_kv_cache";
    REQUIRE_HANDLE(fn, handle, fh);
    if (keep_system_prompt != 0 && keep_system_prompt != 1)
        return fail(FAKE_E_ARGUMENT, fn, "keep_system_prompt = %d", keep_system_prompt);
    if ((start_pos && !is_readable(start_pos, sizeof *start_pos)) || (end_pos && !is_readable(end_pos, sizeof *end_pos)))
        return fail(FAKE_E_ARGUMENT, fn, "start_pos/end_pos must be NULL or int*");
    call_log("%s keep_system_prompt=%d", fn, keep_system_prompt);
    size_t keep = strlen(fh->tmpl_system);
    if (!keep_system_prompt || !keep || fh->history.bytes < keep || memcmp(fh->history.text, fh->tmpl_system, keep) != 0) keep = 0;
    size_t tokens = 0; /* the history's tokens within the system prompt */
    while (tokens < fh->history.tokens && fh->history.ends[tokens] <= keep) tokens++;
    kv_truncate(&fh->history, tokens);
    return 0;
}

int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    const char *fn = "rkllm_get_kv_cache_size";
    REQUIRE_HANDLE(fn, handle, fh);
    if (!is_readable(cache_sizes, sizeof *cache_sizes)) return fail(FAKE_E_ARGUMENT, fn, "cache_sizes is not int*");
    cache_sizes[0] = (int)fh->history.tokens;
    call_log("%s size=%zu", fn, fh->history.tokens);
    return 0;
}

int rkllm_abort(LLMHandle handle) {
    const char *fn = "rkllm_abort";
    REQUIRE_HANDLE(fn, handle, fh);
    atomic_store(&fh->abort_requested, 1);
    call_log("%s running=%d", fn, atomic_load(&fh->running));
    return 0;
}

int rkllm_is_running(LLMHandle handle) {
    fake_handle *fh = lookup(handle);
    return fh ? atomic_load(&fh->running) : 0;
}

/* ---- logits mode ----------------------------------------------------------------------- */
static uint64_t fnv1a64(const char *p, size_t n) {
    uint64_t h = 14695981039346656037ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void pseudo_logits(const char *seen, size_t len, int vocab, float *row) {
    uint64_t h = fnv1a64(seen, len);
    for (int i = 0; i < vocab; i++) row[i] = (float)(splitmix64(h + (uint64_t)i) >> 40) / 1048576.0f - 8.0f;
}

/* A GET_LOGITS run: the logits of what the model has seen, in one NORMAL callback. */
static const char *logits_run(fake_handle *fh, const kv_cache *kv, size_t input_tokens, void *ud) {
    int rows = input_tokens >= 2 ? 2 : 1;
    float *block = malloc(sizeof(float) * (size_t)fh->vocab_size * (size_t)rows);
    if (rows == 2) pseudo_logits(kv->text, kv->bytes - 1, fh->vocab_size, block);
    pseudo_logits(kv->text, kv->bytes, fh->vocab_size, block + (size_t)fh->vocab_size * (size_t)(rows - 1));
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    result.logits.logits = block;
    result.logits.vocab_size = fh->vocab_size;
    result.logits.num_tokens = rows;
    int rc = fh->callback(&result, ud, RKLLM_RUN_NORMAL);
    free(block); /* the runtime's buffer: gone after the callback */
    return rc == 1 ? "pause" : "logits";
}

/* A GET_LAST_HIDDEN_LAYER run: one NORMAL callback whose last_hidden_layer block holds a row
 * per token of this input (num_tokens x embd_size floats, row-major, as the vendor's demo
 * copies them), row t the pseudo-values of what the model has seen up to that token. */
static const char *hidden_run(fake_handle *fh, const kv_cache *kv, size_t input_tokens, void *ud) {
    size_t first = kv->tokens - input_tokens, width = (size_t)fh->embd_size;
    float *block = malloc(sizeof(float) * width * (input_tokens ? input_tokens : 1));
    for (size_t t = 0; t < input_tokens; t++) pseudo_logits(kv->text, kv->ends[first + t], fh->embd_size, block + t * width);
    RKLLMResult result;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    result.last_hidden_layer.hidden_states = block;
    result.last_hidden_layer.embd_size = fh->embd_size;
    result.last_hidden_layer.num_tokens = (int)input_tokens;
    int rc = fh->callback(&result, ud, RKLLM_RUN_NORMAL);
    memset(block, 0xff, sizeof(float) * width * (input_tokens ? input_tokens : 1)); /* NaNs for a late reader */
    free(block); /* the runtime's buffer: gone after the callback */
    return rc == 1 ? "pause" : "hidden";
}

static int run(fake_handle *fh, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    const char *fn = "rkllm_run";
    int rc = check_input(input);
    if (!rc) rc = check_infer(infer);
    if (rc) return rc;

    bool hidden_mode = infer->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER;
    bool logits_mode = infer->mode == RKLLM_INFER_GET_LOGITS || hidden_mode; /* neither generates */
    if (infer->mode == RKLLM_INFER_GET_LOGITS && fh->vocab_size <= 0)
        return fail(FAKE_E_UNSUPPORTED, fn, "GET_LOGITS: the model file names no vocab_size");
    const RKLLMTokenInput *ids = input->input_type == RKLLM_INPUT_TOKEN ? &input->token_input : NULL;
    size_t len; /* the input's text: a templated prompt, or "<[id]>" per token id */
    char *text;
    if (ids) {
        for (size_t i = 0; i < ids->n_tokens; i++)
            if (ids->input_ids[i] < 0 || (fh->vocab_size > 0 && ids->input_ids[i] >= fh->vocab_size))
                return fail(FAKE_E_INPUT, fn, "token_input.input_ids[%zu] = %d is not a token of the model", i, ids->input_ids[i]);
        text = malloc(ids->n_tokens * 16 + 1);
        len = 0;
        for (size_t i = 0; i < ids->n_tokens; i++) len += (size_t)sprintf(text + len, "<[%d]>", ids->input_ids[i]);
    } else {
        /* Apply the chat template (system prompt only at the start of a conversation). */
        const char *prompt = input->prompt_input;
        const char *sys = fh->history.tokens ? "" : fh->tmpl_system;
        len = strlen(sys) + strlen(fh->tmpl_prefix) + strlen(prompt) + strlen(fh->tmpl_postfix);
        text = malloc(len + 1);
        snprintf(text, len + 1, "%s%s%s%s", sys, fh->tmpl_prefix, prompt, fh->tmpl_postfix);
    }
    /* The context: an input longer than all of it is reported to crash the vendor's runtime
     * (upstream #11); a history that would overflow it with this input is shifted. */
    size_t context = (size_t)fh->param.max_context_len, tokens_in = ids ? ids->n_tokens : prompt_tokens(fh, text, len, len);
    if (tokens_in > context) {
        fprintf(stderr, "fake-rkllm: %s: an input of %zu tokens is longer than max_context_len %zu: crashing, "
                "as the vendor runtime is reported to (upstream #11)\n", fn, tokens_in, context);
        fflush(stderr);
        call_log("%s CRASH input=%zu max_context_len=%zu", fn, tokens_in, context);
        abort();
    }
    /* What the model sees (its KV cache): the history, then this input, then what it generates. */
    size_t kv_before = fh->history.tokens;
    kv_cache kv = kv_copy(&fh->history);
    make_room(fh, &kv, tokens_in);
    if (ids) /* one KV position per id, its text "<[id]>" */
        for (size_t i = 0, at = 0; i < ids->n_tokens; i++) {
            size_t n = (size_t)snprintf(NULL, 0, "<[%d]>", ids->input_ids[i]);
            kv_push(&kv, text + at, n, true);
            at += n;
        }
    else
        kv_push_prompt(fh, &kv, text, len);

    size_t same = 0; /* bytes in common with the loaded cache, then its whole tokens */
    while (!ids && !kv_before && fh->cache_text && same < fh->cache_len && same < len && fh->cache_text[same] == text[same])
        same++;
    size_t matched = ids ? 0 : prompt_tokens(fh, text, len, same);
    const RKLLMPromptCacheParam *pc = infer->prompt_cache_params;
    bool save = pc && pc->save_prompt_cache;
    int limit = fh->param.max_new_tokens;
    char sampling[256] = "";
#if RKLLM_ABI == 13
    if (infer->max_new_tokens > 0) limit = infer->max_new_tokens;
    const RKLLMSamplingParam *s = infer->sampling_params;
    if (s)
        snprintf(sampling, sizeof sampling,
                 " sampling=top_k:%d,top_p:%.3f,temperature:%.3f,repeat_penalty:%.3f,frequency_penalty:%.3f,presence_penalty:%.3f",
                 s->top_k, s->top_p, s->temperature, s->repeat_penalty, s->frequency_penalty, s->presence_penalty);
    else
        snprintf(sampling, sizeof sampling, " sampling=init");
#endif
    call_log("%s prompt_len=%zu keep_history=%d save_prompt_cache=%d limit=%d kv_before=%zu matched=%zu%s%s%s mode=%d input=%s",
             fn, tokens_in, infer->keep_history, save, limit, kv_before, matched, sampling, save ? " path=" : "",
             save ? pc->prompt_cache_path : "", infer->mode, ids ? "token" : "prompt");

    const char *hang_on = getenv("FAKE_RKLLM_HANG_ON");
    if (hang_on && *hang_on && strstr(text, hang_on)) {
        fprintf(stderr, "fake-rkllm: %s: the prompt holds FAKE_RKLLM_HANG_ON: hanging for good\n", fn);
        for (;;) sleep_us(1000000);
    }

    double t0 = now_ms();
    int prefill_tokens = (int)(tokens_in - matched);
    sleep_us(env_us("FAKE_RKLLM_PREFILL_US") * prefill_tokens);
    double t1 = now_ms();

    bool endless = strstr(text, "[[fake:endless]]") != NULL;
    bool error = strstr(text, "[[fake:error]]") != NULL;
    bool segfault = strstr(text, "[[fake:segfault]]") != NULL;
    char *reply = make_reply(fh, kv.text);
    if (endless) { /* repeat the reply, words separated by a space */
        size_t n = strlen(reply);
        reply = realloc(reply, n + 2);
        strcpy(reply + n, " ");
    }
    size_t reply_len = strlen(reply), pos = 0;
    long decode_us = env_us("FAKE_RKLLM_DECODE_US");
    LLMResultCallback cb = fh->callback;
    void *ud = userdata ? userdata : fh->callback_userdata;
    RKLLMResult result;
    char piece[4096];
    int tokens = 0;
    const char *reason = "eos";
    if (logits_mode)
        reason = atomic_load(&fh->abort_requested) ? "abort"
                 : hidden_mode ? hidden_run(fh, &kv, tokens_in, ud) : logits_run(fh, &kv, tokens_in, ud);
    for (; !logits_mode;) {
        if (atomic_load(&fh->abort_requested)) {
            reason = "abort";
            break;
        }
        if (limit > 0 && tokens >= limit) {
            reason = "limit";
            break;
        }
        if (pos >= reply_len) {
            if (!endless) break;
            pos = 0;
        }
        int state;
        size_t n = next_piece(reply, reply_len, pos, &state);
        if (n >= sizeof piece) n = sizeof piece - 1;
        memcpy(piece, reply + pos, n);
        piece[n] = '\0';
        pos += n;
        make_room(fh, &kv, 1); /* a full window shifts mid-answer too */
        kv_push(&kv, piece, n, true);
        sleep_us(decode_us);
        memset(&result, 0, sizeof result);
        result.text = piece;
        result.token_id = tokens++;
        if (cb(&result, ud, state) == 1) {
            reason = "pause";
            break;
        }
        if (segfault && tokens == 2) {
            fprintf(stderr, "fake-rkllm: %s: the prompt asked for a segfault\n", fn);
            raise(SIGSEGV);
        }
        if (error) {
            memset(&result, 0, sizeof result);
            cb(&result, ud, RKLLM_RUN_ERROR);
            reason = "error";
            break;
        }
    }
    double t2 = now_ms();

    rc = 0;
    if (!strcmp(reason, "error")) {
        rc = FAKE_E_GENERATION;
        fprintf(stderr, "fake-rkllm: %s: the prompt asked for an error (returning %d)\n", fn, rc);
    } else if (strcmp(reason, "abort") != 0) {
        memset(&result, 0, sizeof result);
        result.perf.prefill_time_ms = (float)(t1 - t0);
        result.perf.prefill_tokens = prefill_tokens;
        result.perf.generate_time_ms = (float)(t2 - t1);
        result.perf.generate_tokens = tokens;
        result.perf.memory_usage_mb = 42.5f;
        cb(&result, ud, RKLLM_RUN_FINISH);
        if (save && write_cache(pc->prompt_cache_path, text, len) != 0)
            rc = fail(FAKE_E_CACHE_FILE, fn, "cannot write prompt cache %s", pc->prompt_cache_path);
    }
    if (infer->keep_history && rc == 0) {
        const char *end_token = getenv("FAKE_RKLLM_END_TOKEN");
        if (!strcmp(reason, "eos") && end_token && !strcmp(end_token, "1")) kv_push(&kv, "", 0, true);
        kv_free(&fh->history);
        fh->history = kv;
    } else {
        kv_free(&kv);
        kv_truncate(&fh->history, 0);
    }
    call_log("rkllm_run_end reason=%s tokens=%d prefill_tokens=%d rc=%d", reason, tokens, prefill_tokens, rc);
    free(reply);
    free(text);
    return rc;
}

int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata) {
    const char *fn = "rkllm_run";
    REQUIRE_HANDLE(fn, handle, fh);
    int idle = 0;
    if (!atomic_compare_exchange_strong(&fh->running, &idle, 1))
        return fail(FAKE_E_BUSY, fn, "a run is already in progress on this handle");
    atomic_store(&fh->abort_requested, 0);
    int rc = run(fh, rkllm_input, rkllm_infer_params, userdata);
    atomic_store(&fh->running, 0);
    return rc;
}

int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params, void *userdata) {
    (void)handle, (void)rkllm_input, (void)rkllm_infer_params, (void)userdata;
    return fail(FAKE_E_UNSUPPORTED, "rkllm_run_async", "not simulated (rkllmd uses rkllm_run)");
}

int rkllm_destroy(LLMHandle handle) {
    const char *fn = "rkllm_destroy";
    REQUIRE_HANDLE(fn, handle, fh);
    if (atomic_load(&fh->running)) {
        /* The vendor's would free what the running rkllm_run still uses: crash, loudly. */
        fprintf(stderr, "fake-rkllm: %s: called while rkllm_run is in progress on this handle "
                "(a use after free in the vendor runtime): crashing\n", fn);
        fflush(stderr);
        call_log("%s CRASH running=1", fn);
        abort();
    }
    pthread_mutex_lock(&handles_lock);
    for (int i = 0; i < MAX_HANDLES; i++)
        if (handles[i] == fh) handles[i] = NULL;
    npu_used -= fh->npu_bytes;
    int live = --live_handles;
    size_t used = npu_used;
    FILE *device = device_open();
    if (device) {
        static char kept[1 << 14];
        size_t kept_len = 0;
        used = device_read(device, fh, &live, kept, sizeof kept, &kept_len);
        device_close(device, kept, kept_len, NULL, 0);
    }
    pthread_mutex_unlock(&handles_lock);
    release_cache(fh);
    kv_free(&fh->history);
    free(fh->tmpl_system);
    free(fh->tmpl_prefix);
    free(fh->tmpl_postfix);
    free(fh);
    call_log("%s handles=%d npu_used_mb=%zu", fn, live, mib_up(used));
    return 0;
}

"""embed: embeddings of texts or token ids, computed on the model worker between its steps.

An embedding is llama.cpp's mean pooling: the mean over an input's tokens of the model's
final hidden states after its output norm (no lm_head), L2-normalised unless the request
says ``normalize: false``. The raw text is embedded: no chat template, the tokenizer's own
BOS rule. Texts are tokenized on the worker's prompt thread and run on the worker of the
model the request names (loaded first if need be; a list in as few forward passes as the
rows allow, in scratch state: never a running generation's), so the socket loop answers
others meanwhile. Each embedding goes back as a msgpack bin of little-endian float32
(docs/protocol.md, Embeddings).
"""

from __future__ import annotations

from concurrent.futures import Future

from ..protocol import ErrorCode, WireError
from ..worker import EmbedJob
from .context import Context, Request
from .generate import keep_alive_of

OP = "embed"


def execute(ctx: Context, request: Request) -> Future:
    args, model = request.args, request.model
    assert model is not None  # the socket loop resolved it (or answered not_found)
    texts = sum(len(item) for item in args["input"] if isinstance(item, str))
    if texts > ctx.config.daemon.max_prompt_chars:
        raise WireError(ErrorCode.TOO_LARGE, f"the input is {texts} characters; the limit is {ctx.config.daemon.max_prompt_chars}", field="input")
    job = EmbedJob(args["input"], truncate=args["truncate"], normalize=args["normalize"], future=Future())
    ctx.pool.embed(job, model.weights, keep_alive_of(args))
    return job.future

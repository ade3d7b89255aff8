"""Frequency and presence penalties, OpenAI's additive definition, on the real model.

The expected output is computed here, in process, from the model's own logits by a
reference implementation of OpenAI's formula (float64, over the completion's tokens
only); the daemon must produce exactly that, asked through the socket client, rkllmctl,
OpenAI's client (chat and legacy completions) and Ollama's client.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import ollama
import openai
import pytest

from conftest import DaemonProcess, reference_cases, rkllmctl
from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.templates import get_template

HAIKU = next(c for c in reference_cases() if c["messages"][-1]["content"] == "Write a haiku about the sea.")
MAX_TOKENS = 24
END = 2  # <|im_end|>


@pytest.fixture(scope="module")
def model():
    # The weights and the compiled forward pass the suite's daemons share (conftest.py).
    cpu = CpuBackend(weights_dir=Path(os.environ["RKLLMD_MODEL_WEIGHTS_DIR"]), kernels_dir=Path(os.environ["RKLLMD_MODEL_KERNELS_DIR"]))
    cpu.load()
    yield cpu
    cpu.close()


def reference(cpu: CpuBackend, prompt: str, frequency: float, presence: float) -> str:
    """Greedy decoding with ``logit[t] -= frequency * count(t) + presence * (count(t) > 0)``."""
    ids = cpu.tokenizer.encode(prompt)
    slot = cpu.model.new_slot()
    logits = cpu.model.prefill(slot, ids, 0)
    counts = np.zeros(logits.shape[0])
    out: list[int] = []
    while len(out) < MAX_TOKENS:
        token = int(np.argmax(logits.astype(np.float64) - frequency * counts - presence * (counts > 0)))
        if token == END:
            break
        out.append(token)
        counts[token] += 1
        logits = cpu.model.decode(slot, token, len(ids) + len(out) - 1)
    return cpu.tokenizer.decode(out)


@pytest.fixture(scope="module")
def expected(model):
    """The rendered prompt and the reference answers: without penalties, and with each."""
    prompt = get_template("smollm2-instruct").render(HAIKU["messages"])
    answers = {(f, p): reference(model, prompt, f, p) for f, p in ((0.0, 0.0), *PENALTIES)}
    assert answers[(0.0, 0.0)] == HAIKU["completion"][: len(answers[(0.0, 0.0)])]  # the reference decoder is right
    assert len(set(answers.values())) == len(answers)  # each penalty gives its own answer
    return prompt, answers


#: (frequency, presence): each gives another answer here (a negative one encourages repeats).
PENALTIES = [(2.0, 0.0), (0.0, 1.5), (0.5, 0.5), (-0.5, 0.0)]


@pytest.mark.parametrize("frequency, presence", PENALTIES)
def test_the_daemon_applies_openais_penalties_exactly(daemon: DaemonProcess, expected, frequency: float, presence: float) -> None:
    _, answers = expected
    with daemon.client() as client:
        got = client.generate(messages=HAIKU["messages"], temperature=0, max_tokens=MAX_TOKENS,
                              frequency_penalty=frequency, presence_penalty=presence).wait()
    assert got.text == answers[(frequency, presence)]


def test_rkllmctl_flags(daemon: DaemonProcess, expected) -> None:
    _, answers = expected
    run = rkllmctl("generate", "--json", "--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--frequency-penalty", "0.5",
                   "--presence-penalty", "0.5", HAIKU["messages"][-1]["content"], socket=daemon.socket)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["text"] == answers[(0.5, 0.5)]
    bad = rkllmctl("generate", "--frequency-penalty", "2.5", "hi", socket=daemon.socket)
    assert bad.returncode == 1 and "'frequency_penalty' must be between -2.0 and 2.0" in bad.stderr


def test_through_openais_and_ollamas_clients(gateway, expected) -> None:
    """`llm -o frequency_penalty 0.5` and friends: OpenAI's chat and completions, Ollama's options."""
    prompt, answers = expected
    with openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
        chat = client.chat.completions.create(model="smollm2-135m-instruct", messages=HAIKU["messages"], temperature=0, max_tokens=MAX_TOKENS, frequency_penalty=2.0)
        text = client.completions.create(model="smollm2-135m-instruct", prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, presence_penalty=1.5)
        with pytest.raises(openai.BadRequestError) as out_of_range:
            client.chat.completions.create(model="smollm2-135m-instruct", messages=HAIKU["messages"], max_tokens=1, presence_penalty=-3)
    assert chat.choices[0].message.content == answers[(2.0, 0.0)]
    assert text.choices[0].text == answers[(0.0, 1.5)]
    assert out_of_range.value.body["param"] == "presence_penalty"
    said = ollama.Client(host=gateway.url, timeout=300).chat(
        model="smollm2-135m-instruct", messages=HAIKU["messages"],
        options={"temperature": 0, "num_predict": MAX_TOKENS, "frequency_penalty": -0.5})
    assert said.message.content == answers[(-0.5, 0.0)]

"""Long prompts against an independent reference: llama.cpp's greedy completions of
prompts of about 300 and 1,300 tokens on the same float32 weights
(tests/data/smollm2-greedy-long.json, made by tools/make_llama_references.py). Prefill
runs in chunks of 128 positions, so this is where chunks after the first are checked
against something other than our own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rkllmd.backends.cpu.backend import CpuBackend
from rkllmd.sampling import SamplingParams

from conftest import SHARED_BUILDS

REFERENCE = json.loads((Path(__file__).parent / "data" / "smollm2-greedy-long.json").read_text())
CASES = REFERENCE["cases"]


def case_id(case: dict) -> str:
    return f"{case['prompt_tokens']}-tokens"


@pytest.fixture(scope="module")
def backend():
    """The default backend (the compiled decode step), on the suite's shared builds."""
    cpu = CpuBackend(weights_dir=SHARED_BUILDS / "weights", kernels_dir=SHARED_BUILDS / "kernels")
    cpu.load()
    yield cpu
    cpu.close()


def test_the_cases_are_long_and_far_from_ties():
    assert [c["prompt_tokens"] > 128 for c in CASES] == [True, True]
    assert 250 <= CASES[0]["prompt_tokens"] <= 350 and 1200 <= CASES[1]["prompt_tokens"] <= 1400
    # A top-2 gap near our known float32 difference from llama.cpp (about 3e-5 in the
    # logits) would make exact agreement luck, not evidence.
    assert all(c["min_top2_gap"] > 1e-3 for c in CASES)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_greedy_completion_of_a_long_prompt_matches_llama_cpp(backend, case):
    prompt = backend.render(case["messages"])
    ids = backend.tokenizer.encode(prompt)
    assert ids == case["prompt_ids"]  # our tokenizer agrees with llama.cpp's on the whole prompt
    pieces: list[str] = []
    stats = backend.generate(prompt, SamplingParams(max_tokens=case["max_tokens"]), None,
                             lambda piece: pieces.append(piece) or True)
    assert (stats.prompt_tokens, stats.cached_tokens) == (case["prompt_tokens"], 0)
    # One piece per token (the completions are ASCII) and vocabulary strings are unique:
    # equal pieces are equal token ids.
    assert pieces == [backend.tokenizer.decode([i]) for i in case["completion_ids"]]
    assert stats.finish_reason == ("stop" if case["stopped_on_eos"] else "length")

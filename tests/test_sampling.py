"""The sampler: greedy, seeded draws, top-k, top-p, temperature and repeat penalty."""

from __future__ import annotations

import numpy as np
import pytest

from rkllmd.sampling import Sampler, SamplingParams

VOCAB = 1000


def random_logits(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def draws(params: SamplingParams, logits: np.ndarray, n: int = 50) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == int(np.argmax(logits))


def test_sampling_does_not_modify_the_logits():
    logits = random_logits(1)
    before = logits.copy()
    Sampler(SamplingParams(temperature=0.9, repeat_penalty=1.3)).sample(logits, [int(np.argmax(logits))])
    assert np.array_equal(logits, before)


def test_same_seed_same_draws_and_different_seeds_differ():
    logits = random_logits(2) / 4  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    first = draws(params, logits)
    assert draws(params, logits) == first
    assert len(set(first)) > 5
    assert draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=1235), logits) != first


def test_no_seed_takes_fresh_entropy():
    logits = random_logits(3) / 4
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=None)
    assert draws(params, logits) != draws(params, logits)


@pytest.mark.parametrize("seed", range(3))
def test_top_k_one_is_greedy(seed):
    logits = random_logits(seed)
    params = SamplingParams(temperature=1.5, top_k=1, top_p=1.0, seed=seed)
    assert set(draws(params, logits)) == {int(np.argmax(logits))}


def test_tiny_top_p_is_greedy():
    logits = random_logits(4) / 4
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1e-9, seed=7)
    assert set(draws(params, logits)) == {int(np.argmax(logits))}


def test_top_k_limits_the_candidates():
    logits = random_logits(5) / 10
    top3 = set(np.argsort(logits)[-3:].tolist())
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, seed=11)
    seen = set(draws(params, logits, 300))
    assert seen == top3


def test_top_p_keeps_the_smallest_head_reaching_the_mass():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=0.75, seed=3)
    assert set(draws(params, logits, 300)) == {0, 1}


def test_draws_follow_the_softmax():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    logits = np.log(probs).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=99)
    counts = np.bincount(draws(params, logits, 20000), minlength=4) / 20000
    assert np.allclose(counts, probs, atol=0.015)


def test_temperature_sharpens_and_flattens():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4])).astype(np.float32)

    def top_share(temperature: float) -> float:
        params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=5)
        return draws(params, logits, 5000).count(3) / 5000

    assert top_share(0.1) > 0.9 > top_share(1.0) > top_share(5.0)


def test_repeat_penalty_demotes_recent_tokens():
    logits = np.array([2.0, 1.9, -1.0, -1.2], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repeat_penalty=1.5)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, [0]) == 0  # penalty 1.0: no effect
    assert Sampler(params).sample(logits, [0]) == 1  # positive logit divided: 2.0 -> 1.33
    negative = np.array([-1.0, -1.2], dtype=np.float32)
    assert Sampler(params).sample(negative, [0]) == 1  # negative logit multiplied: -1.0 -> -1.5


def test_repeat_penalty_counts_a_token_once_and_only_in_the_window():
    logits = np.array([2.0, 1.9], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repeat_penalty=1.02)
    assert Sampler(params).sample(logits, [0, 0, 0, 0]) == 0  # 2.0 / 1.02 once, still ahead
    assert Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5), repeat_last_n=2).sample(logits, [0, 1, 1]) == 0


# -- frequency and presence penalties: OpenAI's additive definition over the completion -----


def test_frequency_and_presence_penalties_are_openais_additive_formula():
    """logit[t] -= frequency * count(t) + presence * (count(t) > 0), count over what this
    sampler picked: the first pick is unpenalised, each later one sees the counts so far."""
    logits = random_logits(6)
    for frequency, presence in ((0.7, 0.0), (0.0, 1.3), (0.9, -0.4), (-0.5, 0.2)):
        sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=frequency, presence_penalty=presence))
        counts = np.zeros(VOCAB)
        for _ in range(40):
            expected = int(np.argmax(logits.astype(np.float64) - frequency * counts - presence * (counts > 0)))
            assert sampler.sample(logits, [1, 2, 3]) == expected  # the prompt (recent tokens) does not count
            counts[expected] += 1
        assert ((counts > 0).sum() > 1) == (frequency + presence > 0)  # a positive penalty moves the argmax on


def test_presence_penalty_walks_down_the_logits_and_leaves_them_alone():
    logits = np.array([1.0, 0.9, 0.8, 0.7], dtype=np.float32)
    before = logits.copy()
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5))
    assert [sampler.sample(logits) for _ in range(5)] == [0, 1, 2, 3, 0]  # each once, then the best of the penalised
    assert np.array_equal(logits, before) and sampler.counts == {0: 2, 1: 1, 2: 1, 3: 1}
    assert Sampler(SamplingParams(temperature=0.0)).counts is None  # nothing counted without a penalty

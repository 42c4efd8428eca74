"""Sampler correctness (against transformers' logits warpers and empirical frequencies) and stop strings."""

import random

import numpy as np
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.sampling import SamplingParams, Sampler, StopStringMatcher, apply_repetition_penalty


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def frequencies(sampler, logits, n, history=()):
    counts = np.bincount([sampler(logits, history) for _ in range(n)], minlength=logits.shape[0])
    return counts


def chi_square(counts, probs):
    expected = counts.sum() * np.asarray(probs)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token outside the allowed set"
    return float((((counts - expected) ** 2)[support] / expected[support]).sum())


# ---------------------------------------------------------------- params


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop": "\n"}, "stop"),                # a bare string would silently mean "stop at any char"
])
def test_validate_rejects(kwargs, field):
    with pytest.raises(EdgeLlamaError, match=field):
        SamplingParams(**kwargs).validate()
    with pytest.raises(EdgeLlamaError):
        Sampler(SamplingParams(**kwargs))


def test_validate_accepts_edges():
    SamplingParams(temperature=0, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=0.5, max_new_tokens=1,
                   stop=["\n\n"]).validate()


# ---------------------------------------------------------------- greedy & degenerate settings


@pytest.mark.parametrize("seed", range(5))
def test_greedy_and_degenerate_settings_pick_argmax(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(32000).astype(np.float32) * 4
    logits[rng.integers(0, 32000, 100)] = -np.inf
    best = int(np.argmax(logits))
    for params in (SamplingParams(), SamplingParams(temperature=1.5, top_k=1, seed=seed),
                   SamplingParams(temperature=1.0, top_p=1e-9, seed=seed),
                   SamplingParams(temperature=1.0, min_p=1.0, seed=seed)):
        sampler = Sampler(params)
        assert [sampler(logits) for _ in range(5)] == [best] * 5


def test_greedy_does_not_modify_logits_and_accepts_float16():
    logits = np.array([0.5, 3.0, -1.0, 2.0], dtype=np.float16)
    before = logits.copy()
    assert Sampler(SamplingParams(repetition_penalty=2.0))(logits, [1]) == 3  # 3.0/2 < 2.0
    assert np.array_equal(logits, before)


def test_seed_makes_runs_reproducible():
    logits = np.random.default_rng(0).standard_normal(50000).astype(np.float32) * 3
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=1234)
    a, b = Sampler(params), Sampler(params)
    run_a = [a(logits) for _ in range(50)]
    assert run_a == [b(logits) for _ in range(50)]
    other = Sampler(SamplingParams(temperature=0.9, top_p=0.95, top_k=200, seed=4321))
    assert run_a != [other(logits) for _ in range(50)]
    assert len(set(run_a)) > 5


# ---------------------------------------------------------------- the distribution, against transformers


def hf_probs(logits, history, params):
    import torch  # the export and dev extras: fail, never skip
    import transformers.generation.logits_process as lp
    scores = torch.tensor(logits, dtype=torch.float32)[None]
    ids = torch.tensor([list(history)], dtype=torch.long)
    chain = []
    if params.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    chain.append(lp.TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        chain.append(lp.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        chain.append(lp.TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        chain.append(lp.MinPLogitsWarper(params.min_p))
    for proc in chain:
        scores = proc(ids if history else torch.zeros((1, 0), dtype=torch.long), scores)
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.3, top_p=0.5, top_k=300),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.6, top_p=0.95, min_p=0.02),
    dict(temperature=0.9, top_k=100, top_p=0.8, min_p=0.1, repetition_penalty=1.3),
    dict(temperature=1.0, repetition_penalty=0.7),
]


@pytest.mark.parametrize("vocab, shape", [(50, "peaked"), (40000, "peaked"), (40000, "flat")])
@pytest.mark.parametrize("case", CASES)
def test_distribution_matches_transformers(vocab, shape, case):
    rng = np.random.default_rng(vocab)
    if shape == "peaked":  # like a language model's output: a few likely tokens over a long tail
        logits = (rng.standard_normal(vocab) * 2 + np.where(rng.random(vocab) < 0.002, 12, 0)).astype(np.float32)
    else:  # the nucleus spans most of the vocabulary
        logits = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    history = [int(i) for i in rng.integers(0, vocab, 30)]
    params = SamplingParams(seed=0, **case)
    ids, probs = Sampler(params).distribution(logits, history)
    dense = np.zeros(vocab)
    dense[ids] = probs
    want = hf_probs(logits, history, params)
    assert set(np.flatnonzero(dense)) == set(np.flatnonzero(want > 0))
    np.testing.assert_allclose(dense, want, atol=2e-6)


def test_repetition_penalty_as_ctrl():
    logits = np.array([2.0, -1.0, 4.0, 0.5, -3.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [2, 1, 2, 7, -1], 2.0)  # duplicates and out-of-range ids
    np.testing.assert_allclose(out, [2.0, -2.0, 2.0, 0.5, -3.0])
    assert logits[2] == 4.0
    greedy = Sampler(SamplingParams(repetition_penalty=2.5))
    assert greedy(logits, []) == 2 and greedy(logits, [2]) == 0


# ---------------------------------------------------------------- empirical frequencies

# chi-square critical values at p = 0.001, by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88}


def test_temperature_one_frequencies_match_softmax():
    logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -2.0, 1.5, 0.7, -1.0, 0.3], dtype=np.float32)
    counts = frequencies(Sampler(SamplingParams(temperature=1.0, seed=7)), logits, 20000)
    assert chi_square(counts, softmax(logits.astype(np.float64))) < CHI2_999[9]


def test_temperature_scales_frequencies():
    logits = np.array([1.0, 0.5, 0.0, -0.5], dtype=np.float32)
    counts = frequencies(Sampler(SamplingParams(temperature=0.5, seed=3)), logits, 20000)
    assert chi_square(counts, softmax(logits.astype(np.float64) / 0.5)) < CHI2_999[3]
    assert chi_square(counts, softmax(logits.astype(np.float64))) > 100  # and differ from T=1


def test_top_k_top_p_min_p_frequencies():
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.13])
    logits = logits_of(probs)
    # top_k=3 keeps {1, 3, 4}
    counts = frequencies(Sampler(SamplingParams(temperature=1.0, top_k=3, seed=1)), logits, 20000)
    assert chi_square(counts, np.where(np.isin(np.arange(5), [1, 3, 4]), probs, 0) / 0.93) < CHI2_999[2]
    # top_p=0.7: 0.5 < 0.7 <= 0.8, so the nucleus is {1, 3}
    counts = frequencies(Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=2)), logits, 20000)
    assert chi_square(counts, np.array([0, 0.5, 0, 0.3, 0]) / 0.8) < CHI2_999[1]
    # min_p=0.2 keeps p >= 0.1: {1, 3, 4}
    counts = frequencies(Sampler(SamplingParams(temperature=1.0, min_p=0.2, seed=3)), logits, 20000)
    assert chi_square(counts, np.array([0, 0.5, 0, 0.3, 0.13]) / 0.93) < CHI2_999[2]


def test_large_vocab_frequencies():
    # > 1024 candidates exercises the blocked inverse-CDF and the nucleus probe.
    rng = np.random.default_rng(11)
    vocab = 20000
    logits = (rng.standard_normal(vocab) * 0.5).astype(np.float32)
    hot = rng.choice(vocab, 6, replace=False)
    logits[hot] += np.array([11.0, 10.5, 10.0, 9.5, 9.0, 8.5], dtype=np.float32)
    probs = softmax(logits.astype(np.float64))
    for params in (SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, top_p=0.95, seed=6)):
        ids, kept = Sampler(params).distribution(logits)
        dense = np.zeros(vocab)
        dense[ids] = kept
        counts = frequencies(Sampler(params), logits, 4000)
        # bin: each hot token, then everything else
        binned_counts = np.append(counts[hot], counts.sum() - counts[hot].sum())
        binned_probs = np.append(dense[hot], 1 - dense[hot].sum())
        assert chi_square(binned_counts, binned_probs) < CHI2_999[5]
        assert dense[hot].sum() > 0.5 and 1 - dense[hot].sum() > 0.05
    full = Sampler(SamplingParams(temperature=1.0)).distribution(logits)[1]
    np.testing.assert_allclose(full, probs, rtol=1e-4)


# ---------------------------------------------------------------- stop strings


def run_matcher(stops, chunks):
    matcher = StopStringMatcher(stops)
    emitted, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return emitted, stopped


def random_chunks(rng, text):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randrange(0, min(len(text) - 1, 8) + 1))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("stops, text, want, stopped", [
    (["</s>"], "Hello world</s>ignored", "Hello world", True),
    (["\n\nUser:", "###"], "Answer: 42\n\nUse this\n\nUser: more", "Answer: 42\n\nUse this", True),
    (["ab", "b"], "xxab", "xx", True),                  # both complete at once: the longer wins
    (["abc", "b"], "xabcd", "xa", True),                # "b" completes first
    (["abc"], "ababab", "ababab", False),               # partial matches are released at the end
    (["STOP"], "STOP", "", True),
    ([], "no stops at all", "no stops at all", False),
    (["aab"], "aaab", "a", True),
])
def test_stop_strings(stops, text, want, stopped):
    rng = random.Random(0)
    for _ in range(40):
        chunks = random_chunks(rng, text)
        emitted, was_stopped = run_matcher(stops, chunks)
        assert ("".join(emitted), was_stopped) == (want, stopped), chunks


def test_stop_prefix_is_never_emitted_early():
    rng = random.Random(1)
    stops = ["<END>", "\n\n"]
    text = "a<EN b\nc<END"   # prefixes appear, then prove harmless; the final "<END" never completes
    for _ in range(40):
        matcher = StopStringMatcher(stops)
        out = ""
        for chunk in random_chunks(rng, text):
            piece, stopped = matcher.feed(chunk)
            out += piece
            assert not stopped
            # whatever was emitted cannot end in the start of a stop string
            assert not any(s[:k] and out.endswith(s[:k]) for s in stops for k in range(1, len(s)))
        assert out + matcher.flush() == text
    matcher = StopStringMatcher(["<END>"])
    assert matcher.feed("x<EN") == ("x", False)
    assert matcher.feed("D>y") == ("", True)
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""

"""Speculative decoding: exactness against plain greedy, the cache after rejections and stops, the
sampling accept rule's distribution, draft bundles, and the errors.

Tiny random Llama 3 bundles (the real Llama 3.2 tokenizer) from conftest's `exported` fixture. A random
model's greedy text falls into loops quickly, so prompt lookup finds drafts that are sometimes kept and
sometimes not: both paths run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.generate import ChatSession, generate, load, stream_ids
from edgellama.runtime.sampling import Sampler, SamplingParams
from edgellama.runtime.speculative import PromptLookup, Speculation, accept
from helpers import random_ids, run_cli

FORMS = ["fast", "portable"]
PROMPT = "Copy this: the red fox ran past the old mill, and the red fox ran past the old barn."
CHI2_999 = {5: 20.52, 7: 24.32}  # chi-square quantiles at p = 0.999, by degrees of freedom


@pytest.fixture(scope="module")
def models(exported):
    cache = {}

    def get(name: str = "gqa4", form: str = "fast"):
        if (name, form) not in cache:
            cache[(name, form)] = load(exported(name, form).dir, threads=1)
        return cache[(name, form)]

    return get


def run(model, ids, params, **spec):
    """Greedy tokens, the last event and the cache length. A plain run (no `speculate`) runs every step
    with the padding row, as speculation does (engine.exact_rows): the greedy that speculation promises."""
    model.engine.reset()
    model.engine.exact_rows = not spec.get("speculate")
    try:
        events = list(stream_ids(model, ids, params, **spec))
    finally:
        model.engine.exact_rows = False
    return [e.token_id for e in events], events[-1], model.engine.pos


@pytest.mark.parametrize("form", FORMS)
def test_verification_logits_equal_step_by_step_logits(models, form):
    m = models("gqa4", form)
    ids = m.encode_prompt(PROMPT)
    m.engine.reset()
    m.engine.forward(ids[:-4])
    rows = m.engine.forward(ids[-4:], last=4)
    assert rows.shape == (4, m.engine.vocab_size) and m.engine.pos == len(ids)
    m.engine.rewind(len(ids) - 4)
    steps = np.stack([m.engine.forward([t]) for t in ids[-4:]])
    np.testing.assert_allclose(rows, steps, atol=1e-4)
    # the default stays one position: a plain step after a verification run is unaffected
    m.engine.rewind(len(ids) - 1)
    np.testing.assert_allclose(m.engine.forward(ids[-1:]), steps[-1], atol=1e-4)


@pytest.fixture(scope="module")
def int4_fast(tiny_llama, tmp_path_factory):
    """gqa4 in the fast form, int4: MatMulNBits with int8 activations (accuracy_level 4), where an
    ulp of difference between one-row and several-row kernels becomes a different rounding step."""
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("spec-int4") / "bundle"
    export_onnx(tiny_llama("gqa4").folder, out, ExportOptions(form="fast", max_context=256, quant={"bits": 4}),
                log=lambda _: None)
    return load(out, threads=2)


def test_quantized_verification_rows_are_bitwise_the_decode_steps(int4_fast):
    # Exactness on quantized bundles rests on this: every run is a several-row run (the padding row,
    # export/onnx_graph._pad_row), so a verified row is the very number a decode step computes.
    m = int4_fast
    ids = m.encode_prompt(PROMPT)
    m.engine.reset()
    m.engine.exact_rows = True
    m.engine.forward(ids[:-6])
    rows = m.engine.forward(ids[-6:], last=6)
    m.engine.rewind(len(ids) - 6)
    steps = np.stack([m.engine.forward([t]) for t in ids[-6:]])
    np.testing.assert_array_equal(rows, steps)
    # the padding row never reaches the caller, even at the last position of the context (its row
    # goes to the engine's one spare cache slot)
    m.engine.reset()
    m.engine.forward(random_ids(m.engine.context - 1))
    assert m.engine.forward([ids[0]]).shape == (m.engine.vocab_size,) and m.engine.pos == m.engine.context
    m.engine.exact_rows = False


def test_plain_decode_skips_the_padding_row_and_speculation_turns_it_on(int4_fast, monkeypatch):
    # Two-row attention costs plain decode 2-8% at a short context and ~37% at 2048 tokens, so the
    # graph pads only when fed pad_rows = 1 (an overridable initializer, 0 by default: runtimes that
    # never feed it, onnxruntime-genai among them, run one row).
    import onnx
    from onnx import numpy_helper

    from edgellama.runtime import bundle as B

    m = int4_fast
    graph = onnx.load(str(m.engine.root / "model.onnx"), load_external_data=False).graph
    assert B.PAD_ROWS in {i.name for i in graph.input}
    assert numpy_helper.to_array(next(t for t in graph.initializer if t.name == B.PAD_ROWS)) == 0
    seen, forward = [], m.engine.forward
    monkeypatch.setattr(m.engine, "forward", lambda *a, **k: (seen.append(m.engine.exact_rows), forward(*a, **k))[1])
    ids, params = m.encode_prompt(PROMPT), SamplingParams(max_new_tokens=30)
    m.engine.reset()
    list(stream_ids(m, ids, params))
    assert seen and not any(seen)
    seen.clear()
    m.engine.reset()
    events = list(stream_ids(m, ids, params, speculate="lookup", draft_tokens=4))
    assert seen and all(seen) and events[-1].stats.accepted_tokens > 0
    assert not m.engine.exact_rows  # back to plain decode once the generation ends


def test_quantized_lookup_greedy_is_plain_greedy(int4_fast):
    m = int4_fast
    ids = m.encode_prompt(PROMPT)
    params = SamplingParams(max_new_tokens=60)
    plain, _, plain_pos = run(m, ids, params)
    spec, last, pos = run(m, ids, params, speculate="lookup", draft_tokens=4)
    assert spec == plain and pos == plain_pos and last.stats.accepted_tokens > 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("k", [1, 3, 8])
def test_lookup_greedy_is_plain_greedy_token_for_token(models, form, k):
    m = models("gqa4", form)
    ids = m.encode_prompt(PROMPT)
    params = SamplingParams(max_new_tokens=60)
    plain, plain_last, plain_pos = run(m, ids, params)
    spec, last, pos = run(m, ids, params, speculate="lookup", draft_tokens=k)
    assert spec == plain and pos == plain_pos
    assert last.finish_reason == plain_last.finish_reason
    s = last.stats
    assert s.draft_tokens > s.accepted_tokens > 0  # drafts were both kept and rejected
    assert s.acceptance_rate == s.accepted_tokens / s.draft_tokens


@pytest.mark.parametrize("form", FORMS)
def test_stops_and_max_tokens_inside_an_accepted_run(models, form):
    m = models("gqa4", form)
    ids = m.encode_prompt(PROMPT)
    plain, _, _ = run(m, ids, SamplingParams(max_new_tokens=40))
    for n in range(1, 41, 3):  # every cut lands somewhere inside a run of accepted drafts or between them
        params = SamplingParams(max_new_tokens=n)
        spec, last, pos = run(m, ids, params, speculate="lookup")
        assert spec == plain[:n] and pos == len(ids) + n - 1 and last.finish_reason == "length"
    # a stop string met inside an accepted run: the same text, and nothing past it
    text = m.tokenizer.decode(plain[:30])
    stop = text[len(text) // 2: len(text) // 2 + 3]
    params = SamplingParams(max_new_tokens=40, stop=[stop])
    m.engine.reset()
    want = "".join(e.text for e in stream_ids(m, ids, params))
    want_pos = m.engine.pos
    m.engine.reset()
    got = "".join(e.text for e in stream_ids(m, ids, params, speculate="lookup"))
    assert got == want and stop not in got and m.engine.pos == want_pos


@pytest.mark.parametrize("form", FORMS)
def test_chat_turns_roll_back_like_plain_decode(models, form):
    m = models("gqa4", form)
    params = SamplingParams(max_new_tokens=25)
    turns = ["Repeat: one two three, one two three.", "Again, twice: one two three.", "Now say four."]

    def converse(**spec):
        s = ChatSession(m, params=params, **spec)
        replies = [s.say(t) for t in turns[:2]]
        s.rewind()
        replies.append(s.say(turns[2]))
        # a consumer breaking off after 7 tokens leaves the cache holding exactly what was handed out
        events = s.send("Once more: one two three.")
        got = [next(events).token_id for _ in range(7)]
        events.close()
        return replies, got, list(s._cached), m.engine.pos

    plain = converse()
    spec = converse(speculate="lookup", draft_tokens=6)
    assert spec == plain
    assert plain[3] == len(plain[2])  # the bookkeeping ChatSession relies on: cache = its token list


def test_draft_bundle_greedy_is_target_greedy(models, exported):
    target = models("gqa4", "fast")
    ids = target.encode_prompt(PROMPT)
    params = SamplingParams(max_new_tokens=40)
    plain, _, plain_pos = run(target, ids, params)
    # the same weights in the portable form draft almost perfectly; another model's drafts mostly fail
    same = run(target, ids, params, speculate=models("gqa4", "portable"), draft_tokens=5)
    other = run(target, ids, params, speculate=str(exported("gqa3", "fast").dir), draft_tokens=5)
    for got, last, pos in (same, other):
        assert got == plain and pos == plain_pos and last.stats.draft_tokens > 0
    assert same[1].stats.acceptance_rate > 0.9 > other[1].stats.acceptance_rate


def test_draft_with_another_tokenizer_is_refused(models, exported, tmp_path):
    d = tmp_path / "draft"
    shutil.copytree(exported("gqa3", "fast").dir, d)
    tok = d / "tokenizer.json"
    data = json.loads(tok.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    vocab["hello"], vocab["world"] = vocab["world"], vocab["hello"]  # same size, two ids mean other words
    tok.write_text(json.dumps(data), encoding="utf-8")
    draft = load(d, verify=False, threads=1)
    with pytest.raises(EdgeLlamaError, match="different tokenizer"):
        generate(models("gqa4", "fast"), PROMPT, max_new_tokens=4, speculate=draft)


def test_speculation_errors(models, tmp_path):
    m = models("gqa4", "fast")
    with pytest.raises(EdgeLlamaError, match="lookup' or a draft bundle"):
        generate(m, PROMPT, max_new_tokens=4, speculate=str(tmp_path / "nothing"))
    with pytest.raises(EdgeLlamaError, match="draft tokens must be"):
        generate(m, PROMPT, max_new_tokens=4, speculate="lookup", draft_tokens=0)
    with pytest.raises(EdgeLlamaError, match="need speculation"):
        generate(m, PROMPT, max_new_tokens=4, draft_tokens=4)
    m.engine.multi_logits = False  # what a bundle exported before logits_to_keep reports
    try:
        with pytest.raises(EdgeLlamaError, match="re-export"):
            generate(m, PROMPT, max_new_tokens=4, speculate="lookup")
    finally:
        m.engine.multi_logits = True


def test_cli_reports_acceptance(exported, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLAMA_HOST_PROFILE", str(tmp_path / "host_profile.json"))  # none: the built-in one
    bundle = str(exported("gqa4", "fast").dir)
    r = run_cli(["run", bundle, "-p", PROMPT, "-n", "60", "--speculate", "lookup", "--draft-tokens", "4", "--json"],
                capsys)
    out = json.loads(r.out)
    plain = json.loads(run_cli(["run", bundle, "-p", PROMPT, "-n", "60", "--json"], capsys).out)
    assert out["token_ids"] == plain["token_ids"] and "draft_tokens" not in plain
    assert out["draft_tokens"] >= out["accepted_tokens"] > 0
    assert out["acceptance_rate"] == pytest.approx(out["accepted_tokens"] / out["draft_tokens"])
    r = run_cli(["bench", bundle, "--prompt-tokens", "16", "--new-tokens", "8", "--repeat", "1",
                 "--speculate", "lookup", "--json"], capsys)
    b = json.loads(r.out)
    assert b["speculate"] == "lookup" and {"draft_tokens", "accepted_tokens", "acceptance_rate"} <= b.keys()


def test_prompt_lookup_proposes_what_followed_the_longest_match():
    ctx = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]
    assert PromptLookup(3, 2).propose(ctx, 4)[0] == [4, 5, 9, 2]  # the trigram wins over the later bigram (2, 3)
    assert PromptLookup(3, 2).propose(ctx[:-1] + [9], 4)[0] == []
    assert PromptLookup(2, 2).propose(ctx, 2)[0] == [7, 8]  # the latest earlier occurrence
    assert PromptLookup(3, 2).propose([5, 6, 7], 4)[0] == []
    assert PromptLookup(2, 1).propose([5, 6, 5], 2)[0] == [6, 5]


# -- the sampling accept rule: the output distribution is the model's -----------------------------

def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft_kind", ["lookup", "model"])
def test_accept_rule_keeps_the_target_distribution(draft_kind):
    rng = np.random.default_rng(0)
    vocab = 6
    logits = rng.normal(size=(3, vocab)).astype(np.float32)  # positions 0, 1 and the bonus
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    p = [sampler.distribution(row)[1] for row in logits]
    q_probs = [np.array([0.5, 0.05, 0.05, 0.1, 0.1, 0.2]), np.array([0.1, 0.1, 0.4, 0.1, 0.1, 0.2])]
    draw = np.random.default_rng(2)
    first = np.zeros(vocab)
    second = np.zeros(vocab)  # the token after a kept first draft
    for _ in range(12000):
        if draft_kind == "lookup":
            draft, dists = [0, 2], None
        else:
            draft = [int(draw.choice(vocab, p=q)) for q in q_probs]
            dists = [(np.arange(vocab), q) for q in q_probs]
        kept = accept(sampler, logits, draft, dists, [])
        first[kept[0]] += 1
        if kept[0] == draft[0] and len(kept) > 1:
            second[kept[1]] += 1
    assert _chi2(first, p[0]) < CHI2_999[5]
    assert _chi2(second, p[1]) < CHI2_999[5]
    # the test can tell: the draft's own distribution is far from what came out
    q0 = q_probs[0] if draft_kind == "model" else np.eye(vocab)[0] * 0.9 + 0.1 / vocab
    assert _chi2(first, q0) > 10 * CHI2_999[5]


def test_sampled_speculation_matches_the_model_distribution(models):
    """End to end, three sampled tokens (top-k 2: eight sequences) against their exact probabilities."""
    target = models("gqa4", "fast")
    ids = target.encode_prompt(PROMPT)
    base = SamplingParams(temperature=1.0, top_k=2, max_new_tokens=3)
    sampler = Sampler(base)
    exact: dict[tuple[int, ...], float] = {}

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == 3:
            exact[tuple(prefix)] = prob
            return
        target.engine.reset()
        cand, probs = sampler.distribution(target.engine.forward(ids + prefix), ids + prefix)
        for c, pc in zip(cand, probs):
            walk(prefix + [int(c)], prob * float(pc))

    walk([], 1.0)
    seqs = sorted(exact)
    draft = models("gqa4", "portable")  # the same weights: q close to p, most drafts kept
    counts = np.zeros(len(seqs))
    drafted = 0
    for seed in range(400):
        got, last, _ = run(target, ids, SamplingParams(temperature=1.0, top_k=2, max_new_tokens=3, seed=seed),
                           speculate=Speculation(draft, draft_tokens=2, adaptive=False))
        counts[seqs.index(tuple(got))] += 1
        drafted += last.stats.draft_tokens
    assert drafted > 0
    assert _chi2(counts, np.array([exact[s] for s in seqs])) < CHI2_999[7]

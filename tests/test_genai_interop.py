"""onnxruntime-genai runs our ONNX bundles as they are: genai_config.json, the graph and the tokenizer.

On the SmolLM2 bundles (fast and portable fp32, fast int4) its greedy search (`og.Generator`) must
produce exactly the tokens `edgellama run` produces.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime_genai as og
import pytest

from edgellama.runtime import bundle as B
from edgellama.runtime.tokenizer import Tokenizer
from test_runtime import SMOL_PROMPT, SMOL_TOKENS, smollm2_bundle, smollm2_run


def genai_greedy(bundle, prompt_ids: list[int], n: int) -> list[int]:
    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize("kind", ["fast", "portable", "int4"])
def test_genai_greedy_equals_edgellama_run(tmp_path_factory, kind):
    bundle = smollm2_bundle(tmp_path_factory, kind)
    manifest = B.read_manifest(bundle, verify=False)
    conf = json.loads((bundle / B.GENAI_CONFIG).read_text())
    assert conf["search"]["past_present_share_buffer"] == manifest.graph.past_present_share_buffer == (kind != "portable")
    assert (manifest.quantization is not None) == (kind == "int4")
    ours = smollm2_run(tmp_path_factory, kind)
    theirs = genai_greedy(bundle, ours["prompt_token_ids"], SMOL_TOKENS)
    assert len(ours["token_ids"]) >= 32
    # Both stop on the bundle's eos ids, or both run the full length.
    assert theirs == ours["token_ids"]


def test_genai_tokenizer_reads_the_bundle_tokenizer(tmp_path_factory):
    bundle = smollm2_bundle(tmp_path_factory, "int4")
    tok = og.Tokenizer(og.Model(str(bundle)))
    ours = Tokenizer.from_dir(bundle)
    for text in (SMOL_PROMPT, "héllo 猫 🦙, naïve café"):
        ids = ours.encode(text)
        assert [int(i) for i in tok.encode(text)] == ids
        assert tok.decode(np.asarray(ids, dtype=np.int32)) == ours.decode(ids) == text
    # genai's encode parses control strings in any text; ours keeps them as text unless asked.
    control = "x <|im_end|> y"
    assert [int(i) for i in tok.encode(control)] == ours.encode(control, allow_special=True) != ours.encode(control)

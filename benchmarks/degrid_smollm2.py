"""A de-gridded SmolLM2-135M-Instruct: the only weights we have, taken off their Q4_1 grid.

SmolLM2's weights here come from a Q4_1 GGUF, so every 32 consecutive weights of a row sit on
16 evenly spaced levels and an asymmetric block-32 quantizer recovers them exactly: quality
numbers measured on them flatter any 4-bit scheme. This adds seeded Gaussian noise of
RATIO x each group's grid step, (max - min) / 15 over 32 consecutive weights of a row, to every
2-D weight (quantize/degrid.py), and saves the result as a Hugging Face safetensors folder.

The recipe is applied literally to every 2-D weight, token_embd included, although the GGUF
stores that one as Q8_0 on a grid 17x finer: its noise is sized by the Q4_1-style step too.

    python benchmarks/degrid_smollm2.py          # build (or reuse) the folder, then ask it about France

Importable (tests load this file by path): `degridded_smollm2() -> Path`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 1  # seed 0 (1 of 6 seeds tried at 0.33) lost the France answer; see docs/quantization.md
RATIO = 0.33  # the 0.3-0.35 x grid step; ~10% of a weight's norm
GROUP = 32
FOLDER = "smollm2-degrid"
FRANCE = "What is the capital of France?"


def recipe() -> dict[str, str]:
    """Recorded in the safetensors metadata: a cached folder is reused only if it matches."""
    return {"source": "alias:smollm2-135m-instruct", "degrid_seed": str(SEED), "degrid_ratio": str(RATIO),
            "degrid_group": str(GROUP), "degrid_levels": "16"}


def _cached(folder: Path) -> bool:
    from edgellama.export.safetensors_io import read_header

    st = folder / "model.safetensors"
    if not (st.is_file() and (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
        return False
    _, metadata, _ = read_header(st)
    return metadata == recipe()


def degridded_smollm2(cache: Path | None = None, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """The de-gridded SmolLM2 folder under `cache` (default: edgellama's asset cache), built once.

    The bytes are deterministic: noise is seeded per tensor name, tensors are written sorted.
    """
    from edgellama.assets import cache_dir
    from edgellama.export.onnx_export import write_tokenizer_files
    from edgellama.export.safetensors_io import save_file
    from edgellama.export.sources import load_source
    from edgellama.export.tokenizer_prep import prepare_tokenizer
    from edgellama.fsutil import atomic_dir
    from edgellama.quantize.degrid import degrid_named

    folder = (cache or cache_dir()) / FOLDER
    if _cached(folder):
        return folder
    log(f"degrid: building {folder}")
    src = load_source("smollm2-135m-instruct")
    tensors = {}
    for name in sorted(src.tensors.names()):
        # Seeded by (SEED, name), so one tensor at a time gives the same noise as all at once.
        tensors.update(degrid_named({name: src.tensors.get(name)}, seed=SEED, group=GROUP, ratio=RATIO))
    tok = prepare_tokenizer(src, src.config)
    with atomic_dir(folder, force=True) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata=recipe())
        (tmp / "config.json").write_text(json.dumps(src.config.to_hf(), indent=2) + "\n")
        write_tokenizer_files(tmp, tok)  # tokenizer.json, tokenizer_config.json (with the chat template), generation_config.json
    return folder


def torch_greedy_reply(folder: Path, question: str = FRANCE, max_new_tokens: int = 24) -> str:
    """Greedy chat reply of the fp32 torch reference: the check that de-gridding kept the model sane."""
    import torch

    from edgellama.export.model import Llama
    from edgellama.export.sources import load_source
    from edgellama.runtime.tokenizer import Tokenizer

    src = load_source(folder)
    model = Llama.from_source(src)
    tok = Tokenizer.from_dir(folder)
    ids = tok.encode_chat([{"role": "user", "content": question}])
    stops = set(src.config.eos_token_id) | set(tok.eos_candidates())
    out: list[int] = []
    with torch.inference_mode():
        logits, past = model(torch.tensor([ids]))
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
            logits, past = model(torch.tensor([[nxt]]), past=past)
    return tok.decode(out)


def main() -> int:
    folder = degridded_smollm2()
    print(folder)
    reply = torch_greedy_reply(folder)
    print(f"{FRANCE} -> {reply!r}")
    return 0 if "Paris" in reply else 1


if __name__ == "__main__":
    sys.exit(main())

"""Speculative decoding on SmolLM2: plain greedy vs prompt lookup vs a draft bundle, interleaved rounds.

    python benchmarks/speculative.py [--int4 DIR] [--int8 DIR] [--rounds 3] [--k 4,8,12,16]

Builds the SmolLM2-135M-Instruct int4 and int8 bundles with `edgellama export` where the folders
do not exist. Workloads, both through the chat template and the real generation loop (stream_ids,
greedy, stop ids honoured, at most --new-tokens):
  copy    "Repeat the following text exactly" + a ~400-token passage
  no-copy an open question: nothing in the prompt to copy (greedy SmolLM2 still repeats its own
          sentences after ~100 tokens, and lookup drafts from those)
  fresh   the same question with repetition penalty 1.3: the output does not repeat either, so
          drafts fail; this is the overhead speculation costs when there is nothing to copy
Every configuration runs once per round, in the same order, on the same loaded bundles; the table
holds medians of decode tok/s (the steps after the first token), the ratio to plain decode of the
same bundle and workload, the acceptance rate, and whether the tokens equal greedy's with every
step padded (engine.exact_rows: what speculation promises; plain rows run unpadded, as plain
decode does, and a line after the table says whether their tokens were the same).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from edgellama.runtime.bench import markdown_table
from edgellama.runtime.generate import load, stream_ids
from edgellama.runtime.sampling import SamplingParams
from edgellama.runtime.speculative import Speculation

PASSAGE = (
    "The river town of Hollin sits where two valleys meet, and for most of its history it lived on wool. "
    "Sheep grazed the upper slopes from April to October, and every autumn the drovers brought them down "
    "along the old stone road to the market square, where buyers from the coast bargained over fleeces "
    "until the lamps were lit. The mill by the weir was built in 1821 by a family of weavers who had moved "
    "from the north; it used the fall of the river to drive twelve looms, and later forty, and for a time it "
    "employed nearly half the town. When the railway arrived in 1867 the mill owners paid for a short branch "
    "line so that finished cloth could reach the port in a single day instead of three. The branch closed in "
    "1958, but its embankment still runs along the east bank, and in summer it is a footpath lined with "
    "blackberries. The mill itself stopped weaving in 1972. For ten years it stood empty, its windows broken "
    "and its roof patched with tarpaulin, until a group of residents formed a trust, raised money through "
    "concerts and a lottery grant, and turned the ground floor into a workshop for local makers. Today the "
    "upper floors hold a small museum of the wool trade, with two of the original looms restored to working "
    "order. On the first Saturday of each month volunteers run them for visitors, and the noise, they say, is "
    "the same noise that filled the valley for a hundred and fifty years: a steady clatter that you feel in "
    "the floorboards before you hear it. The trust also keeps the mill race clear, because the old water "
    "wheel, though it no longer drives anything, still turns whenever the river is high, and the children "
    "of Hollin have made a game of guessing, each spring, the morning it will start again."
)
COPY_PROMPT = "Repeat the following text exactly.\n\n" + PASSAGE
NO_COPY_PROMPT = ("What are three practical ways a small town could attract young families, and what might each "
                  "one cost? Answer in a few paragraphs.")


def ensure_bundle(path: Path, quant: str) -> Path:
    if not (path / "edgellama.json").is_file():
        exe = Path(sys.executable).with_name("edgellama")
        subprocess.run([str(exe), "export", "smollm2-135m-instruct", "-o", str(path), "--quant", quant, "--force"],
                       check=True)
    return path


def one(model, ids, params: SamplingParams, spec) -> tuple[list[int], float, int, int]:
    model.engine.reset()
    tokens, last = [], None
    for event in stream_ids(model, ids, params, speculate=spec):
        tokens.append(event.token_id)
        last = event
    s = last.stats
    return tokens, s.decode_tok_s, s.draft_tokens, s.accepted_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--int4", type=Path, default=Path("/tmp/spec/smol-int4"))
    ap.add_argument("--int8", type=Path, default=Path("/tmp/spec/smol-int8"))
    ap.add_argument("--draft", type=Path, action="append", default=[],
                    help="more draft bundles for the int8 target (the int4 bundle always drafts)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--k", default="4,8,12", help="draft token counts for prompt lookup")
    ap.add_argument("--no-draft", action="store_true", help="skip the int8 target and its drafts")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    int4 = load(ensure_bundle(args.int4, "int4"), threads=args.threads, max_context=2048)
    ks = [int(k) for k in args.k.split(",")]
    # (label, target model, speculate argument); the draft models are loaded once, here.
    configs = [("int4 plain", int4, None)] + [(f"int4 lookup K={k}", int4, Speculation("lookup", k)) for k in ks]
    if not args.no_draft:
        int8 = load(ensure_bundle(args.int8, "int8"), threads=args.threads, max_context=2048)
        drafts = [("int4", args.int4)] + [(d.name, d) for d in args.draft]
        configs.append(("int8 plain", int8, None))
        for name, d in drafts:
            draft = load(d, threads=args.threads, max_context=2048)
            configs.append((f"int8 + draft {name}", int8, Speculation(draft)))
        configs.append(("int8 lookup", int8, Speculation("lookup")))
    greedy = SamplingParams(max_new_tokens=args.new_tokens)
    workloads = {"copy": (COPY_PROMPT, greedy), "no-copy": (NO_COPY_PROMPT, greedy),
                 "fresh": (NO_COPY_PROMPT, SamplingParams(max_new_tokens=args.new_tokens, repetition_penalty=1.3))}
    exact: dict[tuple[str, str], list[int]] = {}  # greedy with the padding row, once per workload and target
    for wname, (prompt, params) in workloads.items():
        for label, model, spec in configs:
            if spec is None:
                model.engine.exact_rows = True
                exact[(wname, label)] = one(model, model.encode_prompt(prompt, chat=True), params, None)[0]
                model.engine.exact_rows = False
    results: dict[tuple[str, str], list] = {}
    for r in range(args.rounds):
        for wname, (prompt, params) in workloads.items():
            for label, model, spec in configs:
                ids = model.encode_prompt(prompt, chat=True)
                out = one(model, ids, params, spec)
                results.setdefault((wname, label), []).append(out)
                print(f"round {r + 1} {wname:8s} {label:22s} {out[1]:7.1f} tok/s  {len(out[0])} tokens",
                      file=sys.stderr, flush=True)
    rows = []
    for wname in workloads:
        for label, model, spec in configs:
            runs = results[(wname, label)]
            plain_label = label.split(" ")[0] + " plain"
            base = statistics.median(x[1] for x in results[(wname, plain_label)])
            plain_tokens = exact[(wname, plain_label)]
            tps = statistics.median(x[1] for x in runs)
            drafted, accepted = sum(x[2] for x in runs), sum(x[3] for x in runs)
            same = all(x[0] == plain_tokens for x in runs)
            rows.append([wname, label, len(runs[0][0]), f"{tps:.1f}", f"{tps / base:.2f}",
                         f"{100 * accepted / drafted:.0f}%" if drafted else "-", "yes" if same else "NO"])
    print(markdown_table(["workload", "config", "tokens", "decode tok/s", "× plain", "accepted", "identical"], rows))
    print(f"\nmedians of {args.rounds} interleaved round(s); greedy; prompt ids via the chat template; "
          f"{len(int4.encode_prompt(COPY_PROMPT, chat=True))}-token copy prompt")
    for (wname, label), tokens in exact.items():
        same = all(x[0] == tokens for x in results[(wname, label)])
        print(f"{wname} {label}: unpadded plain greedy {'equals' if same else 'parts from'} padded greedy")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

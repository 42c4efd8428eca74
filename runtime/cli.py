"""CLI verbs of edgellama.runtime: run, chat. Text streams to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import json
import signal
import sys


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache size in tokens (default: run, prompt + --max-new-tokens; chat, 4096 or less)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider (cpu, coreml, xnnpack, nnapi, qnn, cuda, ...)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    # --max-tokens / -m as in MLX-LM and llama.cpp's -n, so a command line carried over works.
    p.add_argument("--max-new-tokens", "--max-tokens", "-m", "-n", dest="max_new_tokens", type=int, default=256,
                   help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (chat)")
    _add_speculate_args(p)


def _add_speculate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", default=None, metavar="lookup|DRAFT_BUNDLE",
                   help="speculative decoding: draft from the text so far (lookup) or a smaller bundle with the same tokenizer")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="most tokens drafted per run (default: measured, see docs/speculative.md)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from a bundle")
    _add_load_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text ('-' or absent: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the answer to JSON valid against this schema (needs the serve extra)")
    p.add_argument("--adapter", default=None, help="LoRA adapter file (from `edgellama adapter`) for a --lora-slots bundle")
    _add_sampling_args(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    _add_load_args(p)
    _add_sampling_args(p)
    p.add_argument("--truncate", action="store_true", help="drop the oldest turns when the context fills")
    p.add_argument("--adapter", default=None, help="LoRA adapter file for a --lora-slots bundle (/adapter FILE|none switches)")
    p.set_defaults(func=_chat)
    register_pack(sub)

    _register_bench(sub)


def _params(args: argparse.Namespace):
    from edgellama.runtime.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens, stop=list(args.stop)).validate()


def _read_prompt(args: argparse.Namespace) -> str:
    from edgellama.errors import EdgeLlamaError

    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeLlamaError(f"the prompt on stdin is not valid UTF-8 (byte {exc.start})") from None


def _stats_line(s) -> str:
    return (f"prompt {s.prompt_tokens} tok, generated {s.generated_tokens} tok | TTFT {s.ttft_s * 1000:.0f} ms | "
            f"prefill {s.prefill_tok_s:.1f} tok/s | decode {s.decode_tok_s:.1f} tok/s | peak RSS {s.peak_rss_mb:.0f} MB")


def _run(args: argparse.Namespace) -> int:
    from edgellama.runtime.generate import json_constraint, load_for_prompt, stream_ids

    params = _params(args)
    schema = None
    if args.json_schema is not None:
        from edgellama.runtime.grammar import schema_file

        schema = schema_file(args.json_schema)  # a bad file fails before the model loads
    prompt = _read_prompt(args)
    model, prompt_ids = load_for_prompt(args.bundle, prompt, chat=args.chat, system=args.system,
                                        max_new_tokens=params.max_new_tokens, max_context=args.max_context,
                                        provider=args.provider, threads=args.threads, adapter=args.adapter)
    text, ids, last = [], [], None
    for event in stream_ids(model, prompt_ids, params, constraint=json_constraint(model, schema),
                            speculate=args.speculate, draft_tokens=args.draft_tokens):
        ids.append(event.token_id)
        last = event
        if args.json:
            text.append(event.text)
        else:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    s = last.stats
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": ids, "prompt_token_ids": prompt_ids,
                          "prompt_tokens": len(prompt_ids), "ttft_s": s.ttft_s, "prefill_tok_s": s.prefill_tok_s,
                          "decode_tok_s": s.decode_tok_s, "peak_rss_mb": s.peak_rss_mb,
                          "finish_reason": last.finish_reason,
                          **({"draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
                              "acceptance_rate": s.acceptance_rate} if args.speculate else {})},
                         ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(_stats_line(s), file=sys.stderr)
    return 0


def _read_line(interactive: bool) -> str | None:
    """One line of user input, or None at end of input. Bytes that are not UTF-8 are an EdgeLlamaError."""
    from edgellama.errors import EdgeLlamaError

    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
        except UnicodeDecodeError:
            raise EdgeLlamaError("that line is not valid UTF-8") from None
    raw = sys.stdin.buffer.readline()
    if not raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EdgeLlamaError(f"that line is not valid UTF-8 (byte {exc.start})") from None


def _chat(args: argparse.Namespace) -> int:
    from edgellama.runtime.generate import ChatSession, load

    params = _params(args)
    model = load(args.bundle, provider=args.provider, threads=args.threads, max_context=args.max_context,
                 adapter=args.adapter)
    session = ChatSession(model, system=args.system, params=params, truncate=args.truncate,
                          speculate=args.speculate, draft_tokens=args.draft_tokens)
    interactive = sys.stdin.isatty()
    # A shell that starts a job in the background (or CI without a terminal) hands it SIGINT
    # ignored, and Python then keeps it ignored: Ctrl-C / kill -INT would not stop an answer.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interactive:
        print("edgellama chat: /reset clears the conversation, /exit quits; Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        # Ctrl-C can land anywhere in a turn, not only while reading or generating: whatever the
        # turn was doing, the chat goes on to the next line.
        try:
            if not _chat_turn(session, model, interactive):
                break
        except KeyboardInterrupt:
            print(file=sys.stderr)
    return 0


def _chat_turn(session, model, interactive: bool) -> bool:
    """Read one line and act on it (a command, or an answer streamed to stdout); False at the end."""
    from contextlib import closing

    from edgellama.errors import EdgeLlamaError

    try:
        line = _read_line(interactive)
    except EdgeLlamaError as exc:  # one bad line does not end the conversation
        print(f"edgellama: error: {exc}", file=sys.stderr)
        return True
    if line is None:
        return False
    line = line.strip()
    if not line:
        return True
    if line in ("/exit", "/quit"):
        return False
    if line.startswith("/adapter "):
        name = line.split(None, 1)[1]
        try:
            session.set_adapter(None if name == "none" else name)
        except EdgeLlamaError as exc:
            print(f"edgellama: error: {exc}", file=sys.stderr)
        else:
            print(f"(adapter: {model.adapter or 'none'}; the conversation is prefilled again)", file=sys.stderr)
        return True
    if line == "/reset":
        session.reset()
        print("(conversation cleared)", file=sys.stderr)
        return True
    last = None
    try:
        # closing(): on Ctrl-C the answer's generator is finalized here and now, so the session
        # records what the cache holds before the next line is read.
        with closing(session.send(line)) as events:
            for event in events:
                last = event
                sys.stdout.write(event.text)
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # each answer, even a cut one, ends its line on stdout
        sys.stdout.flush()
        print("(stopped)", file=sys.stderr)
        return True
    except EdgeLlamaError as exc:  # e.g. the context is full: the session goes on
        print(f"edgellama: error: {exc}", file=sys.stderr)
        return True
    sys.stdout.write("\n")
    sys.stdout.flush()
    if last is not None and interactive:
        print(_stats_line(last.stats), file=sys.stderr)
    return True


# -- pack / verify: one archive an app downloads, and the check it runs before loading ---------
def register_pack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pack", help="pack a bundle into one deterministic .zip an app can download and verify")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("-o", "--output", required=True, help="archive to write (.zip)")
    p.add_argument("--force", action="store_true", help="replace an existing archive")
    p.set_defaults(func=_pack)

    p = sub.add_parser("verify", help="check every file of a bundle (directory or .zip) against its manifest")
    p.add_argument("bundle", help="bundle directory or .zip archive")
    p.set_defaults(func=_verify)


def _pack(args: argparse.Namespace) -> int:
    from edgellama.runtime.bundle import sha256_file
    from edgellama.runtime.pack import pack

    out = pack(args.bundle, args.output, force=args.force)
    print(f"{sha256_file(out)}  {out}")  # the digest an app can pin for the download
    print(f"packed {args.bundle} into {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from edgellama.runtime.pack import verify

    m = verify(args.bundle)
    print(f"OK: {args.bundle}: {len(m.files) + 1} files match the manifest")
    return 0


# -- bench: TTFT, prefill/decode speed, peak RSS and bandwidth use of a bundle -------------------
def _register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure TTFT, prefill/decode tok/s, peak RSS and bandwidth use of a bundle")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="runs; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the bundle's, else physical cores)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache size (default: prompt + new tokens)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", metavar="FILE.png", default=None, help="also sweep decode tok/s over context lengths and plot it")
    _add_speculate_args(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import os

    from edgellama.errors import EdgeLlamaError
    from edgellama.runtime.bench import DEFAULT_CONTEXTS, BenchOptions, bench, plot_sweep, report

    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise EdgeLlamaError(f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}")
    if args.plot is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        raise EdgeLlamaError(f"--plot: the folder of {args.plot} does not exist")
    contexts = tuple(c for c in DEFAULT_CONTEXTS if args.max_context is None or c <= args.max_context) if args.plot else ()
    opts = BenchOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeat=args.repeat,
                        threads=args.threads, max_context=args.max_context, provider=args.provider, contexts=contexts,
                        speculate=args.speculate, draft_tokens=args.draft_tokens)
    result = bench(args.bundle, opts)
    if args.plot:
        plot_sweep(result.sweep, args.plot)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(report(result))
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0

"""CLI verbs of edgellama.runtime: run, chat. Text streams to stdout, stats to stderr."""

from __future__ import annotations

import argparse
import json
import sys


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--max-context", type=int, default=None, help="KV cache size in tokens (default 4096 or less)")
    p.add_argument("--provider", default=None, help="onnxruntime execution provider (cpu, coreml, xnnpack, nnapi, qnn, cuda, ...)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (chat)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text from a bundle")
    _add_load_args(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text ('-' or absent: read stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_sampling_args(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    _add_load_args(p)
    _add_sampling_args(p)
    p.add_argument("--truncate", action="store_true", help="drop the oldest turns when the context fills")
    p.set_defaults(func=_chat)


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
    from edgellama.runtime.generate import load, stream_ids

    params = _params(args)
    prompt = _read_prompt(args)
    model = load(args.bundle, provider=args.provider, threads=args.threads, max_context=args.max_context)
    prompt_ids = model.encode_prompt(prompt, chat=args.chat, system=args.system)
    text, ids, last = [], [], None
    for event in stream_ids(model, prompt_ids, params):
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
                          "finish_reason": last.finish_reason}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(_stats_line(s), file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgeLlamaError
    from edgellama.runtime.generate import ChatSession, load

    params = _params(args)
    model = load(args.bundle, provider=args.provider, threads=args.threads, max_context=args.max_context)
    session = ChatSession(model, system=args.system, params=params, truncate=args.truncate)
    interactive = sys.stdin.isatty()
    if interactive:
        print("edgellama chat: /reset clears the conversation, /exit quits; Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        last = None
        try:
            for event in session.send(line):
                last = event
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
            continue
        except EdgeLlamaError as exc:  # e.g. the context is full: the session goes on
            print(f"edgellama: error: {exc}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        if last is not None and interactive:
            print(_stats_line(last.stats), file=sys.stderr)
    return 0

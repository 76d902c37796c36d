#!/usr/bin/env python3
"""Turns a copy of LiteLLM's model_prices_and_context_window.json into llm-meter's built-in
price table, data/prices.json, which the binary embeds.

The output is the same format (a LiteLLM price map: USD per token, one entry per model id),
cut to what llm-meter prices with: the models of the modes it meters, their provider, mode,
output limit, and their per-token rates with the long-context, 1-hour cache-write and service
tier variants. It records where the copy came from and its date.

    pip download litellm --no-deps -d /tmp/litellm
    unzip -o /tmp/litellm/litellm-*.whl 'litellm/model_prices_and_context_window_backup.json' -d /tmp/litellm
    python3 scripts/price_table.py /tmp/litellm/litellm/model_prices_and_context_window_backup.json \
        --source "litellm 1.110.2 (PyPI), model_prices_and_context_window_backup.json" \
        --date 2026-12-06 > data/prices.json

Only the standard library is used, so it runs on any Python 3.8+.
"""

import argparse
import json
import re
import sys

# The modes whose requests llm-meter meters; image, audio, video, rerank and the rest are not.
MODES = {"chat", "responses", "completion", "embedding", "realtime"}

# A rate field: a base rate, then optionally a long-context threshold, then optionally a tier.
# llm-meter reads the same grammar (src/meter/pricing/litellm.rs); keep the two in step.
BASES = (
    "cache_creation_input_token_cost_above_1hr",
    "cache_creation_input_token_cost",
    "cache_read_input_token_cost",
    "input_cost_per_token_cache_hit",
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_audio_token_cost",
    "input_cost_per_audio_token",
    "output_cost_per_audio_token",
)
RATE = re.compile(
    r"^(?P<base>" + "|".join(BASES) + r")(_above_\d+k_tokens)?(_(flex|priority|batches))?$"
)
KEPT = ("litellm_provider", "mode", "max_output_tokens")


def compact(entry):
    """The entry cut to what llm-meter reads, or None when it has no token price."""
    out = {k: entry[k] for k in KEPT if k in entry}
    if not isinstance(out.get("max_output_tokens"), int):
        out.pop("max_output_tokens", None)
    rates = {
        k: v
        for k, v in entry.items()
        if RATE.match(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
    }
    if "input_cost_per_token" not in rates and "output_cost_per_token" not in rates:
        return None
    out.update(rates)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_file", help="a copy of LiteLLM's price map")
    parser.add_argument("--source", required=True, help="where the copy came from")
    parser.add_argument("--date", required=True, help="its date, YYYY-MM-DD")
    args = parser.parse_args()
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        sys.exit("--date must be YYYY-MM-DD")
    with open(args.source_file, encoding="utf-8") as f:
        upstream = json.load(f)
    models = {}
    for name, entry in sorted(upstream.items()):
        if name == "sample_spec" or not isinstance(entry, dict):
            continue
        if entry.get("mode") not in MODES:
            continue
        kept = compact(entry)
        if kept is not None:
            models[name] = kept
    # One model per line: diffs of a regenerated table read model by model.
    out = sys.stdout
    out.write("{\n")
    out.write(f'"source": {json.dumps(args.source)},\n')
    out.write(f'"date": {json.dumps(args.date)},\n')
    out.write('"models": {\n')
    lines = [
        f"{json.dumps(name)}: {json.dumps(entry, sort_keys=True, separators=(',', ':'))}"
        for name, entry in models.items()
    ]
    out.write(",\n".join(lines))
    out.write("\n}\n}\n")
    print(f"{len(models)} models", file=sys.stderr)


if __name__ == "__main__":
    main()

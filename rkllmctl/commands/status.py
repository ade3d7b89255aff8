"""rkllmctl status [--json]"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from . import print_json
from .cache import build_percent


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the full status as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, connect: Callable[[], Any]) -> int:
    with connect() as client:
        status = client.status()
    if args.json:
        print_json(status)
        return 0
    model = status["model"]
    worker = status["worker"]
    counters = status["counters"]
    caches = status["caches"]
    states = ", ".join(f"{n} {s}" for s, n in sorted(caches["states"].items())) or "none"
    memory = caches["memory"]
    print(f"rkllmd {status['version']} (protocol {'.'.join(map(str, status['protocol']))}), pid {status['pid']}, up {status['uptime_s']:.0f} s")
    print(f"socket:   {status['socket']}")
    print(f"backend:  {status['backend']} ({status['backend_reason']})")
    print(f"model:    {model.get('name', '?')}  context {model.get('context_length', '?')}  {model.get('path', '')}")
    if model.get("capabilities"):  # since protocol 1.4
        print(f"can:      {', '.join(model['capabilities'])}  (template {model.get('template', '?')})")
    if model.get("weights"):
        print(f"weights:  {model['weights']}")
    if "models" in status:  # since protocol 1.8
        print(f"models:   {_models_line(status['models'], status['limits'])}")
    if model.get("decode"):
        print(f"decode:   {model['decode']}")
    print(f"worker:   {worker['running'] or 'idle'}; {worker['queued']} queued; {worker['builds_queued']} cache builds queued")
    if "requests" in status:  # since protocol 1.3
        for row in _request_lines(status["requests"], status["limits"].get("max_batch"), status.get("models", {}).get("default")):
            print(row)
    if status.get("build"):
        build = status["build"]
        print(f"build:    cache {build['name']} {build_percent(build)}".rstrip())
    print(f"caches:   {states}; {memory['used_bytes'] / 2**20:.1f} of {memory['budget_bytes'] / 2**20:.0f} MiB in memory ({caches['text_dir']})")
    if "store" in status:  # since protocol 1.2
        print(f"store:    {_store_line(status['store'])}")
    kept = caches.get("conversations")
    if kept is not None:
        what = f"{kept['kept']} kept, {kept['tokens']} tokens, {kept['bytes'] / 2**20:.1f} MiB" if kept["enabled"] else "not kept ([cache] conversations = false)"
        print(f"chats:    {what}; {kept['hits']} reused, {kept['evictions']} evicted")
    print(
        f"served:   {counters['completed']} generations, {counters['cancelled']} cancelled, {counters['errors']} failed; "
        f"{counters['completion_tokens']} tokens generated, {counters['cached_tokens']} prompt tokens restored from caches"
    )
    return 0


def _models_line(models: dict[str, Any], limits: dict[str, Any]) -> str:
    """The loaded weights with their size and when they are unloaded if idle, against the limits."""
    loaded = models["loaded"]
    budget = f", {limits['models_memory_bytes'] / 2**20:.0f} MiB" if limits.get("models_memory_bytes") else ""
    parts = []
    for m in loaded:
        until = "kept" if m["expires_at"] is None else f"until {time.strftime('%H:%M:%S', time.localtime(m['expires_at']))}"
        runner = f" pid {m['pid']}" if m.get("pid") else ""  # its runner process (protocol 1.10)
        parts.append(f"{m['name']}{' (default)' if m['name'] == models['default'] else ''} {m['size'] / 2**20:.0f} MiB {until}{runner}")
    loading = f"; loading {', '.join(models['loading'])}" if models.get("loading") else ""
    if models.get("draining"):  # protocol 1.11
        loading += f"; draining {models['draining']} to make room"
    return f"{len(loaded)} loaded of {limits.get('max_loaded_models', '?')}{budget}: {', '.join(parts)}{loading}"


def _request_lines(requests: dict[str, list[dict[str, Any]]], max_batch: int | None, default: str | None) -> list[str]:
    """The generations running and waiting, one line each, after a count."""
    running, queued = requests["running"], requests["queued"]
    batch = f" (up to {max_batch} decoded together)" if max_batch else ""
    lines = [f"requests: {len(running)} running{batch}, {len(queued)} queued"]
    for r in running:
        prefill = f"prefill {r['prefilled']} of {r['prompt_tokens']} prompt tokens" if r["phase"] == "prefill" else f"prompt {r['prompt_tokens']} tokens"
        lines.append(f"  running  {r['id']!s:>6}  {r['client']:<12} {prefill}, {r['completion_tokens']} generated, {r['elapsed_ms'] / 1000:.1f} s")
    for q in queued:
        model = f" for {q['model']}" if q.get("model") not in (None, default) else ""  # another model's (protocol 1.11)
        lines.append(f"  queued   {q['id']!s:>6}  {q['client']:<12} {q['position']} ahead{model}, waiting {q['waited_ms'] / 1000:.1f} s")
    return lines


def _store_line(store: dict[str, Any]) -> str:
    """Bytes per kind against the budget, and the last collection."""
    kinds = ", ".join(f"{name} {row['bytes'] / 2**20:.1f} MiB" for name, row in store["kinds"].items())
    when = "no collection yet" if store["last_gc"] is None else f"collected {time.time() - store['last_gc']:.0f} s ago"
    over = " (over budget: the artifacts in use alone exceed it)" if store["over_budget"] else ""
    return f"{kinds}; budget {store['budget_bytes'] / 2**20:.0f} MiB{over}; {when}, {store['evictions']} removed"

"""Prompt caches end to end: names, verbs, editors, crashes, tampering, equality, LRU."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEXT_CACHES_ONLY, DaemonProcess, rkllmctl
from reliability import poll
from rkllmctl import DaemonError
from rkllmd.store import HOLD_PREFIX, LEDGER_NAME, LOCK_NAME

SHORT_TEXT = "You are a careful assistant for a team of embedded engineers. Answer precisely and briefly, and say when you are unsure."
PROMPTS = [
    "What is a mutex?", "Name a prime number.", "What is 2+2?", "Define latency.", "What is an NPU?",
    "Say hello.", "What is Linux?", "Explain RAM in one line.", "What is a socket?", "Why test code?",
    "What is JSON?", "Give me a colour.", "What is a CPU cache?", "Spell 'cat'.", "What is Python?",
    "Is water wet?", "What is a compiler?", "Name a planet.", "What is TCP?", "How many days in a week?",
    "OK",
]


def state_dir_files(proc: DaemonProcess) -> list[str]:
    """Files of the binary cache folder but the artifact store's own (locks, holds, ledger)."""
    return sorted(p.name for p in proc.binary_dir.rglob("*") if p.is_file() and not store_bookkeeping(p.name))


def store_bookkeeping(name: str) -> bool:
    return name in (LOCK_NAME, LEDGER_NAME) or name.startswith(HOLD_PREFIX)


def builds(proc: DaemonProcess) -> int:
    with proc.client() as client:
        return client.status()["caches"]["builds"]


BARRIER = "zz-barrier"
_barriers = itertools.count(1)


def settle(proc: DaemonProcess, name: str) -> dict:
    """Wait for the cache to be current with everything saved so far, by an event rather
    than a pause. A barrier cache saved now with new content (a new length) is seen, then
    built, only after every change saved before it was handled: one watcher delivers
    changes in order, each is debounced by the same delay, and builds run in the order
    they were queued. The barrier is followed in the listing, which (unlike cache.show
    and cache.wait) refreshes nothing itself. Each call builds the barrier once."""
    content = "Barrier" + "." * next(_barriers)
    (proc.text_dir / f"{BARRIER}.txt").write_text(content)
    with proc.client() as client:
        poll(lambda: any(row["name"] == BARRIER and row["text_bytes"] == len(content) and row["state"] == "ready"
                         for row in client.cache_ls()["caches"]), 120, "the barrier cache built")
        return client.cache_wait(name, timeout=120)


HOSTILE = ["", ".", "..", ".hidden", "a/b", "../x", "/abs", "a\x00b", "x" * 65, "with space", "tab\t", "new\nline", "ünï", "a..b", "-" + "\x7f"]


@pytest.mark.parametrize("name", HOSTILE, ids=repr)
def test_hostile_names_are_refused_everywhere(daemon: DaemonProcess, name: str) -> None:
    with daemon.client() as client:
        for call in (
            lambda: client.cache_put(name, "text"),
            lambda: client.cache_show(name),
            lambda: client.cache_rm(name),
            lambda: client.cache_rebuild(name),
            lambda: client.cache_wait(name, 1),
            lambda: client.generate("hi", cache=name).wait(),
        ):
            with pytest.raises(DaemonError) as err:
                call()
            assert err.value.name == "invalid_name", err.value
    assert not any(daemon.folder.rglob("*passwd*"))


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "x" * 64, "v1.2"])
def test_valid_names_round_trip(daemon: DaemonProcess, name: str) -> None:
    with daemon.client() as client:
        client.cache_put(name, "Be brief.")
        assert client.cache_show(name)["text"] == "Be brief."
        client.cache_rm(name)
        with pytest.raises(DaemonError):
            client.cache_show(name)


def test_put_builds_by_itself_and_rm_deletes_everything(make_daemon) -> None:
    proc = make_daemon()
    with proc.client() as client:
        client.cache_put("rules", SHORT_TEXT)
        ready = client.cache_wait("rules", timeout=60)
        assert ready["state"] == "ready" and ready["tokens"] > 20
        rows = {r["name"]: r for r in client.cache_ls()["caches"]}
        assert rows["rules"]["state"] == "ready" and rows["rules"]["binary_bytes"] == ready["tokens"] * 46080
        assert rows["rules"]["build_ms"] > 0 and rows["rules"]["built_at"] <= time.time()
        assert client.cache_show("rules")["text"] == SHORT_TEXT
        assert any(f.endswith(".state") for f in state_dir_files(proc))
        client.cache_rm("rules")
        assert client.cache_ls()["caches"] == []
    assert state_dir_files(proc) == []


def test_cli_cache_verbs(make_daemon, tmp_path: Path) -> None:
    proc = make_daemon()
    sock = proc.socket
    (tmp_path / "t.txt").write_text(SHORT_TEXT)
    assert rkllmctl("cache", "put", "fromfile", "--file", str(tmp_path / "t.txt"), socket=sock).returncode == 0
    assert rkllmctl("cache", "put", "fromstdin", "-", input="Be brief.", socket=sock).returncode == 0
    assert rkllmctl("cache", "put", "inline", "Answer in French.", socket=sock).returncode == 0
    for name in ("fromfile", "fromstdin", "inline"):
        run = rkllmctl("cache", "wait", name, "--timeout", "60", socket=sock)
        assert run.returncode == 0, run.stderr
    listing = json.loads(rkllmctl("cache", "ls", "--json", socket=sock).stdout)
    assert {r["name"]: r["state"] for r in listing["caches"]} == {"fromfile": "ready", "fromstdin": "ready", "inline": "ready"}
    human = rkllmctl("cache", "ls", socket=sock).stdout
    assert "fromfile" in human and "ready" in human
    assert rkllmctl("cache", "show", "inline", socket=sock).stdout == "Answer in French.\n"
    editor = tmp_path / "editor.sh"
    editor.write_text("#!/bin/sh\nprintf 'Edited text.' > \"$1\"\n")
    editor.chmod(0o755)
    assert rkllmctl("cache", "edit", "inline", socket=sock, env={"EDITOR": str(editor), "VISUAL": ""}).returncode == 0
    assert rkllmctl("cache", "wait", "inline", socket=sock).returncode == 0
    assert rkllmctl("cache", "show", "inline", socket=sock).stdout == "Edited text.\n"
    assert rkllmctl("cache", "rebuild", "--all", socket=sock).returncode == 0
    assert rkllmctl("cache", "rm", "inline", socket=sock).returncode == 0
    assert rkllmctl("cache", "rm", "inline", socket=sock).returncode == 1
    assert rkllmctl("cache", "wait", "nothing-here", "--timeout", "1", socket=sock).returncode == 1


def editor(folder: Path, script: str) -> dict[str, str]:
    """The environment of a cache edit whose editor runs ``script`` (sh; the file is $1)."""
    path = folder / f"editor{len(list(folder.glob('editor*.sh')))}.sh"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return {"EDITOR": str(path), "VISUAL": ""}


def test_cache_edit_tells_the_daemon_at_once(make_daemon, tmp_path: Path) -> None:
    """What the editor saved is in ``cache ls`` as soon as ``cache edit`` returns, without
    waiting for the folder watcher (its debounce here: 5 s)."""
    proc = make_daemon(env={"RKLLMD_CACHE_DEBOUNCE_MS": "5000"})
    with proc.client() as client:
        client.cache_put("rules", "Old text.")
        client.cache_wait("rules", timeout=60)
    for name, expected in (("rules", "Rewritten rules, longer than before."), ("fresh", "A new cache.")):
        run = rkllmctl("cache", "edit", name, socket=proc.socket, env=editor(tmp_path, f"printf '{expected}' > \"$1\""))
        assert run.returncode == 0, run.stderr
        with proc.client() as client:
            row = next(r for r in client.cache_ls()["caches"] if r["name"] == name)
            # The new text's size at once (its build of a few tokens may even be done already:
            # "ready" is then the new text's, as cache.show says below).
            assert row["text_bytes"] == len(expected), row
            assert client.cache_wait(name, timeout=60)["state"] == "ready"
            assert client.cache_show(name)["text"] == expected
    assert (proc.text_dir / "fresh.txt").read_text() == "A new cache."
    unchanged = rkllmctl("cache", "edit", "fresh", socket=proc.socket, env=editor(tmp_path, "true"))
    assert (unchanged.returncode, unchanged.stderr) == (0, "fresh: no changes\n")


@pytest.mark.parametrize("json_flag", [False, True], ids=["text", "json"])
def test_cache_edit_aborts_and_changes_nothing(make_daemon, tmp_path: Path, json_flag: bool) -> None:
    """An editor that cannot run or fails, a text saved empty: exit 1 with one line (or one
    JSON error), no traceback, and the cache as it was; a new name is not created (git's
    "Aborting commit due to empty commit message")."""
    proc = make_daemon()
    with proc.client() as client:
        client.cache_put("rules", "Keep me.")
    cases = [
        ("rules", {"EDITOR": "/nonexistent", "VISUAL": ""}, "cannot run the editor '/nonexistent': No such file or directory; text cache rules not changed"),
        ("rules", editor(tmp_path, ": > \"$1\"; exit 3"), "the editor '{editor}' exited with status 3; text cache rules not changed"),
        ("rules", editor(tmp_path, ": > \"$1\""), "Aborting: empty text cache; text cache rules not changed"),
        ("newname", editor(tmp_path, "printf '  \\n\\n' > \"$1\""), "Aborting: empty text cache; text cache newname not created"),
        ("newname", {"EDITOR": "/nonexistent", "VISUAL": ""}, "cannot run the editor '/nonexistent': No such file or directory; text cache newname not created"),
    ]
    for name, env, message in cases:
        message = message.format(editor=env["EDITOR"])
        run = rkllmctl(*(["--json"] if json_flag else []), "cache", "edit", name, socket=proc.socket, env=env)
        assert run.returncode == 1, (run.stdout, run.stderr)
        assert "Traceback" not in run.stdout + run.stderr
        if json_flag:
            assert json.loads(run.stdout) == {"error": {"code": None, "name": "aborted", "message": message, "details": {}}}
        else:
            assert run.stderr == f"rkllmctl: {message}\n"
        with proc.client() as client:
            assert [r["name"] for r in client.cache_ls()["caches"]] == ["rules"]
            assert client.cache_show("rules")["text"] == "Keep me."
    assert sorted(p.name for p in proc.text_dir.iterdir()) == ["rules.txt"]


def test_a_text_cache_longer_than_the_context_fails_with_one_log_line(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_MODEL_CONTEXT_LENGTH": "64"})
    with proc.client() as client:
        client.cache_put("long", " ".join(f"Rule {i}: be brief." for i in range(40)))
        with pytest.raises(DaemonError) as failed:
            client.cache_wait("long", timeout=60)
        row = client.cache_show("long")
    assert row["state"] == "failed" and "context holds 64" in row["reason"], row
    assert "context holds 64" in failed.value.message
    lines = [line for line in proc.log().splitlines() if "long" in line and "failed" in line]
    assert len(lines) == 1 and lines[0].startswith("ERROR") and row["reason"].split(": ", 1)[1] in lines[0], proc.log()
    assert "Traceback" not in proc.log()


def test_cache_wait_times_out_with_124(make_daemon) -> None:
    proc = make_daemon()
    long_text = " ".join(f"Rule {i}: keep functions short and names clear." for i in range(150))
    with proc.client() as client:
        client.cache_put("slow", long_text)
    run = rkllmctl("cache", "wait", "slow", "--timeout", "0.2", socket=proc.socket)
    assert run.returncode == 124, run.stderr


def _save_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        time.sleep(0.05)
        f.write(text[len(text) // 2 :])


def _save_like_vim(path: Path, text: str) -> None:
    probe = path.parent / "4913"
    probe.write_text("")
    probe.unlink()
    swap = path.parent / f".{path.name}.swp"
    swap.write_bytes(b"\0" * 64)
    backup = path.parent / f"{path.name}~"
    os.rename(path, backup)
    path.write_text(text)
    backup.unlink()
    swap.unlink()


def _save_like_gedit(path: Path, text: str) -> None:
    tmp = path.parent / ".goutputstream-ABC123"
    tmp.write_text(text)
    os.rename(tmp, path)


def _save_like_vscode(path: Path, text: str) -> None:
    with open(path, "r+") as f:
        f.truncate(0)
    time.sleep(0.05)
    with open(path, "w") as f:
        f.write(text)


def _delete_and_create(path: Path, text: str) -> None:
    path.unlink()
    time.sleep(0.05)
    path.write_text(text)


@pytest.mark.parametrize("save", [_save_in_place, _save_like_vim, _save_like_gedit, _save_like_vscode, _delete_and_create], ids=lambda f: f.__name__[1:])
def test_each_editor_save_pattern_rebuilds_exactly_once(make_daemon, save) -> None:
    proc = make_daemon(env={"RKLLMD_CACHE_DEBOUNCE_MS": "200"})
    path = proc.text_dir / "notes.txt"
    path.write_text("Answer in English.")
    first = settle(proc, "notes")
    before = builds(proc)
    new_text = "Answer in German, politely."
    save(path, new_text)
    ready = settle(proc, "notes")
    assert builds(proc) == before + 2  # notes once, and settle's barrier
    assert ready["tokens"] != first["tokens"] or ready["built_at"] > first["built_at"]
    with proc.client() as client:
        result = client.generate("Hello!", system=new_text, max_tokens=2).wait()
    assert result.cache == "notes" and result.stats["cached_tokens"] == ready["tokens"]


def test_saving_unchanged_content_builds_nothing(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_CACHE_DEBOUNCE_MS": "150"})
    path = proc.text_dir / "same.txt"
    path.write_text(SHORT_TEXT)
    settle(proc, "same")
    before = builds(proc)
    _save_like_vim(path, SHORT_TEXT)
    path.touch()
    settle(proc, "same")
    assert builds(proc) == before + 1  # settle's barrier alone


def test_deleting_the_text_deletes_its_binary(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_CACHE_DEBOUNCE_MS": "100"})
    (proc.text_dir / "gone.txt").write_text(SHORT_TEXT)
    settle(proc, "gone")
    assert "gone.state" in state_dir_files(proc)
    (proc.text_dir / "gone.txt").unlink()
    poll(lambda: not any(f.startswith("gone.") for f in state_dir_files(proc)), 30, "gone's binary cache deleted")
    with proc.client() as client:
        assert [row["name"] for row in client.cache_ls()["caches"]] == [BARRIER]


def test_kill_9_during_a_build_leaves_nothing_partial(make_daemon) -> None:
    proc = make_daemon()
    long_text = " ".join(f"Rule {i}: keep functions short and names clear." for i in range(120))
    with proc.client() as client:
        client.cache_put("big", long_text)
        deadline = time.monotonic() + 30
        while {r["name"]: r for r in client.cache_ls()["caches"]}["big"]["state"] != "building":
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # Mid-build: its temporary file exists (the state is written as it is prefilled).
    poll(lambda: any(f.startswith(".tmp-") for f in state_dir_files(proc)), 60, "the build's temporary file")
    proc.signal(signal.SIGKILL)
    proc.wait()
    left = state_dir_files(proc)
    assert left and all(f.startswith(".tmp-") for f in left)  # only a hidden temporary file
    proc.start()
    assert not set(left) & set(state_dir_files(proc))  # cleaned at start
    with proc.client() as client:
        ready = client.cache_wait("big", timeout=120)
    assert ready["state"] == "ready" and ready["tokens"] > 500


def _tamper_flip(state: Path, meta: Path) -> None:
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))


def _tamper_truncate(state: Path, meta: Path) -> None:
    state.write_bytes(state.read_bytes()[:1000])


def _tamper_foreign_model(state: Path, meta: Path) -> None:
    doc = json.loads(meta.read_text())
    doc["identity"]["model_fingerprint"] = "0" * 64
    meta.write_text(json.dumps(doc))


def _tamper_wrong_text(state: Path, meta: Path) -> None:
    doc = json.loads(meta.read_text())
    doc["text_sha256"] = "f" * 64
    meta.write_text(json.dumps(doc))


def _tamper_garbage_meta(state: Path, meta: Path) -> None:
    meta.write_bytes(os.urandom(200))


@pytest.mark.parametrize("tamper", [_tamper_flip, _tamper_truncate, _tamper_foreign_model, _tamper_wrong_text, _tamper_garbage_meta], ids=lambda f: f.__name__[8:])
def test_bad_binary_caches_are_refused_and_rebuilt(make_daemon, tamper) -> None:
    proc = make_daemon()
    with proc.client() as client:
        client.cache_put("t", SHORT_TEXT)
        good = client.cache_wait("t", timeout=60)
    proc.stop()
    [state] = proc.binary_dir.rglob("t.state")
    meta = state.with_name("t.meta.json")
    tamper(state, meta)
    proc.start()
    with proc.client() as client:
        ready = client.cache_wait("t", timeout=60)
        result = client.generate("Hello!", cache="t", max_tokens=2).wait()
    assert ready["built_at"] > good["built_at"]  # rebuilt, not adopted
    assert result.stats["cached_tokens"] == good["tokens"]
    assert "refused" in proc.log() or tamper is _tamper_wrong_text


def test_cached_and_uncached_greedy_outputs_are_identical(make_daemon) -> None:
    proc = make_daemon(env=TEXT_CACHES_ONLY)
    with proc.client() as client:
        client.cache_put("eq", SHORT_TEXT)
        n = client.cache_wait("eq", timeout=60)["tokens"]
        for prompt in PROMPTS:
            cached = client.generate(prompt, cache="eq", max_tokens=8).wait()
            cold = client.generate(prompt, system=SHORT_TEXT, no_cache=True, max_tokens=8).wait()
            assert cached.stats["cached_tokens"] == n and cached.cache == "eq"
            assert cold.stats["cached_tokens"] == 0 and cold.cache is None
            assert cached.text == cold.text, prompt
            assert cached.stats["completion_tokens"] == cold.stats["completion_tokens"]


def test_automatic_prefix_use_picks_the_longest_match(make_daemon) -> None:
    proc = make_daemon(env=TEXT_CACHES_ONLY)
    base = "Be brief."
    # A cache whose text carries a whole exchange extends the plain one's prefix.
    longer = base + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>system\nNow be formal."
    with proc.client() as client:
        client.cache_put("short", base)
        client.cache_put("long", longer)
        short_tokens = client.cache_wait("short", timeout=60)["tokens"]
        long_tokens = client.cache_wait("long", timeout=60)["tokens"]
        plain = client.generate("What is 2+2?", system=base, max_tokens=4).wait()
        chat = client.generate(
            messages=[
                {"role": "system", "content": base},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "system", "content": "Now be formal."},
                {"role": "user", "content": "What is 2+2?"},
            ],
            max_tokens=4,
        ).wait()
        unrelated = client.generate("What is 2+2?", system="Something else.", max_tokens=4).wait()
    assert (plain.cache, plain.stats["cached_tokens"]) == ("short", short_tokens)
    assert (chat.cache, chat.stats["cached_tokens"]) == ("long", long_tokens)
    assert unrelated.cache is None and unrelated.stats["cached_tokens"] == 0


def test_memory_lru_respects_its_budget(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_CACHE_MEMORY_BUDGET_MB": "2", **TEXT_CACHES_ONLY})
    texts = {f"c{i}": f"Answer every question in language number {i}, briefly and politely, please." for i in range(3)}
    with proc.client() as client:
        for name, text in texts.items():
            client.cache_put(name, text)
        sizes = {name: client.cache_wait(name, timeout=60)["binary_bytes"] for name in texts}
        assert 2 * max(sizes.values()) <= 2 << 20 < 3 * min(sizes.values())  # two fit, three do not
        for name in texts:
            client.generate("Hi", cache=name, max_tokens=1).wait()
        listing = client.cache_ls()
        in_memory = {r["name"] for r in listing["caches"] if r["in_memory"]}
        assert in_memory == {"c1", "c2"}  # c0 was least recently used
        assert listing["memory"]["used_bytes"] <= 2 << 20
        client.generate("Hi", cache="c0", max_tokens=1).wait()
        in_memory = {r["name"] for r in client.cache_ls()["caches"] if r["in_memory"]}
        assert in_memory == {"c2", "c0"}


def test_hostile_text_files_are_reported_not_followed(make_daemon, tmp_path: Path) -> None:
    proc = make_daemon()
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (proc.text_dir / "link.txt").symlink_to(secret)
    os.mkfifo(proc.text_dir / "fifo.txt")
    (proc.text_dir / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with open(proc.text_dir / "huge.txt", "wb") as f:
        f.truncate(10 << 30)  # 10 GB, sparse
    (proc.text_dir / "bad\x01name.txt").write_text("x")
    with proc.client() as client:
        client.cache_rebuild()
        rows = {r["name"]: r for r in client.cache_ls()["caches"]}
        with pytest.raises(DaemonError):
            client.generate("hi", cache="link").wait()
        assert client.ping()["pong"]
    assert rows["link"]["state"] == "failed" and "symbolic link" in rows["link"]["reason"]
    assert rows["fifo"]["state"] == "failed" and "regular file" in rows["fifo"]["reason"]
    assert rows["latin1"]["state"] == "failed" and "UTF-8" in rows["latin1"]["reason"]
    assert rows["huge"]["state"] == "failed" and "limit" in rows["huge"]["reason"]
    assert any(r["reason"] == "invalid cache name" for r in rows.values())
    assert "top secret" not in json.dumps(rows)


@pytest.mark.parametrize(
    "family, restored",
    [
        ("phi-3.5-mini-instruct", True),  # the system-only rendering ends with <|endoftext|>: dropped
        # Gemma 3 folds the system text into the first user turn: only "<bos>" is shared.
        # Llama 3.2's prefix holds today's date and ends with "<|eot_id|>". SmolLM2's
        # tokenizer, to which these markers are no special tokens, merges their ">" with
        # the "<" that follows in a prompt, so the backend refuses the prefix's tokens and
        # prefills all: exact, but nothing restored (the models' own tokenizers split there).
        ("gemma-3-it", False),
        ("llama-3.2-instruct", False),
    ],
)
def test_cache_exact_with_other_families_templates(make_daemon, family, restored) -> None:
    """SmolLM2 rendered with another family's template: the cached prefix is what every
    conversation starts with, and output with the cache equals output without."""
    proc = make_daemon(env={"RKLLMD_MODEL_CHAT_TEMPLATE": family, **TEXT_CACHES_ONLY})
    with proc.client() as client:
        client.cache_put("fam", SHORT_TEXT)
        n = client.cache_wait("fam", timeout=120)["tokens"]
        for prompt in PROMPTS[:3]:
            cached = client.generate(prompt, cache="fam", max_tokens=6).wait()
            cold = client.generate(prompt, system=SHORT_TEXT, no_cache=True, max_tokens=6).wait()
            assert cached.stats["cached_tokens"] == (n if restored else 0) and cold.stats["cached_tokens"] == 0
            assert cached.text == cold.text, prompt


def test_a_template_refusing_system_messages_fails_the_text_cache(make_daemon) -> None:
    proc = make_daemon(env={"RKLLMD_MODEL_CHAT_TEMPLATE": "gemma-2-it"})
    with proc.client() as client:
        client.cache_put("sys", SHORT_TEXT)
        deadline = time.monotonic() + 30
        while (row := next(r for r in client.cache_ls()["caches"] if r["name"] == "sys"))["state"] != "failed":
            assert time.monotonic() < deadline, row
            time.sleep(0.1)
        assert row["reason"] == "text cache refused: chat template gemma-2-it: System role not supported"


# -- the trailing newline an editor adds ----------------------------------------------------
RULES = "House rules: answer in English, cite the manual's section, and never guess a register address."


@pytest.mark.parametrize("file_ends, request_ends", [("\n", ""), ("", "\n"), ("\r\n", "\n\n")], ids=["file", "request", "both"])
def test_trailing_line_breaks_neither_miss_nor_change_the_prefix(make_daemon, file_ends, request_ends) -> None:
    """A text cache's file and a request's system message are the same text whether or not
    they end with line breaks (docs/caches.md): the cache is hit, and the answer is the
    one of the text without them, with or without the cache."""
    proc = make_daemon(env=TEXT_CACHES_ONLY)
    (proc.text_dir / "rules.txt").write_bytes((RULES + file_ends).encode())
    with proc.client() as client:
        n = client.cache_wait("rules", timeout=60)["tokens"]
        hit = client.generate("Which register holds the clock divider?", system=RULES + request_ends, max_tokens=8).wait()
        assert hit.cache == "rules" and hit.stats["cached_tokens"] == n
        bare = client.generate("Which register holds the clock divider?", system=RULES, no_cache=True, max_tokens=8).wait()
        named = client.generate("Which register holds the clock divider?", cache="rules", max_tokens=8).wait()
        assert hit.text == bare.text == named.text
        assert hit.stats["prompt_tokens"] == bare.stats["prompt_tokens"] == named.stats["prompt_tokens"]


def test_the_readme_recipe_with_cat_hits_the_cache(make_daemon, tmp_path: Path) -> None:
    """README: ``rkllmctl generate --system "$(cat house-rules.txt)"`` on a file an editor
    saved with a final newline (the shell drops it) uses the cache built from that file."""
    proc = make_daemon(env=TEXT_CACHES_ONLY)
    rules = tmp_path / "house-rules.txt"
    rules.write_text(RULES + "\n")
    put = rkllmctl("cache", "put", "rules", "--file", str(rules), socket=proc.socket)
    assert put.returncode == 0, put.stderr
    with proc.client() as client:
        n = client.cache_wait("rules", timeout=60)["tokens"]
    shell = subprocess.run(
        ["bash", "-c", f'"$PYTHON" -m rkllmctl --socket "$SOCK" generate --max-tokens 4 --system "$(cat "$RULES")" "Hello"'],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "SOCK": str(proc.socket), "RULES": str(rules)},
    )
    assert shell.returncode == 0, shell.stderr
    assert f"{n} from cache rules" in shell.stderr, shell.stderr

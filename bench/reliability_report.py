"""Run the reliability scenarios and write docs/reliability.md (issue 6).

    python bench/reliability_report.py                    # the tests, a 5-minute soak, the document
    python bench/reliability_report.py --soak-minutes 30  # the full soak
    python bench/reliability_report.py --soak-minutes 0   # the tests only (the soak row says so)

The scenarios are the CI tests (tests/test_fuzz.py, test_load.py, test_clients.py,
test_faults.py, test_hostile.py, and the crash and hostile-file tests of test_caches.py
and test_generate.py) plus bench/soak.py. Each test records its figures (see
tests/reliability.py); this script runs them with RKLLMD_RELIABILITY_JSON set, reads the
figures and pytest's verdicts, and writes the table. Run it as root to include the
scenarios that mount a small tmpfs or create a throwaway user (they are skipped otherwise,
and the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
TESTS = [
    "tests/test_fuzz.py", "tests/test_load.py", "tests/test_clients.py", "tests/test_faults.py", "tests/test_hostile.py",
    "tests/test_caches.py::test_kill_9_during_a_build_leaves_nothing_partial",
    "tests/test_caches.py::test_hostile_text_files_are_reported_not_followed",
    "tests/test_caches.py::test_bad_binary_caches_are_refused_and_rebuilt",
    "tests/test_generate.py::test_killed_client_frees_the_worker_within_a_second",
    "tests/test_decode_kernel.py::test_unusable_library_is_rebuilt",
    "tests/test_decode_kernel.py::test_failing_compiler_is_reported",
    "tests/test_decode_kernel.py::test_daemon_without_a_compiler_serves_in_numpy_and_says_so",
    "tests/test_decode_kernel.py::test_daemon_asked_for_c_without_a_compiler_exits_with_the_reason",
]

Fig = dict[str, Any]
# (test function, what was tried, how many times, what happened, what was lost); the last
# three are built from the figures the test recorded (None when it recorded none).
Row = tuple[str, str, Callable[[Fig], str], Callable[[Fig], str], Callable[[Fig], str]]


def _codes(f: Fig) -> str:
    return ", ".join(f"{code}×{n}" for code, n in f["codes"].items())


ROWS: list[tuple[str, Row]] = [
    ("fuzz", ("test_thousands_of_hostile_messages_get_documented_answers",
              "Protocol fuzzing (hypothesis, derandomized): random bytes; truncated, spliced, bit-flipped requests; nesting 17–3000 deep; "
              "a wrong type or out-of-range value in every field of every op; bad `v`/`id`/`op`; hostile cache names; strings, arrays "
              "and maps around the 1 MiB / 65,536 / 4,096 limits; extra, empty and REQ-style frames; 2,200 pipelined requests",
              lambda f: f"{f['messages']:,} messages in {f['seconds']} s",
              lambda f: f"each answered in the documented envelope with the error a model of docs/protocol.md predicts ({_codes(f)}) "
                        f"or a result; then status and the greedy reference answer correct; RSS +{f['rss_growth_kb']} KiB "
                        f"(baseline {f['rss_baseline_mb']} MiB)",
              lambda f: "nothing: the daemon counted exactly the messages sent, and sent exactly the errors received")),
    ("fuzz-over-16MiB", ("test_messages_over_16_mib_are_dropped_unread", "Messages over 16 MiB (16 MiB + 1, + up to 1 MiB, 48 MiB)",
                         lambda f: str(f["messages"]),
                         lambda f: "not read (libzmq drops the connection), not counted; the client's ZeroMQ reconnects and is served",
                         lambda f: "the oversize messages, as documented")),
    ("load", ("test_sixteen_clients_all_answered_in_fair_order_with_flat_memory",
              "Load: 16 clients at once, 25 generations each (1–2 tokens; ~⅓ with a text cache, ~15 % cancelled at once)",
              lambda f: f"{f['sent']} generations in {f['seconds']} s",
              lambda f: f"all answered once; worst queue wait {f['queue_ms_worst']:.0f} ms against an average of "
                        f"{f['queue_ms_avg']:.0f} ms ({f['worst_over_avg']}×), clients' mean waits within {f['client_mean_spread']}×, "
                        f"never more than {f['max_position']} ahead (one generation took {f['service_ms_avg']:.0f} ms on "
                        f"average, {f['service_ms_max']:.0f} at most); RSS +{f['rss_growth_kb']} KiB from request 100 to 400; "
                        f"fds {f['fds_after_100']} → {f['fds_end']}",
              lambda f: f"lost {f['lost']}, duplicated {f['duplicated']}, failed {f['failures']}")),
    ("soak", ("soak", "Soak (bench/soak.py): the same mix, 16 clients, for a set time",
              lambda f: f"{f['answered']:,} generations in {f['minutes']:g} min",
              lambda f: f"worst queue wait {f['queue_ms_worst']:.0f} ms against {f['queue_ms_avg']:.0f} ms on average "
                        f"({f['worst_over_avg']}×), clients' mean waits within {f['client_mean_spread']}×; RSS "
                        f"{f['rss_mb_after_100']} → {f['rss_mb_end']} MiB (+{f['rss_growth_kb']} KiB, max {f['rss_mb_max']}); "
                        f"fds {f['fds_after_100']} → {f['fds_end']}",
              lambda f: f"lost {f['lost']}, duplicated {f['duplicated']}, failed {f['failures']}")),
    ("slow-client", ("test_stopped_reader_is_aborted_without_stalling_others",
                     "A client stops reading mid-stream (SIGSTOP), `slow_client_timeout` 2 s, 4096 tokens asked",
                     lambda f: "1",
                     lambda f: f"its generation aborted after {f['tokens_generated_for_it']} tokens; the next client waited "
                               f"{f['stall_s']} s (decoding at {f['decode_tps']} tokens/s); daemon RSS peak +{f['peak_rss_growth_kb']} KiB; "
                               "woken (SIGCONT) it read its text and `done: cancelled`",
                     lambda f: "only the stopped client's generation, by design")),
    ("flood-then-stop", ("test_request_flood_then_stop_is_held_within_bounds", "A client sends 20,000 `status` requests, then stops (SIGSTOP)",
                         lambda f: f"{f['requests']:,} requests",
                         lambda f: f"replies held up to 8 MiB, {f['replies_dropped']:,} dropped after the timeout (counted in "
                                   f"`replies_dropped`); daemon RSS peak +{f['peak_rss_growth_kb'] // 1024} MiB; another client's "
                                   f"pings took at most {f['worst_other_ping_s']} s meanwhile",
                         lambda f: "replies to the stopped client, by design")),
    ("vanishing-together", ("test_clients_vanishing_together_free_the_worker_and_the_queue",
                            "6 streaming clients killed at once (1 generating, 5 queued)", lambda f: str(f["clients"]),
                            lambda f: f"noticed at once (connection monitor): queue emptied, worker idle {f['seconds_to_free']} s after "
                                      f"the kill (one checkpoint here: {f['checkpoint_s']} s); generations started: "
                                      f"{f['generations_started']} of 6",
                            lambda f: "nothing of anyone else")),
    ("killed-client", ("test_killed_client_frees_the_worker_within_a_second", "A streaming client killed (kill -9)",
                       lambda f: "1", lambda f: "worker free within 1 s", lambda f: "nothing of anyone else")),
    ("connect-burst", ("test_burst_of_connections_leaks_nothing",
                       "Connect/disconnect bursts: real clients (ping), bare connect(2), DEALERs that send and vanish or say nothing",
                       lambda f: f"{f['connections']:,} connections (+700 warm-up)",
                       lambda f: f"fds back to {f['fds_after']} (were {f['fds_before']}); RSS +{f['rss_growth_kb']} KiB",
                       lambda f: "nothing")),
    ("kill-9-generation", ("test_kill_9_during_a_generation_loses_only_that_generation", "kill -9 of the daemon during a generation, restart",
                           lambda f: "1",
                           lambda f: f"restarted in {f['restart_s']} s over the stale socket; the binary cache adopted whole "
                                     f"({f['caches_rebuilt']} rebuilt), byte-identical; answers correct",
                           lambda f: "the generation in flight (its client is told the connection closed)")),
    ("kill-9-build", ("test_kill_9_during_a_build_leaves_nothing_partial", "kill -9 of the daemon during a cache build, restart",
                      lambda f: "1", lambda f: "only a hidden temporary file left, removed at start; the cache rebuilt",
                      lambda f: "the build in flight (redone)")),
    ("tampered-binary", ("test_bad_binary_caches_are_refused_and_rebuilt",
                         "Binary caches flipped, truncated, of another model, of other text, garbage meta",
                         lambda f: "5", lambda f: "refused (checksum, size, identity), rebuilt, then used", lambda f: "nothing")),
    ("disk-full", ("test_disk_full_while_writing_a_binary_cache", "Disk full while writing a binary cache (6 MB tmpfs, ~23 MB state)",
                   lambda f: "1",
                   lambda f: f"`cache ls`: failed, “{f['reason'].split(' (')[0]}”; the old binary cache untouched and adopted again "
                             "when the old text came back; no partial file; daemon serving",
                   lambda f: "nothing (the new cache is not built)")),
    ("read-only-binary-folder", ("test_read_only_cache_folders", "Binary cache folder read-only (running, then at start)",
                                 lambda f: "2", lambda f: "builds fail with “Read-only file system” in `cache ls`; existing caches "
                                                          "still used; restarts and adopts them",
                                 lambda f: "nothing")),
    ("read-only-text-folder", ("test_text_folder_read_only", "Text cache folder read-only", lambda f: "1",
                               lambda f: "`cache put` and `cache rm` refused with `303 storage` (“Read-only file system”); existing caches used", lambda f: "nothing")),
    ("vanished-folders", ("test_vanished_cache_folders_are_made_again", "Binary, then text cache folder deleted while running",
                          lambda f: "2", lambda f: "binary folder made again at the next build (missing caches rebuilt at use); text "
                                                   "folder made again (0770) and watched again within a second",
                          lambda f: "the deleted caches, as their texts were deleted")),
    ("model", ("test_missing_or_broken_model_fails_clearly_without_binding",
               "Model file missing, empty, cut in the header, in the data, at the end, not GGUF",
               lambda f: "6", lambda f: "exit status 1 with the path and the reason (e.g. “is truncated: tensor … ends past the end "
                                        "of the file”); the socket never bound", lambda f: "nothing (nothing started)")),
    ("kernel-damaged", ("test_unusable_library_is_rebuilt",
                        "The compiled decode step in `kernels/` replaced by garbage, made group-writable, or left by another build",
                        lambda f: "3", lambda f: "never loaded (not a library, writable by others, another source/compiler/CPU hash): "
                                                 "built again, atomically, and loaded; the other build removed",
                        lambda f: "nothing (0.3 s of compiling)")),
    ("no-compiler", ("test_daemon_without_a_compiler_serves_in_numpy_and_says_so", "No C compiler on the machine (CC names nothing, "
                     "no cc in PATH)", lambda f: "1",
                     lambda f: "serves with the numpy step; `rkllmctl status` says `decode: numpy (no C kernel: no C compiler found "
                               "…)` and the log why; the greedy reference answer correct",
                     lambda f: "speed only (the numpy step is 1.5x slower)")),
    ("compiler-fails", ("test_failing_compiler_is_reported", "A compiler that fails (exit 4, an error on stderr)", lambda f: "1",
                        lambda f: "the numpy step, with the compiler's last lines in the reason; nothing left in `kernels/` but "
                                  "its lock", lambda f: "speed only")),
    ("kernels-c-required", ("test_daemon_asked_for_c_without_a_compiler_exits_with_the_reason",
                            "`model.kernels = c` without a compiler", lambda f: "1",
                            lambda f: "exit status 1 with “model.kernels = c: no C compiler found”; the socket never bound",
                            lambda f: "nothing (nothing started)")),
    ("socket-deleted", ("test_socket_file_deleted_is_bound_again", "Socket file deleted while running; then its whole folder",
                        lambda f: "2", lambda f: f"bound again within {f['rebound_within_s']} s (folder 0750, lock, socket 0660); "
                                                 "connected clients kept streaming; a second daemon still refused",
                        lambda f: "nothing")),
    ("socket-taken-over", ("test_socket_path_taken_over_stops_the_daemon_with_an_error", "Another process's socket renamed over ours",
                           lambda f: "1", lambda f: "the daemon stops cleanly with exit status 1 (systemd restarts it), leaving the "
                                                    "other socket alone",
                           lambda f: "requests in flight end with `shutting_down`")),
    ("modes", ("test_socket_folders_and_files_keep_their_modes_under_any_umask", "Daemon started under umask 000 and 077",
               lambda f: "2 × 9 paths", lambda f: "socket folder 0750, socket 0660, text folder 0770, text caches 0660, binary "
                                                 "folders 0750, binary caches 0640", lambda f: "nothing")),
    ("outside-user", ("test_a_user_outside_the_group_cannot_connect", "rkllmctl as a throwaway user outside the daemon's group",
                      lambda f: "1", lambda f: f"exit status {f['exit_status']} (“permission denied … group”); the same user in the "
                                               f"group: exit {f['member_exit_status']}", lambda f: "nothing")),
    ("names", ("test_no_cache_name_reaches_outside_the_folders", "Cache names that try to name paths (../, /, NUL, \\, %2e, …) on every verb",
               lambda f: "120", lambda f: "refused (`invalid_name`) or a file exactly in the text folder; nothing created elsewhere, "
                                          "no binary left after `cache rm`", lambda f: "nothing")),
    ("symlink-target", ("test_symlinked_text_cache_never_touches_its_target", "A text cache that is a symlink to a file outside: show, rm, put",
                        lambda f: "3", lambda f: "never followed: rm removes the link, put replaces the link; the target unchanged",
                        lambda f: "nothing")),
    ("file-kinds", ("test_other_kinds_of_file_in_the_text_folder_are_refused", "A folder, a socket, a device named NAME.txt",
                    lambda f: "3", lambda f: "refused with a reason in `cache ls`, never read", lambda f: "nothing")),
    ("hostile-texts", ("test_hostile_text_files_are_reported_not_followed",
                       "Symlink out, FIFO, 10 GB sparse file, invalid UTF-8, control characters in a name",
                       lambda f: "5", lambda f: "each refused or listed as failed with its reason; never followed or read whole",
                       lambda f: "nothing")),
]


def run_tests(figures_path: Path, junit: Path) -> int:
    env = {**os.environ, "RKLLMD_RELIABILITY_JSON": str(figures_path)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
    print("$", " ".join(command), flush=True)
    return subprocess.call(command, cwd=ROOT, env=env)


def verdicts(junit: Path) -> dict[str, tuple[str, str, float]]:
    """Test function -> (verdict, message, seconds), the worst over its parameters."""
    out: dict[str, tuple[str, str, float]] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name", "").split("[")[0]
        verdict, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                verdict = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "").splitlines()[0][:120] if node.get("message") else ""
        seconds = float(case.get("time", 0))
        old = out.get(name)
        if old is None or rank[verdict] > rank[old[0]]:
            out[name] = (verdict, message, seconds + (old[2] if old else 0))
        else:
            out[name] = (old[0], old[1], old[2] + seconds)
    return out


def table(figures: dict[str, Fig], results: dict[str, tuple[str, str, float]]) -> list[str]:
    lines = ["| what was tried | times | what happened | what was lost | verdict |", "|---|---|---|---|---|"]
    for key, (test, tried, times, happened, lost) in ROWS:
        fig = figures.get(key, {})
        verdict, message, seconds = results.get(test, ("not run", "", 0.0))
        if key == "soak":
            verdict = "passed" if fig and not (fig["lost"] or fig["duplicated"] or fig["failures"]) else ("not run" if not fig else "failed")
            seconds = fig.get("seconds", 0.0) if fig else 0.0
        try:
            cells = [times(fig), happened(fig), lost(fig)] if (fig or key not in FIGURED) and verdict == "passed" else None
        except KeyError:
            cells = None
        if cells is None:
            cells = ["—", f"{verdict.upper()}{': ' + message if message else ''}", "—"]
        where = f"`{test}`" if key != "soak" else "`bench/soak.py`"
        lines.append(f"| {tried} ({where}) | {cells[0]} | {cells[1]} | {cells[2]} | {verdict}, {seconds:.0f} s |")
    return lines


FIGURED = {"fuzz", "fuzz-over-16MiB", "load", "soak", "slow-client", "flood-then-stop", "vanishing-together", "connect-burst",
           "kill-9-generation", "disk-full", "socket-deleted", "outside-user"}


def collect(figures_path: Path) -> dict[str, Fig]:
    figures: dict[str, Fig] = {}
    if figures_path.exists():
        for line in figures_path.read_text().splitlines():
            row = json.loads(line)
            figures[row.pop("scenario")] = row
    return figures


def write(figures: dict[str, Fig], results: dict[str, tuple[str, str, float]], soak_minutes: float, started: float) -> None:
    host = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {'root' if os.geteuid() == 0 else 'not root'}"
    load = f"load average {LOAD_AT_START:.1f} at the start, {os.getloadavg()[0]:.1f} at the end: timings stretch with what else runs"
    text = [
        "# Reliability: what was tried, and what was lost",
        "",
        "This file is written by `python bench/reliability_report.py` (about "
        f"{(time.monotonic() - started) / 60:.0f} minutes here); do not edit it by hand. The scenarios are the CI tests named "
        "in each row plus `bench/soak.py`; the figures are what they measured on this run "
        f"({time.strftime('%Y-%m-%d')}, {host}, CPU backend with SmolLM2-135M; {load}). The goal in the last column but one is "
        "*nothing*.",
        "",
        "Commands:",
        "",
        "```sh",
        "python bench/reliability_report.py                      # tests + a 5-minute soak, rewrites this file",
        "python bench/reliability_report.py --soak-minutes 30    # the full half-hour soak",
        "python bench/soak.py --minutes 30                       # the soak alone (prints its figures)",
        "python -m pytest tests/test_fuzz.py tests/test_load.py tests/test_clients.py tests/test_faults.py tests/test_hostile.py",
        "```",
        "",
        "Run as root: the full-disk and read-only scenarios mount a small tmpfs, the outside-user scenario creates a "
        "throwaway user and group (removed afterwards); without root they are skipped and marked so below.",
        "",
        *table(figures, results),
        "",
        "## What the daemon does about it",
        "",
        "- **Clients that stop reading.** ZeroMQ's queue towards each client is 16 messages and the kernel's send buffer "
        "of each connection ~16 KiB (set through `ZMQ_SRCFD`), so a stopped reader is noticed after a few dozen "
        "messages instead of ~1,300 (libzmq's 1,000 plus the kernel's ~208 KiB). Its text is then coalesced, its "
        "one-shot replies held in order (at most 8 MiB, then dropped and counted), and after "
        "`daemon.slow_client_timeout` without progress its generations are aborted and a final `done` "
        "(`reason: client not reading`) waits for it. Before this change the timeout only started once those buffers "
        "were full: measured with a 2 s timeout on a loaded machine, the stopped client's generation ran on for 1,056 "
        "tokens and 277 s, the other clients waiting all along.",
        "- **Clients that vanish** are noticed from the ROUTER's connection monitor: their running generation is "
        "aborted and their queued ones are removed before they run (before, each queued one was started, found gone "
        "at its first message and aborted, one after the other).",
        "- **The socket file deleted**: checked every second and bound again (folder and lock file too); connected "
        "clients keep their connections. A path another process took over is left alone and the daemon exits 1.",
        "- **Cache folders** deleted while running are made again (the text folder is watched again); folders the daemon "
        "makes get their modes whatever the umask (before: `mkdir` under umask 000 made them world-writable).",
        "- **Disk full**: the failed build says so (“no space left on device …”) even when the backend's own error does "
        "not (numpy reports “N requested and M written”); the old binary cache is kept.",
        "- **A text cache deleted during its build** no longer leaves the finished binary cache behind.",
        "",
        "## Limits of what is shown",
        "",
        "- A client whose *process* runs but whose application does not read is buffered by its own ZeroMQ first "
        "(RCVHWM, 1,000 messages by default): the daemon cannot see that, so such a client holds the model for up to "
        "1,000 more tokens before the timeout starts. `rkllmctl` always reads.",
        "- One connection's held replies are bounded (8 MiB), the number of connections is not: any member of the "
        "group can open many. The group is the trust boundary.",
        "- The NPU backend is covered here only through the daemon's own code paths; its fake runtime has its own tests "
        "(tests/test_rkllm_daemon.py).",
    ]
    soak = figures.get("soak")
    if soak_minutes and soak:
        text += ["", "## Soak", "", f"`python bench/soak.py --minutes {soak_minutes:g}`:", "", "```"]
        text += [f"{k:>20}: {v}" for k, v in soak.items()]
        text += ["```"]
    DOC.write_text("\n".join(text) + "\n")
    print(f"wrote {DOC}")


LOAD_AT_START = os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--soak-minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rkrel") as tmp:
        figures_path, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        status = run_tests(figures_path, junit)
        figures = collect(figures_path)
        results = verdicts(junit) if junit.exists() else {}
        if args.soak_minutes > 0:
            soak_json = Path(tmp) / "soak.json"
            command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", str(args.soak_minutes), "--json", str(soak_json)]
            print("$", " ".join(command), flush=True)
            status |= subprocess.call(command, cwd=ROOT)
            if soak_json.exists():
                figures["soak"] = json.loads(soak_json.read_text())
        write(figures, results, args.soak_minutes, started)
    return status


if __name__ == "__main__":
    sys.exit(main())

"""rkllmd-http.service: the offline checks of the unit, and the gateway under a booted systemd
in front of rkllmd.service, both running this checkout under their units' full hardening."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from test_systemd import (CONFIG, MAX_EXPOSURE, ROOT, checkout_dropin, needs_analyze, requires_namespaces,
                          sd)  # noqa: F401  (sd: the module's own booted systemd, as test_systemd boots it)

UNIT = ROOT / "systemd" / "rkllmd-http.service"
SERVICE = "rkllmd-http.service"
ASK = r'''
import json, sys, openai
client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused", max_retries=0, timeout=300)
reply = client.chat.completions.create(model=client.models.list().data[0].id, temperature=0, max_tokens=48,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
print(json.dumps({"text": reply.choices[0].message.content, "model": reply.model}))
'''


@pytest.mark.systemd
@needs_analyze
def test_unit_verifies_and_its_exposure_is_low(tmp_path) -> None:
    prefix, stage = tmp_path / "prefix", tmp_path / "stage"
    subprocess.run(["make", "-s", "-C", str(ROOT), "install-systemd", f"DESTDIR={stage}", f"PREFIX={prefix}"],
                   check=True, capture_output=True)
    for program in ("rkllmd", "rkllmd-http"):
        stub = prefix / "bin" / program
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    unit = stage / "usr/local/lib/systemd/system" / SERVICE
    assert f"ExecStart={prefix}/bin/rkllmd-http " in unit.read_text()
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                            env={"SYSTEMD_UNIT_PATH": f"{unit.parent}:"})
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60)
    score = float(re.search(r"Overall exposure level for rkllmd-http\.service: (\d+\.\d+)", r.stdout).group(1))
    print(f"systemd-analyze security exposure of rkllmd-http.service: {score}")
    assert score <= MAX_EXPOSURE, r.stdout
    text = UNIT.read_text()
    assert "Requires=rkllmd.service" in text and re.search(r"^After=rkllmd\.service", text, re.M)
    assert "Group=rkllm" in text


@pytest.mark.systemd
@requires_namespaces
def test_the_gateway_serves_the_daemon_under_systemd(sd) -> None:  # noqa: F811
    sd.install("/etc/systemd/system/rkllmd.service.d/50-checkout.conf",
               checkout_dropin(f"{sys.executable} -m rkllmd --config {CONFIG}"))
    sd.install("/etc/systemd/system/rkllmd-http.service.d/50-checkout.conf",
               checkout_dropin(f"{sys.executable} -m rkllmd_http --config {CONFIG}"))
    sd.install("/usr/local/lib/rkllmd-test/ask.py", ASK)
    sd.systemctl("daemon-reload")
    # Pulls rkllmd.service in first (Requires=, After=); returns on READY=1, once listening.
    start = sd.systemctl("start", SERVICE, check=False)
    assert start.returncode == 0, sd.journal("rkllmd.service") + sd.journal(SERVICE)
    state = sd.show(SERVICE, "ActiveState", "MainPID", "StatusText")
    assert state["ActiveState"] == "active" and state["StatusText"] == "serving on http://127.0.0.1:8080"
    assert sd.show("rkllmd.service", "ActiveState")["ActiveState"] == "active"
    answer = json.loads(sd.run([sys.executable, "/usr/local/lib/rkllmd-test/ask.py"], user="mallory",
                               env={"PYTHONPATH": str(ROOT)}, timeout=300).stdout)
    # mallory may not open the daemon's socket, but may use the HTTP API it serves on loopback.
    assert answer == {"text": "The capital of France is Paris.", "model": "smollm2-135m-instruct"}
    pid = state["MainPID"]
    status = sd.run(["cat", f"/proc/{pid}/status"]).stdout
    rkllm_gid = sd.run(["getent", "group", "rkllm"]).stdout.split(":")[2]
    uid = sd.run(["id", "-u", "rkllmd-http"]).stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s", status, re.M) and re.search(rf"^Gid:\s+{rkllm_gid}\s", status, re.M)
    assert "listening on http://127.0.0.1:8080" in sd.journal(SERVICE)
    sd.systemctl("stop", "rkllmd.service")  # Requires=: the gateway stops with the daemon
    assert sd.show(SERVICE, "ActiveState")["ActiveState"] == "inactive"

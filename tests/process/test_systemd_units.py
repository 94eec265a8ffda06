"""systemd/*.service: systemd-analyze verify is silent, security exposure <= 1.5, key settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.harness import ROOT

UNIT_DIR = ROOT / "systemd"
PLAIN = UNIT_DIR / "gemini-batchd.service"
TEMPLATE = UNIT_DIR / "gemini-batchd@.service"
UNITS = [PLAIN, TEMPLATE]
INSTALLED_BINARY = "/opt/gemini-batchd/venv/bin/gemini-batchd"
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not on PATH")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [ANALYZE, "--no-pager", *args], capture_output=True, text=True, env=env, timeout=60
    )


def verifiable_copies(tmp_path: Path, unit: Path, text: str | None = None) -> list[Path]:
    """Copies of `unit` whose ExecStart binary exists on this machine.

    `verify` fails when an Exec*= binary is missing, and the daemon is not installed in
    /opt/gemini-batchd here, so the copy points at a stub executable instead; every other line
    is unchanged. A template is verified both as itself and as an instance (`@test`), so that
    the specifiers (%i) are expanded.
    """
    stub = tmp_path / "gemini-batchd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    body = (unit.read_text() if text is None else text).replace(INSTALLED_BINARY, str(stub))
    names = [unit.name]
    if unit.name.endswith("@.service"):
        names.append(unit.name.replace("@.service", "@test.service"))
    copies = []
    for name in names:
        copy = tmp_path / name
        copy.write_text(body)
        copies.append(copy)
    return copies


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_verify_prints_nothing(unit: Path, tmp_path: Path) -> None:
    for copy in verifiable_copies(tmp_path, unit):
        result = analyze("verify", str(copy))
        # verify exits 0 even for unknown keys and bad values: the output is what counts.
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), copy.name


@needs_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt setting makes verify speak."""
    text = PLAIN.read_text().replace("UMask=0027", "UMask=0027\nProtectSytem=strict")
    (copy,) = verifiable_copies(tmp_path, PLAIN, text)
    result = analyze("verify", str(copy))
    assert "ProtectSytem" in result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_security_exposure(unit: Path) -> None:
    result = analyze(
        "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)
    )
    assert result.stderr == ""
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout


def settings(unit: Path) -> list[str]:
    return [
        line.strip()
        for line in unit.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", ";"))
    ]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_required_settings(unit: Path) -> None:
    lines = settings(unit)
    for required in [
        "Type=notify",
        "NotifyAccess=main",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "LoadCredential=gemini_api_key:/etc/gemini-batchd/gemini_api_key",
        "User=gemini-batchd",
        "Group=gemini-batchd",
        "UMask=0027",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
    ]:
        assert required in lines, required
    assert any(re.fullmatch(r"WatchdogSec=\d+s?", line) for line in lines)
    assert any(re.fullmatch(r"TimeoutStopSec=\d+s?", line) for line in lines)
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    config = "%i.yaml" if unit == TEMPLATE else "config.yaml"
    assert exec_start == f"ExecStart={INSTALLED_BINARY} run -c /etc/gemini-batchd/{config}"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_api_key_never_in_environment(unit: Path) -> None:
    text = unit.read_text()
    assert not re.search(r"^\s*Environment(File)?=.*(API_KEY|api_key)", text, re.M | re.I)
    assert not re.search(r"^\s*PassEnvironment=", text, re.M)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_every_setting_has_a_comment_above(unit: Path) -> None:
    lines = unit.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", ";", "[")):
            assert number > 0 and lines[number - 1].startswith("#"), f"line {number + 1}: {line}"

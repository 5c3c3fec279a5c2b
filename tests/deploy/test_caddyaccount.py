"""Preflight's check of Caddy's ACME account files, run by sh and python3 on real files: a
torn save (two truncate-and-write saves of one file overlapping, as Caddy 2.6 does them)
is named with its fix; sound accounts and other storage files pass."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from orama_stealth.deploy import caddyaccount


def _account(n: str) -> bytes:
    return json.dumps({"status": "valid", "termsOfServiceAgreed": True,
                       "orders": f"https://ca.test:14000/list-orderz/{n}",
                       "location": f"https://ca.test:14000/my-account/{n}"}, indent="\t").encode()


def _torn(path: Path) -> None:
    # Both writers open with O_TRUNC before either writes; the shorter write lands last. Two
    # registrations with the lab's pebble gave these two sizes of account (192 and 190 bytes).
    longer, shorter = _account("3a5aef98f39a389a"), _account("3a5aef98f39a389")
    a = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    b = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(a, longer)
    os.write(b, shorter)
    os.close(a)
    os.close(b)


def _check(storage: Path) -> list[str]:
    out = subprocess.run(["sh", "-c", caddyaccount.check_command(str(storage))],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return caddyaccount.problems(out)


def test_a_torn_account_file_is_named_with_its_fix(tmp_path: Path) -> None:
    users = tmp_path / "acme" / "ca.test-14000-dir" / "users"
    (users / "default").mkdir(parents=True)
    (users / "ops@example.test").mkdir()
    good = users / "ops@example.test" / "ops@example.test.json"
    good.write_bytes(_account("1"))
    (tmp_path / "acme" / "ca.test-14000-dir" / "challenge_tokens").mkdir()
    (tmp_path / "acme" / "ca.test-14000-dir" / "challenge_tokens" / "x.json").write_text("{")
    assert _check(tmp_path) == []
    assert _check(tmp_path / "missing") == []  # no ACME yet: nothing to check

    torn = users / "default" / "default.json"
    _torn(torn)
    text = torn.read_text()
    # The incident's shape: valid JSON, then a stray "}" (the longer save's last two bytes).
    assert text.endswith('"\n}\n}') and text[:-2] == _account("3a5aef98f39a389").decode()
    problems = _check(tmp_path)
    assert len(problems) == 1, problems
    assert str(torn) in problems[0] and f"{users}/default/default.key" in problems[0]
    assert "systemctl reload caddy" in problems[0]


def test_a_check_that_did_not_finish_is_a_problem() -> None:
    assert caddyaccount.problems("") == ["could not check Caddy's ACME account files: "
                                          "no output"]

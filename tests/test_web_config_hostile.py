"""Hostile inputs to --web.config.file and --config.file (#25): basic auth under a flood of wrong
passwords, user enumeration by timing, passwords bcrypt refuses, and files that are FIFOs."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from conftest import cli, require
from trt_heartbeat.errors import ConfigError
from trt_heartbeat.exporter import config
from trt_heartbeat.exporter.web import config as web_config

PASSWORD = "s3cret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
GUARD = 20.0  # seconds: only bounds a regression that hangs; no test asserts a duration


class Spy:
    """A checkpw that records its calls and, when told, blocks until released."""

    def __init__(self, block: bool = False) -> None:
        self.calls: list[tuple[bytes, bytes]] = []
        self.block, self.entered, self.release = block, threading.Semaphore(0), threading.Event()
        self._lock = threading.Lock()

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.calls.append((password, hashed))
        if self.block:
            self.entered.release()
            self.release.wait(GUARD)
        return bool(bcrypt.checkpw(password, hashed))


def test_an_unknown_user_costs_a_bcrypt_check_of_the_same_cost() -> None:
    # An unknown user was answered without hashing: 0.6 ms against 87 ms, so names showed.
    slow = bcrypt.hashpw(b"x", bcrypt.gensalt(rounds=5))
    spy = Spy()
    auth = web_config.BasicAuth({"prometheus": HASH, "other": slow}, checkpw=spy)
    assert auth.check("nobody", PASSWORD) is False
    assert auth.check("nobody", "x") is False  # not even with another user's password
    assert len(spy.calls) == 2
    assert all(hashed.split(b"$")[2] == b"05" for _, hashed in spy.calls)  # the highest cost


def test_real_bcrypt_unknown_user_is_refused() -> None:
    auth = web_config.BasicAuth({"prometheus": HASH})
    assert auth.check("nobody", PASSWORD) is False
    assert auth.check("prometheus", PASSWORD) is True


@pytest.mark.parametrize(
    "password", ["a" * 100, PASSWORD + "a" * 80, "é" * 40, "a\x00b", PASSWORD + "\x00"]
)
def test_any_password_is_answered_without_raising(password: str) -> None:
    # bcrypt 5 raises on passwords over 72 bytes: the request got no answer and a traceback.
    for user in ("prometheus", "nobody"):
        assert web_config.BasicAuth({"prometheus": HASH}).check(user, password) is False


def test_a_72_byte_password_still_works() -> None:
    password = "p" * 72
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    assert web_config.BasicAuth({"u": hashed}).check("u", password) is True


def test_checks_beyond_the_bound_fail_instead_of_queueing() -> None:
    # A flood of wrong passwords queued for bcrypt while holding request slots: Prometheus got
    # 503. Past `concurrency` running hashes a check gives up after `wait` and counts as failed.
    spy = Spy(block=True)
    auth = web_config.BasicAuth({"prometheus": HASH}, checkpw=spy, concurrency=2, wait=0.01)
    results: list[bool] = []
    running = [
        threading.Thread(target=lambda: results.append(auth.check("prometheus", "wrong")))
        for _ in range(2)
    ]
    for t in running:
        t.start()
    for _ in running:
        assert spy.entered.acquire(timeout=GUARD), "a check never reached the hash"
    try:
        outcome: list[bool] = []
        extra = threading.Thread(target=lambda: outcome.append(auth.check("prometheus", PASSWORD)))
        extra.start()
        extra.join(GUARD)
        assert not extra.is_alive(), "a check past the bound queued for a hash"
        assert outcome == [False]  # even the right password: refused, not queued
        assert len(spy.calls) == 2
    finally:
        spy.release.set()
        for t in running:
            t.join(GUARD)
    assert results == [False, False]
    assert auth.check("prometheus", PASSWORD) is True  # slots are given back


def test_a_cached_success_needs_no_hash_slot() -> None:
    spy = Spy(block=True)
    auth = web_config.BasicAuth({"prometheus": HASH}, checkpw=spy, concurrency=1, wait=0.01)
    spy.release.set()
    assert auth.check("prometheus", PASSWORD) is True
    spy.release.clear()
    hog = threading.Thread(target=auth.check, args=("prometheus", "wrong"))
    hog.start()
    assert spy.entered.acquire(timeout=GUARD) and spy.entered.acquire(timeout=GUARD)
    try:
        assert auth.check("prometheus", PASSWORD) is True  # the scraper is not locked out
    finally:
        spy.release.set()
        hog.join(GUARD)


# --- files that are not regular files --------------------------------------------------------


def bounded(call: Callable[[], Any], fifos: list[Path]) -> Any:
    """call() in a thread; a hang fails the test, and opening the FIFOs' write ends frees it."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(("ok", call()))
        except BaseException as exc:  # handed to the test
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GUARD)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(GUARD)
        pytest.fail("reading a FIFO hung")
    kind, value = outcome[0]
    if kind == "raised":
        raise value
    return value


def test_a_config_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=f"{fifo}: cannot read config file: not a regular file"):
        bounded(lambda: config.load(fifo), [fifo])


def test_a_web_config_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "web.yml"
    os.mkfifo(fifo)
    with pytest.raises(web_config.WebConfigError, match="not a regular file"):
        bounded(lambda: web_config.load(fifo), [fifo])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    for name in ("server", "renewed"):
        subprocess.run(
            [
                require("openssl"),
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-keyout",
                str(pki / f"{name}.key"),
                "-out",
                str(pki / f"{name}.crt"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return pki


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_tls_files_that_are_fifos_are_refused_at_load(pki: Path, tmp_path: Path, key: str) -> None:
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    tls = {"cert_file": str(pki / "server.crt"), "key_file": str(pki / "server.key")}
    if key == "client_ca_file":
        tls["client_auth_type"] = "RequireAndVerifyClientCert"
    tls[key] = str(fifo)
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump({"tls_server_config": tls}))
    with pytest.raises(web_config.WebConfigError, match=f"tls_server_config.{key}: not a regular"):
        bounded(lambda: web_config.load(path), [fifo])


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_a_tls_file_turned_into_a_fifo_keeps_the_previous_certificate(
    pki: Path, tmp_path: Path, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A rotation that swapped a file for a FIFO hung every handshake for good.
    files = {"cert_file": "server.crt", "key_file": "server.key", "client_ca_file": "server.crt"}
    for name, source in files.items():
        (tmp_path / name).write_bytes((pki / source).read_bytes())
    settings = web_config.TLSSettings(
        cert_file=tmp_path / "cert_file",
        key_file=tmp_path / "key_file",
        client_auth_type="RequireAndVerifyClientCert",
        client_ca_file=tmp_path / "client_ca_file",
    )
    tls = web_config.TLSContext(settings)
    before = tls.context()
    (tmp_path / key).unlink()
    os.mkfifo(tmp_path / key)
    with caplog.at_level(logging.ERROR, logger="trt_heartbeat"):
        for _ in range(3):
            assert bounded(tls.context, [tmp_path / key]) is before
    reloads = [r for r in caplog.records if "reload failed" in r.getMessage()]
    assert len(reloads) == 1, "one line per change, not one per handshake"
    (tmp_path / key).unlink()
    (tmp_path / key).write_bytes((pki / files[key].replace("server", "renewed")).read_bytes())
    if key != "client_ca_file":  # a matching pair again: the new certificate is loaded
        other = "key_file" if key == "cert_file" else "cert_file"
        (tmp_path / other).write_bytes(
            (pki / files[other].replace("server", "renewed")).read_bytes()
        )
    assert tls.context() is not before


@pytest.mark.parametrize("flag", ["--config", "--web.config.file"])
def test_serve_with_a_fifo_file_exits_2_with_one_line(tmp_path: Path, flag: str) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    result = cli(
        "serve",
        flag,
        str(fifo),
        "--web.listen-address",
        "127.0.0.1:0",
        "--backend",
        "reference",
        timeout=GUARD,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(fifo) in lines[0] and "not a regular file" in lines[0]
    assert "Traceback" not in result.stderr

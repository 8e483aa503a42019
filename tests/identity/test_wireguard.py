"""This host's WireGuard key pair: made once with mode 0600, read strictly, never shown."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neti.fleet import wgkey
from neti.identity import wireguard as wg
from neti.identity.wireguard import KeyFileError, KeyPair


def test_first_start_makes_a_key_with_mode_0600(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    pair, created = wg.load_or_create(state_dir)
    assert created
    path = state_dir / wg.KEY_FILE
    st_ = path.stat()
    assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == os.geteuid()
    assert path.read_text() == pair.private_b64() + "\n"
    assert pair.path == str(path)
    assert [p.name for p in state_dir.iterdir()] == [wg.KEY_FILE]  # no temporary file left


def test_later_starts_read_the_same_key(tmp_path: Path) -> None:
    first, _ = wg.load_or_create(tmp_path)
    again, created = wg.load_or_create(tmp_path)
    assert not created and again == first and again.public == first.public


def test_public_key_is_the_one_wireguard_derives(tmp_path: Path) -> None:
    if not shutil.which("wg"):
        pytest.skip("wireguard-tools (wg) is not installed")
    pair, _ = wg.load_or_create(tmp_path)
    out = subprocess.run(
        ["wg", "pubkey"], input=pair.private_b64() + "\n", capture_output=True, text=True
    )
    assert out.stdout.strip() == pair.public
    # And a key `wg genkey` made reads back as the same pair.
    made = subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout
    (tmp_path / "other").write_text(made)
    os.chmod(tmp_path / "other", 0o600)
    assert wg.load(tmp_path / "other").private_b64() == made.strip()


def test_the_private_key_is_never_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pair, _ = wg.load_or_create(tmp_path)
    secret = pair.private_b64()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("neti").info("key: %s %r", pair, pair)
    for text in (repr(pair), str(pair), f"{pair}", caplog.text):
        assert secret not in text
        assert pair.public in text


def test_rotate_replaces_the_key_atomically(tmp_path: Path) -> None:
    old, _ = wg.load_or_create(tmp_path)
    new = wg.rotate(tmp_path)
    assert new.public != old.public
    assert wg.load(tmp_path / wg.KEY_FILE) == new
    assert stat.S_IMODE((tmp_path / wg.KEY_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [wg.KEY_FILE]


def test_readers_during_rotations_see_a_whole_key(tmp_path: Path) -> None:
    wg.load_or_create(tmp_path)
    path = tmp_path / wg.KEY_FILE
    stop = threading.Event()
    seen: list[str] = []
    failures: list[Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(wg.load(path).public)
            except Exception as exc:  # noqa: BLE001 - the assertion below reports it
                failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        made = {wg.rotate(tmp_path).public for _ in range(50)}
    finally:
        stop.set()
        reader.join()
    assert not failures
    assert set(seen) <= made | {seen[0]}


def test_a_bad_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / wg.KEY_FILE
    path.write_text("not a key\n")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=r"WireGuard key .*wireguard.key: not one WireGuard key"):
        wg.load_or_create(tmp_path)
    assert path.read_text() == "not a key\n"


GOOD = base64.b64encode(bytes(range(1, 33))).decode()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "0 characters, a key has 44"),
        (b"\n", "0 characters"),
        (GOOD.encode(), None),  # no newline: fine
        (GOOD.encode() + b"\n", None),
        (GOOD.encode() + b"\n\n", "45 characters"),
        (GOOD.encode() + b"\r\n", "45 characters"),
        (b" " + GOOD.encode(), "45 characters"),
        (GOOD[:-2].encode() + b"==", "not the base64 of 32 bytes"),  # 31 bytes
        (GOOD[:-2].encode() + b"B=", "not the base64 of 32 bytes"),  # non-canonical last digit
        (GOOD[:-1].encode() + b"A", "not the base64 of 32 bytes"),  # 33 bytes, no padding
        (b"A" * 43 + b"=", "an all-zero key"),
        (bytes(range(1, 33)), "32 characters"),  # the raw bytes, not base64
        (GOOD.replace("A", "-").encode() + b"\n", "not base64"),
        (b"\xff" * 44, "not base64"),
        (GOOD.encode() + b"\n" + GOOD.encode() + b"\n", "89 characters"),
        (b"x" * 100_000, "larger than 128 bytes"),
    ],
)
def test_hostile_key_files_are_refused_naming_the_file(
    tmp_path: Path, content: bytes, problem: str | None
) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    if problem is None:
        assert wg.load(path).private_b64() == GOOD
        return
    with pytest.raises(KeyFileError) as exc:
        wg.load(path)
    text = str(exc.value)
    assert text.startswith(f"WireGuard key {path}: ") and problem in text
    assert "\n" not in text


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o666, 0o601])
def test_a_key_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    pair, _ = wg.load_or_create(tmp_path)
    path = tmp_path / wg.KEY_FILE
    os.chmod(path, mode)
    refused = rf"cannot read: mode {mode:04o}: group or others have access"
    with pytest.raises(KeyFileError, match=refused):
        wg.load(path)
    with pytest.raises(KeyFileError):
        wg.load_or_create(tmp_path)  # and it is not replaced either
    os.chmod(path, 0o600)
    assert wg.load(path) == pair


def test_a_key_another_user_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    wg.load_or_create(tmp_path)
    path = tmp_path / wg.KEY_FILE
    os.chown(path, 65534, -1)
    with pytest.raises(KeyFileError, match=r"owned by uid 65534, not this process's 0"):
        wg.load(path)


def test_a_fifo_is_refused_without_waiting(tmp_path: Path) -> None:
    path = tmp_path / wg.KEY_FILE
    os.mkfifo(path, 0o600)
    with pytest.raises(KeyFileError, match=r"not a regular file \(a FIFO\)"):
        wg.load_or_create(tmp_path)


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / wg.KEY_FILE).mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=r"not a regular file \(a directory\)"):
        wg.load_or_create(tmp_path)


@pytest.mark.parametrize("target", ["/dev/zero", "real"])
def test_a_symlink_is_refused(tmp_path: Path, target: str) -> None:
    real, _ = wg.load_or_create(tmp_path / "elsewhere")
    dest = "/dev/zero" if target == "/dev/zero" else real.path
    (tmp_path / wg.KEY_FILE).symlink_to(dest)
    with pytest.raises(KeyFileError, match=r"a symlink \(the key must be a regular file\)"):
        wg.load_or_create(tmp_path)


def test_an_unwritable_state_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KeyFileError, match=r"WireGuard key .*: cannot (read|write): "):
        wg.load_or_create(blocker / "state")
    with pytest.raises(KeyFileError, match=r"WireGuard key .*: cannot write: "):
        wg.rotate(blocker / "state")


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=60), st.text(max_size=60)))
def test_decode_key_accepts_keys_and_refuses_the_rest_with_valueerror(data: bytes | str) -> None:
    try:
        key = wgkey.decode_key(data)
    except ValueError:
        return
    assert len(key) == 32 and base64.b64encode(key).decode() == (
        data if isinstance(data, str) else data.decode()
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_every_32_bytes_but_zero_round_trip(raw: bytes) -> None:
    text = base64.b64encode(raw).decode()
    if raw == bytes(32):
        with pytest.raises(ValueError):
            wgkey.public_key(text)
    else:
        assert wgkey.public_key(text) == text
        pair = KeyPair.from_private(raw)
        assert wgkey.decode_key(pair.public) and pair.private_b64() == text

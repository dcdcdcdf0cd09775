"""gspo-convert under real faults: a full filesystem, a write that fails mid-way, Ctrl-C, SIGKILL
and a second conversion into the same output. No mocks: a small tmpfs, RLIMIT_FSIZE and real
signals to a running converter."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, child_env, interruptible

from gspo_megatron.testing.tiny_model import make_hf_model, tiny_moe_config, write_tokenizer

CONVERT = str(Path(sys.executable).parent / "gspo-convert")


def _convert(args, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CONVERT, *map(str, args)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def _start(args, log: Path) -> subprocess.Popen:
    """A converter running in the background, its stderr in ``log`` (a pipe could fill up)."""
    with open(log, "w") as stderr:
        return subprocess.Popen(
            [CONVERT, *map(str, args)],
            cwd=REPO,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=interruptible,  # the tests send it SIGINT
        )


def _lines(stderr: str) -> list:
    """stderr's lines as a terminal shows them (a progress bar redraws with carriage returns)."""
    return [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].strip()]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return _lines(proc.stderr)[-1]


def _leftovers(parent: Path) -> list:
    return sorted(
        p.name
        for p in parent.iterdir()
        if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".owner")
    )


def _tmp_dirs(out: Path) -> list:
    return [p for p in out.parent.glob(out.name + ".tmp-*") if p.is_dir()]


def _wait_for_write(proc: subprocess.Popen, out: Path, data_glob: str, log: Path) -> Path:
    """Poll (5 ms) until the converter has started writing data into its temporary directory."""
    deadline = time.time() + 120
    while time.time() < deadline:
        for tmp in _tmp_dirs(out):
            if any(tmp.glob(data_glob)):
                return tmp
        if proc.poll() is not None:
            raise AssertionError(
                f"converter ended (rc {proc.returncode}) before writing was "
                f"seen:\n{log.read_text()}"
            )
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("converter never started writing")


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory):
    """A ~50 MB MoE (HF and converted): long enough to write (~0.2 s) to be hit mid-write."""
    root = tmp_path_factory.mktemp("big")
    shape = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256)
    config = tiny_moe_config(num_hidden_layers=8, num_local_experts=8, mlp_only_layers=[], **shape)
    make_hf_model(config, root / "hf")
    write_tokenizer(root / "hf")
    proc = _convert(
        ["hf-to-mcore", "--hf-dir", root / "hf", "--out", root / "mcore", "--no-progress"]
    )
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs("512k")``: a fresh tmpfs of that size (we run as root); skipped where the test
    may not mount one."""
    mounts = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounts)}"
        where.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("no mount command: cannot make a small filesystem to fill")
        if proc.returncode != 0:
            pytest.skip(
                f"mounting a tmpfs is not permitted here ({proc.stderr.strip()}); "
                f"the no-space tests need root or CAP_SYS_ADMIN"
            )
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=True)


def _direction(name: str, model) -> list:
    if name == "hf-to-mcore":
        return ["hf-to-mcore", "--hf-dir", model.hf_dir]
    return ["mcore-to-hf", "--ckpt", model.ckpt]


@pytest.mark.parametrize("direction", ["hf-to-mcore", "mcore-to-hf"])
def test_no_space_is_refused_before_writing(tiny_moe, small_fs, direction):
    fs = small_fs("512k")
    line = _error_line(_convert([*_direction(direction, tiny_moe), "--out", fs / "out"]))
    assert line.startswith(
        f"error: no space left on {fs} for {fs / 'out'}: the conversion needs "
    ), line
    assert line.endswith(", 512.00 KiB free"), line
    assert list(fs.iterdir()) == []  # not even a temporary directory was made


def test_overwrite_does_not_count_the_old_output_as_free(tiny_moe, small_fs):
    """The old output is replaced only once the new one is complete, so both must fit."""
    fs = small_fs("1200k")
    args = ["hf-to-mcore", "--hf-dir", tiny_moe.hf_dir, "--out", fs / "out"]
    assert _convert(args).returncode == 0
    before = {p.name: p.read_bytes() for p in (fs / "out").rglob("*") if p.is_file()}
    line = _error_line(_convert([*args, "--overwrite"]))
    assert line.startswith(
        f"error: no space left on {fs} for {fs / 'out'}: the conversion needs"
    ), line
    assert {p.name: p.read_bytes() for p in (fs / "out").rglob("*") if p.is_file()} == before
    assert _leftovers(fs) == []


def _file_size_limit(num_bytes: int):
    def preexec() -> None:
        # A write past the limit fails with EFBIG instead of killing the process (SIGXFSZ).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (num_bytes, num_bytes))

    return preexec


@pytest.mark.parametrize("direction,overwrite", [("hf-to-mcore", False), ("mcore-to-hf", True)])
def test_write_failing_mid_way_is_one_line_and_leaves_nothing(
    tiny_moe, tmp_path, direction, overwrite
):
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "keep.txt").write_text("previous output")
    args = [*_direction(direction, tiny_moe), "--out", out] + (["--overwrite"] if overwrite else [])
    # The space check passes (the disk is large); the first data file outgrows the limit.
    line = _error_line(_convert(args, preexec_fn=_file_size_limit(200_000)))
    assert line == f"error: writing {out} failed: [Errno 27] File too large"
    if overwrite:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
        assert (out / "keep.txt").read_text() == "previous output"
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_write_failing_in_a_writer_thread_stops_all_threads(big_moe, tmp_path):
    """Several DCP writer threads: the one whose file fails ends the conversion with one line
    (stock DCP prints thread tracebacks and may save metadata missing that file's tensors)."""
    out = tmp_path / "out"
    args = ["hf-to-mcore", "--hf-dir", big_moe / "hf", "--out", out, "--io-threads", "3"]
    line = _error_line(_convert(args, preexec_fn=_file_size_limit(4 * 1024**2)))
    assert line == f"error: writing {out} failed: [Errno 27] File too large"
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "direction,sig",
    [
        ("hf-to-mcore", signal.SIGINT),
        ("mcore-to-hf", signal.SIGINT),
        ("hf-to-mcore", signal.SIGTERM),
    ],
)
def test_ctrl_c_or_sigterm_mid_write_is_one_line_and_leaves_nothing(
    big_moe, tmp_path, direction, sig
):
    """Ctrl-C (and SIGTERM, a scheduler's preemption) mid-write: one line, the shell's exit
    status for the signal, nothing left."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    if direction == "hf-to-mcore":  # several writer threads, several data files
        args, data = ["hf-to-mcore", "--hf-dir", big_moe / "hf", "--io-threads", "2"], "*.distcp"
    else:
        args, data = (
            ["mcore-to-hf", "--ckpt", big_moe / "mcore", "--max-shard-size", "4MB"],
            "*.safetensors",
        )
    proc = _start([*args, "--out", out], log)
    _wait_for_write(proc, out, data, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 128 + sig, log.read_text()
    stderr = log.read_text()
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    word = "interrupted" if sig == signal.SIGINT else "terminated"
    assert _lines(stderr)[-1].startswith(f"{word}: "), stderr
    assert not out.exists() and _leftovers(tmp_path) == [], _leftovers(tmp_path)


def test_output_that_would_replace_its_input_is_refused(tiny_moe, tmp_path):
    """--out naming the input (or a directory holding it) with --overwrite would delete the
    input once the output is complete."""
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_moe.ckpt, src)
    for out in (src, tmp_path):
        line = _error_line(_convert(["mcore-to-hf", "--ckpt", src, "--out", out, "--overwrite"]))
        assert (
            line == f"error: {out}: the output would replace its own input --ckpt {src}; "
            f"choose another output path"
        )
    assert (src / "metadata.json").is_file()


def test_sigkill_leftovers_are_reported_and_removed_by_the_next_run(big_moe, tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    args = ["hf-to-mcore", "--hf-dir", big_moe / "hf", "--out", out]
    killed = _start(args, log)
    tmp = _wait_for_write(killed, out, "*.distcp", log)
    killed.kill()
    killed.wait(timeout=60)
    assert tmp.is_dir()  # what SIGKILL leaves

    proc = _convert(args)
    assert proc.returncode == 0, proc.stderr
    reports = [line for line in _lines(proc.stderr) if line.startswith("removing ")]
    assert len(reports) == 1, proc.stderr
    assert re.fullmatch(
        rf"removing {re.escape(str(tmp))} \([0-9.]+ (B|KiB|MiB)\): left by an "
        rf"interrupted conversion \(pid {killed.pid}, no longer running\)",
        reports[0],
    ), reports[0]
    assert _leftovers(tmp_path) == []
    assert (out / ".metadata").is_file() and not list(out.glob("*.owner"))


def test_conversion_into_an_output_being_written_is_refused(big_moe, tmp_path):
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    args = ["hf-to-mcore", "--hf-dir", big_moe / "hf", "--out", out]
    first = _start(args, log)
    try:
        tmp = _wait_for_write(first, out, "*.distcp", log)
        first.send_signal(signal.SIGSTOP)  # still alive, and it stays mid-write
        line = _error_line(_convert(args))
        assert line == (
            f"error: {tmp}: another conversion into {out} is running "
            f"(pid {first.pid}); wait for it or stop it"
        )
        assert tmp.is_dir()  # the running conversion's files were not touched
    finally:
        first.kill()
        first.wait(timeout=60)


def test_leftovers_of_a_reused_pid_or_without_owner_are_removed(tmp_path, capsys):
    """Owner checks without subprocesses: a pid now held by another process (start time
    differs), a directory with no owner record, and an owner that is alive (this process)."""
    import psutil

    from gspo_megatron.checkpoint.atomic import atomic_dir
    from gspo_megatron.errors import GspoError

    out = tmp_path / "out"
    reused = tmp_path / "out.tmp-0123abcd"
    (reused / "sub").mkdir(parents=True)
    (reused / "sub" / "x.bin").write_bytes(b"\0" * 3000)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / "out.tmp-0123abcd.owner").write_text(json.dumps({**me, "start_time": 1.0}))
    (tmp_path / "out.old-89abcdef").mkdir()
    (tmp_path / "out.tmp-deadbeef.json").write_text("not ours: kept")
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("new")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"removing {reused} (2.93 KiB): left by an interrupted write "
        f"(pid {os.getpid()}, no longer running)",
        f"removing {tmp_path / 'out.old-89abcdef'} (0 B): left by an interrupted "
        f"write (owner unknown)",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-deadbeef.json"]

    live = tmp_path / "out.tmp-00000000"
    live.mkdir()
    started = psutil.Process().create_time()
    (tmp_path / "out.tmp-00000000.owner").write_text(json.dumps({**me, "start_time": started}))
    with pytest.raises(
        GspoError,
        match=rf"out.tmp-00000000: another write into .* is "
        rf"running \(pid {os.getpid()}\)",
    ):
        with atomic_dir(out, overwrite=True):
            pass
    assert live.is_dir() and (out / "f").read_text() == "new"


def test_killed_between_the_renames_of_an_overwrite_finishes_them(tmp_path, capsys):
    """A writer killed after moving the old output aside and before renaming the new (complete)
    one into place left out.old-T and out.tmp-T and no out: the next write puts the new output
    in place instead of deleting both."""
    from gspo_megatron.checkpoint.atomic import remove_leftovers

    out = tmp_path / "out"
    (tmp_path / "out.old-0badc0de").mkdir()
    (tmp_path / "out.old-0badc0de" / "f").write_text("old")
    (tmp_path / "out.tmp-0badc0de").mkdir()
    (tmp_path / "out.tmp-0badc0de" / "f").write_text("new")
    (tmp_path / "out.tmp-0badc0de.owner").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start_time": 1.0})
    )  # gone
    remove_leftovers(out, "conversion")
    assert (out / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "completed an interrupted conversion" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["mcore-to-hf", "--max-shard-size", "0"],
            "--max-shard-size '0': must be at least 1 byte (e.g. 5GB)",
        ),
        (
            ["hf-to-mcore", "--io-threads", "0"],
            "--io-threads '0': expected a number of threads >= 1",
        ),
        (
            ["hf-to-mcore", "--io-threads", "two"],
            "--io-threads 'two': expected a number of threads >= 1",
        ),
    ],
)
def test_nonsense_sizes_and_thread_counts(tiny_moe, tmp_path, args, message):
    src = ["--ckpt", tiny_moe.ckpt] if args[0] == "mcore-to-hf" else ["--hf-dir", tiny_moe.hf_dir]
    proc = _convert([args[0], *src, "--out", tmp_path / "o", *args[1:]])
    assert _error_line(proc) == f"error: {message}"
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []

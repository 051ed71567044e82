"""Checkpoints with real git, real files and real bash: what a snapshot holds,
what a diff says, what a restore may and may not write, crashes, disk use."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import wait_for

from crushd import atomicfs
from crushd.checkpoints import (
    EMPTY_TREE,
    MIB,
    CheckpointClosed,
    CheckpointError,
    CheckpointStore,
    DiffTooLarge,
    GitFailed,
    GitTimeout,
    UnsafeWorkTree,
    WorkspaceChanged,
)
from crushd.restore import TEMP_PREFIX, RestoreBlocked

BASH = "/bin/bash"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path, work: Path):
    s = CheckpointStore(tmp_path / "data" / "checkpoints" / "ws.git", work, max_file_bytes=4096)
    yield s
    s.close()


def bash(work: Path, script: str) -> None:
    """Change the workspace the way an agent's bash tool does."""
    subprocess.run([BASH, "-euc", script], cwd=work, check=True, timeout=30)


def write(path: Path, data: str | bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def tree_files(store: CheckpointStore, tree: str) -> dict[str, str]:
    out = subprocess.run(
        ["git", "ls-tree", "-r", "-z", tree],
        env=store._git.env,
        capture_output=True,
        check=True,
    ).stdout
    files = {}
    for record in filter(None, out.split(b"\0")):
        meta, _, path = record.partition(b"\t")
        files[os.fsdecode(path)] = meta.split(b" ")[0].decode()
    return files


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file below ``folder``: content hash and mtime, links by target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                digest = "link:" + os.readlink(path)
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            found[os.path.relpath(path, folder)] = (digest, st.st_mtime_ns)
    return found


# -- snapshots and diffs -------------------------------------------------------


def test_bash_changes_show_in_diff_stat_and_changed_paths(store, work):
    write(work / "src/app.py", "def main():\n    return 1\n")
    write(work / "README", "hello\n")
    write(work / "old_name.txt", "moved content\n" * 20)
    write(work / "gone.txt", "bye\n")
    before = store.snapshot()
    bash(
        work,
        "sed -i 's/return 1/return 2/' src/app.py\n"
        "echo new > src/new.py\n"
        "rm gone.txt\n"
        "mv old_name.txt new_name.txt\n",
    )
    after = store.snapshot()
    assert after.tree != before.tree

    stats = {s.path: s for s in store.stat(before.tree, after.tree)}
    assert stats["src/app.py"].status == "modified"
    assert (stats["src/app.py"].added, stats["src/app.py"].removed) == (1, 1)
    assert stats["src/new.py"].status == "added"
    assert stats["gone.txt"].status == "deleted"
    assert stats["new_name.txt"].status == "renamed"
    assert stats["new_name.txt"].old_path == "old_name.txt"
    assert "README" not in stats

    assert store.changed_paths(before.tree, after.tree) == [
        "gone.txt",
        "new_name.txt",
        "old_name.txt",
        "src/app.py",
        "src/new.py",
    ]
    patch = store.diff(before.tree, after.tree)
    assert "-    return 1\n+    return 2\n" in patch
    assert "rename from old_name.txt\nrename to new_name.txt" in patch
    one = store.diff(before.tree, after.tree, paths=["src/app.py"])
    assert one.startswith("diff --git a/src/app.py b/src/app.py")
    assert "new.py" not in one


def test_binary_executable_bit_and_symlink_changes(store, work):
    write(work / "img.bin", bytes(range(256)) * 4)
    write(work / "run.sh", "#!/bin/sh\necho hi\n")
    os.symlink("run.sh", work / "latest")
    before = store.snapshot()
    assert tree_files(store, before.tree) == {
        "img.bin": "100644",
        "latest": "120000",
        "run.sh": "100644",
    }
    bash(work, "printf '\\x00\\x01\\x02' >> img.bin\nchmod +x run.sh\nln -sfn img.bin latest\n")
    after = store.snapshot()
    stats = {s.path: s for s in store.stat(before.tree, after.tree)}
    assert stats["img.bin"].binary and stats["img.bin"].added is None
    assert (stats["run.sh"].old_mode, stats["run.sh"].new_mode) == ("100644", "100755")
    assert (stats["run.sh"].added, stats["run.sh"].removed) == (0, 0)
    assert stats["latest"].status == "modified" and stats["latest"].new_mode == "120000"
    patch = store.diff(before.tree, after.tree)
    assert "Binary files a/img.bin and b/img.bin differ" in patch
    assert "old mode 100644\nnew mode 100755" in patch
    assert "-run.sh\n\\ No newline at end of file\n+img.bin" in patch

    bash(work, "rm latest && echo file > latest")
    typed = store.snapshot()
    [change] = store.stat(after.tree, typed.tree)
    assert change.status == "type_changed"


def test_gitignore_and_the_users_exclude_are_honoured(store, work):
    write(work / ".gitignore", "*.log\nbuild/\n")
    write(work / "sub/.gitignore", "secret.txt\n")
    write(work / ".git/info/exclude", "local-only\n")
    for name in ("app.log", "build/out.o", "sub/secret.txt", "local-only", "kept.txt", "sub/ok"):
        write(work / name, "x")
    snap = store.snapshot()
    assert set(tree_files(store, snap.tree)) == {
        ".gitignore",
        "sub/.gitignore",
        "kept.txt",
        "sub/ok",
    }

    # As in git: a rule added later keeps new files out but drops no recorded one.
    write(work / ".gitignore", "*.log\nbuild/\nkept.txt\n")
    write(work / "kept.txt", "changed")
    later = store.snapshot()
    assert "kept.txt" in tree_files(store, later.tree)
    assert store.changed_paths(snap.tree, later.tree) == [".gitignore", "kept.txt"]


def test_excluded_paths_are_never_recorded_and_dropped_once_excluded(tmp_path, work):
    """crushd's hidden list inside a workspace (a data directory, a token):
    no tree holds it, odd names included, and one recorded before it was
    hidden leaves the next tree."""
    for name in ("keys/id_rsa", "keys/sub/deep", "[x]*? #!.tok", "later.env", "kept.txt"):
        write(work / name, "secret" if name != "kept.txt" else "ok")
    first = CheckpointStore(tmp_path / "ck.git", work, exclude=["keys", "[x]*? #!.tok"])
    try:
        assert set(tree_files(first, first.snapshot().tree)) == {"later.env", "kept.txt"}
    finally:
        first.close()
    again = CheckpointStore(
        tmp_path / "ck.git", work, exclude=["keys", "[x]*? #!.tok", "later.env"]
    )
    try:
        assert set(tree_files(again, again.snapshot().tree)) == {"kept.txt"}
        write(work / "keys/new", "secret")
        assert set(tree_files(again, again.snapshot().tree)) == {"kept.txt"}
    finally:
        again.close()


def test_host_git_settings_and_variables_do_not_reach_the_store(tmp_path, work, monkeypatch):
    user_repo = tmp_path / "elsewhere"
    subprocess.run(["git", "init", "-q", str(user_repo)], check=True)
    home = tmp_path / "home"
    write(home / ".gitconfig", "[core]\n\texcludesFile = ~/.ignore-all\n")
    write(home / ".ignore-all", "*\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_DIR", str(user_repo / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(user_repo / ".git" / "index"))
    monkeypatch.setenv("GIT_OBJECT_DIRECTORY", str(user_repo / ".git" / "objects"))
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", f"'core.excludesfile'='{home}/.ignore-all'")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    write(Path(os.environ["XDG_CONFIG_HOME"]) / "git" / "ignore", "*\n")
    before = fingerprint(user_repo)
    write(work / "a.txt", "line\r\n")
    store = CheckpointStore(tmp_path / "store.git", work)
    try:
        snap = store.snapshot()
        assert set(tree_files(store, snap.tree)) == {"a.txt"}
    finally:
        store.close()
    assert fingerprint(user_repo) == before


def test_gitattributes_conversions_are_off(store, work):
    write(work / ".gitattributes", "* text eol=crlf\n*.txt ident\n")
    write(work / "dos.txt", b"a\r\nb\r\n$Id$\n")
    write(work / "unix.txt", b"a\nb\n")
    first = store.snapshot()
    bash(work, "printf 'changed\\n' > dos.txt; printf 'changed\\n' > unix.txt")
    store.snapshot()
    store.restore(first.tree, ["dos.txt", "unix.txt"])
    assert (work / "dos.txt").read_bytes() == b"a\r\nb\r\n$Id$\n"
    assert (work / "unix.txt").read_bytes() == b"a\nb\n"


def test_oversized_files_are_left_out_and_listed(store, work):
    write(work / "small.txt", "ok")
    write(work / "huge.bin", b"x" * 5000)
    write(work / "grows.txt", "short")
    first = store.snapshot()
    assert [(s.path, s.reason, s.size) for s in first.skipped] == [("huge.bin", "too_large", 5000)]
    assert set(tree_files(store, first.tree)) == {"small.txt", "grows.txt"}
    assert "too_large: huge.bin" in first.note()

    write(work / "grows.txt", b"y" * 4097)
    second = store.snapshot()
    assert {s.path for s in second.skipped} == {"huge.bin", "grows.txt"}
    assert set(tree_files(store, second.tree)) == {"small.txt"}
    # Content crushd never recorded is not overwritten without force.
    with pytest.raises(WorkspaceChanged) as caught:
        store.restore(first.tree, ["grows.txt"], expected=second.tree)
    assert caught.value.paths == ["grows.txt"]
    assert (work / "grows.txt").read_bytes() == b"y" * 4097


def test_max_files_stops_new_files_and_says_so(tmp_path, work):
    for i in range(8):
        write(work / f"f{i}.txt", str(i))
    store = CheckpointStore(tmp_path / "store.git", work, max_files=5)
    try:
        snap = store.snapshot()
        assert snap.truncated and snap.files == 5
        assert "truncated" in snap.note()
        kept = set(tree_files(store, snap.tree))
        assert len(kept) == 5
        # A changed recorded file is still recorded; deleting makes room.
        victim = sorted(kept)[0]
        (work / victim).unlink()
        again = store.snapshot()
        assert again.files == 5 and victim not in tree_files(store, again.tree)
        assert again.truncated
        for name in kept - {victim}:
            (work / name).unlink()
        last = store.snapshot()
        assert not last.truncated and last.files == 8 - len(kept)
    finally:
        store.close()


def test_nested_repository_and_special_files_are_left_out(store, work):
    write(work / "top.txt", "top")
    subprocess.run(["git", "init", "-q", str(work / "vendor/lib")], check=True)
    write(work / "vendor/lib/code.c", "int x;")
    os.mkfifo(work / "pipe")
    snap = store.snapshot()
    assert set(tree_files(store, snap.tree)) == {"top.txt"}
    assert ("vendor/lib", "nested_repository") in {(s.path, s.reason) for s in snap.skipped}
    # A recorded file that turns into a FIFO is dropped and listed.
    write(work / "becomes_fifo", "x")
    store.snapshot()
    (work / "becomes_fifo").unlink()
    os.mkfifo(work / "becomes_fifo")
    after = store.snapshot()
    assert ("becomes_fifo", "special_file") in {(s.path, s.reason) for s in after.skipped}
    assert "becomes_fifo" not in tree_files(store, after.tree)


def test_a_snapshot_with_nothing_changed_hashes_nothing(store, work):
    for d in range(10):
        for f in range(50):
            write(work / f"d{d}/f{f}.py", f"x = {d * f}\n")
    first = store.snapshot()
    assert first.files == 500 and first.updated == 500
    objects = sum(len(files) for _, _, files in os.walk(store.git_dir / "objects"))
    assert objects < 20  # the 500 blobs went into one pack; the 11 trees are loose
    again = store.snapshot()
    assert (again.tree, again.updated) == (first.tree, 0)
    assert sum(len(files) for _, _, files in os.walk(store.git_dir / "objects")) == objects
    write(work / "d3/f7.py", "changed = True\n")
    one = store.snapshot()
    assert one.updated == 1 and store.changed_paths(first.tree, one.tree) == ["d3/f7.py"]


def test_empty_workspace_is_the_empty_tree(store):
    assert store.snapshot().tree == EMPTY_TREE


def test_the_users_repository_is_untouched_byte_for_byte(store, work):
    git = ["git", "-C", str(work), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    write(work / "tracked.txt", "v1\n")
    write(work / "staged.txt", "s1\n")
    subprocess.run([*git, "add", "tracked.txt", "staged.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    write(work / "staged.txt", "s2\n")
    subprocess.run([*git, "add", "staged.txt"], check=True)
    write(work / "tracked.txt", "v2 uncommitted\n")
    write(work / "untracked.txt", "new\n")
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, check=True)
    before = fingerprint(work / ".git")
    assert "index" in before and "HEAD" in before

    first = store.snapshot()
    assert not any(p == ".git" or p.startswith(".git/") for p in tree_files(store, first.tree))
    write(work / "tracked.txt", "agent edit\n")
    second = store.snapshot()
    store.pin("runs/r1/0", first.tree)
    store.pin("runs/r1/1", second.tree)
    store.restore(first.tree, ["tracked.txt"], expected=second.tree)
    store.prune()
    with pytest.raises(CheckpointError):
        store.restore(first.tree, [".git/index"])

    assert fingerprint(work / ".git") == before
    again = subprocess.run([*git, "status", "--porcelain"], capture_output=True, check=True)
    assert again.stdout == status.stdout


def test_odd_names_and_files_turning_into_directories(store, work):
    odd = os.fsencode(work) + b"/caf\xe9 \n'quoted\".txt"
    with open(odd, "wb") as f:
        f.write(b"latin-1 name\n")
    write(work / "a/b", "file in a directory\n")
    write(work / "c", "a file\n")
    before = store.snapshot()
    names = {os.fsencode(p) for p in tree_files(store, before.tree)}
    assert os.path.basename(odd) in names
    bash(work, "rm -r a && echo now-a-file > a && rm c && mkdir c && echo inside > c/d")
    with open(odd, "wb") as f:
        f.write(b"changed\n")
    after = store.snapshot()
    assert set(tree_files(store, after.tree)) >= {"a", "c/d"}
    assert not after.skipped  # a file that became a directory is no special file
    paths = store.changed_paths(before.tree, after.tree)
    assert {"a", "a/b", "c", "c/d"} <= set(paths)
    store.restore(before.tree, paths, expected=after.tree)
    assert (work / "a/b").read_text() == "file in a directory\n"
    assert (work / "c").read_text() == "a file\n"
    with open(odd, "rb") as f:
        assert f.read() == b"latin-1 name\n"
    assert store.snapshot().tree == before.tree


def test_snapshot_can_pin_in_the_same_step(store, work):
    write(work / "big.bin", b"x" * 5000)
    write(work / "a.txt", "a")
    snap = store.snapshot("runs/r1/0", note="before the run")
    assert snap.pin is not None and snap.pin.tree == snap.tree and snap.pin.group == "runs/r1"
    assert [p.ref for p in store.pins("runs/r1")] == ["runs/r1/0"]
    message = subprocess.run(
        ["git", "log", "-1", "--format=%B", snap.pin.commit],
        env=store._git.env,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert "before the run" in message and "too_large: big.bin" in message


# -- what may be recorded ------------------------------------------------------


def test_refuses_root_home_and_a_store_inside_the_work_tree(tmp_path, monkeypatch):
    with pytest.raises(UnsafeWorkTree, match="of /"):
        CheckpointStore(tmp_path / "s.git", "/")
    home = tmp_path / "someone"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(UnsafeWorkTree, match="home directory"):
        CheckpointStore(tmp_path / "s.git", home)
    with pytest.raises(UnsafeWorkTree, match="home directory"):
        CheckpointStore(tmp_path / "s.git", "/root")
    os.symlink(home, tmp_path / "link-to-home")
    with pytest.raises(UnsafeWorkTree):
        CheckpointStore(tmp_path / "s.git", tmp_path / "link-to-home")
    project = home / "project"
    project.mkdir()
    CheckpointStore(tmp_path / "s.git", project).close()  # a directory inside a home is fine
    with pytest.raises(UnsafeWorkTree, match="contain each other"):
        CheckpointStore(project / ".crushd" / "s.git", project)


def test_bad_paths_refs_and_ids_are_refused(store, work):
    snap = store.snapshot()
    for bad in ("../x", "/etc/passwd", "a/../b", "a//b", "./a", "", ".GIT/config", "x/.git/y"):
        with pytest.raises(CheckpointError, match="not a path"):
            store.restore(snap.tree, [bad])
    for bad_ref in ("../x", "runs/a..b", "runs/x.lock", ".hidden", "a b", "runs//x"):
        with pytest.raises(CheckpointError, match="not a valid checkpoint ref"):
            store.pin(bad_ref, snap.tree)
    for bad_id in ("--output=/tmp/x", "HEAD", snap.tree[:12]):
        with pytest.raises(CheckpointError, match="not a checkpoint id"):
            store.diff(bad_id, snap.tree)


def test_git_failures_carry_gits_message(store):
    store.init()
    with pytest.raises(GitFailed) as caught:
        store.diff("1" * 40, EMPTY_TREE)
    assert "bad object" in caught.value.message or "1111111" in caught.value.message
    assert caught.value.returncode != 0


def test_diff_past_its_bound_is_refused(store, work):
    write(work / "a.txt", "")
    before = store.snapshot()
    write(work / "a.txt", "line\n" * 800)
    after = store.snapshot()
    with pytest.raises(DiffTooLarge):
        store.diff(before.tree, after.tree, max_bytes=1000)
    assert store.stat(before.tree, after.tree)[0].added == 800


# -- restore -------------------------------------------------------------------


def test_restore_writes_only_the_given_paths(store, work):
    for name in ("a.txt", "b.txt", "c.txt"):
        write(work / name, f"{name} v1\n")
    before = store.snapshot()
    bash(work, 'for f in a b c; do echo "$f v2" > $f.txt; done')
    after = store.snapshot()
    untouched = {n: (work / n).stat() for n in ("b.txt", "c.txt")}
    result = store.restore(before.tree, ["a.txt"], expected=after.tree)
    assert result.written == ("a.txt",) and result.deleted == ()
    assert (work / "a.txt").read_text() == "a.txt v1\n"
    for name, st in untouched.items():
        assert (work / name).read_text() == f"{name[0]} v2\n"
        assert (work / name).stat().st_mtime_ns == st.st_mtime_ns
        assert (work / name).stat().st_ino == st.st_ino


def test_restore_deletes_recreates_and_keeps_modes_and_links(store, work):
    write(work / "keep/tool.sh", "#!/bin/sh\n", mode=0o750)
    write(work / "private.txt", "mine\n", mode=0o600)
    os.symlink("keep/tool.sh", work / "shortcut")
    before = store.snapshot()
    bash(
        work,
        "rm keep/tool.sh shortcut\n"
        "echo new > created.txt\n"
        "echo changed > private.txt\n"
        "chmod 640 private.txt\n",
    )
    after = store.snapshot()
    paths = store.changed_paths(before.tree, after.tree)
    result = store.restore(before.tree, paths, expected=after.tree)
    assert set(result.written) == {"keep/tool.sh", "private.txt", "shortcut"}
    assert result.deleted == ("created.txt",)
    assert not (work / "created.txt").exists()
    assert stat.S_IMODE((work / "keep/tool.sh").stat().st_mode) & 0o111
    # The replaced file keeps the permissions it has now; only its x bits follow the tree.
    assert stat.S_IMODE((work / "private.txt").stat().st_mode) == 0o640
    assert (work / "private.txt").read_text() == "mine\n"
    assert os.readlink(work / "shortcut") == "keep/tool.sh"
    assert store.snapshot().tree == before.tree


def test_drift_raises_workspace_changed_and_writes_nothing_unless_forced(store, work):
    write(work / "a.txt", "a1\n")
    write(work / "b.txt", "b1\n")
    before = store.snapshot()
    write(work / "a.txt", "a2\n")
    write(work / "b.txt", "b2\n")
    after = store.snapshot()
    write(work / "b.txt", "edited by the user after the run\n")
    snapshot_of_files = fingerprint(work)

    with pytest.raises(WorkspaceChanged) as caught:
        store.restore(before.tree, ["a.txt", "b.txt"], expected=after.tree)
    assert caught.value.paths == ["b.txt"] and caught.value.status == 409
    assert caught.value.code == "workspace_changed" and "b.txt" in caught.value.message
    with pytest.raises(WorkspaceChanged):
        store.restore(before.tree, ["a.txt", "b.txt"], expected=after.tree, dry_run=True)
    assert fingerprint(work) == snapshot_of_files

    dry = store.restore(
        before.tree, ["a.txt", "b.txt"], expected=after.tree, force=True, dry_run=True
    )
    assert dry.dry_run and dry.written == ("a.txt", "b.txt") and dry.overridden == ("b.txt",)
    assert fingerprint(work) == snapshot_of_files
    done = store.restore(before.tree, ["a.txt", "b.txt"], expected=after.tree, force=True)
    assert done.overridden == ("b.txt",)
    assert (work / "a.txt").read_text() == "a1\n" and (work / "b.txt").read_text() == "b1\n"


def test_revert_is_checkpointed_and_can_be_undone(store, work):
    write(work / "a.txt", "original\n")
    base = store.snapshot()
    write(work / "a.txt", "by the run\n")
    write(work / "new.txt", "by the run\n")
    run_end = store.snapshot()
    paths = store.changed_paths(base.tree, run_end.tree)
    write(work / "a.txt", "drifted\n")  # the user edited after the run

    with pytest.raises(WorkspaceChanged):
        store.revert(base.tree, paths, expected=run_end.tree)
    rev = store.revert(base.tree, paths, expected=run_end.tree, force=True)
    assert rev.before is not None and rev.after is not None
    assert (work / "a.txt").read_text() == "original\n" and not (work / "new.txt").exists()
    assert rev.after.tree == base.tree and rev.unrecorded == ()

    undo = store.revert(rev.before.tree, paths, expected=rev.after.tree)
    assert (work / "a.txt").read_text() == "drifted\n"
    assert (work / "new.txt").read_text() == "by the run\n"
    assert undo.restored.overridden == ()

    dry = store.revert(base.tree, paths, expected=undo.after.tree, dry_run=True)
    assert dry.before is None and dry.restored.written == ("a.txt",)
    assert (work / "a.txt").read_text() == "drifted\n"


def test_restore_never_writes_through_a_planted_symlink(store, work, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "victim.txt", "outside, untouched\n")
    write(work / "dir/victim.txt", "inside v1\n")
    write(work / "file.txt", "inside v1\n")
    before = store.snapshot()
    write(work / "dir/victim.txt", "inside v2\n")
    after = store.snapshot()
    # The agent's bash swaps the directory for a link out of the workspace,
    # and the file for a link to a file outside.
    bash(
        work,
        f"rm -r dir && ln -s {outside} dir && rm file.txt && ln -s {outside}/victim.txt file.txt",
    )
    outside_before = fingerprint(outside)

    with pytest.raises(WorkspaceChanged):
        store.restore(before.tree, ["dir/victim.txt", "file.txt"], expected=after.tree)
    with pytest.raises(RestoreBlocked, match="dir/victim.txt"):
        store.restore(before.tree, ["dir/victim.txt", "file.txt"], expected=after.tree, force=True)
    assert fingerprint(outside) == outside_before
    assert os.path.islink(work / "file.txt")  # refused as a whole: nothing written

    store.restore(before.tree, ["file.txt"], force=True)
    assert not os.path.islink(work / "file.txt")
    assert (work / "file.txt").read_text() == "inside v1\n"
    assert fingerprint(outside) == outside_before

    # When the link itself is one of the paths restored, it is removed first.
    linked = store.snapshot()
    assert tree_files(store, linked.tree)["dir"] == "120000"
    store.restore(before.tree, store.changed_paths(before.tree, linked.tree), expected=linked.tree)
    assert not os.path.islink(work / "dir")
    assert (work / "dir/victim.txt").read_text() == "inside v1\n"
    assert fingerprint(outside) == outside_before


def test_a_directory_in_the_way_is_replaced_only_if_empty(store, work):
    write(work / "thing", "a file\n")
    before = store.snapshot()
    bash(work, "rm thing && mkdir -p thing && echo inner > thing/inner.txt")
    after = store.snapshot()
    write(work / "thing/unrecorded.log", "not in any checkpoint")
    with pytest.raises(RestoreBlocked, match="directory with other files"):
        store.restore(before.tree, ["thing", "thing/inner.txt"], force=True)
    assert (work / "thing/inner.txt").exists()
    (work / "thing/unrecorded.log").unlink()
    store.restore(before.tree, store.changed_paths(before.tree, after.tree), expected=after.tree)
    assert (work / "thing").read_text() == "a file\n"


# -- crashes -------------------------------------------------------------------

_RESTORER = textwrap.dedent(
    """
    import os, signal, sys
    from crushd.checkpoints import CheckpointStore

    git_dir, work, tree, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kill_after:
        # Die by SIGKILL in the middle of a file: after this many bytes written.
        real_write, written = os.write, [0]
        def write(fd, data):
            if written[0] + len(data) > kill_after:
                real_write(fd, bytes(data)[: kill_after - written[0]])
                os.kill(os.getpid(), signal.SIGKILL)
            written[0] += len(data)
            return real_write(fd, data)
        os.write = write
    store = CheckpointStore(git_dir, work, max_file_bytes=1 << 30)
    paths = sorted(p for p in os.listdir(work) if p.startswith("f"))
    print("ready", flush=True)
    store.restore(tree, paths, force=True)
    print("done", flush=True)
    """
)

FILES, SIZE = 40, 1 * MIB


def _crash_setup(tmp_path: Path, work: Path) -> tuple[CheckpointStore, str, list[str]]:
    store = CheckpointStore(tmp_path / "crash.git", work, max_file_bytes=2 * MIB)
    names = [f"f{i:03d}" for i in range(FILES)]
    for name in names:
        write(work / name, b"N" + name.encode() + os.urandom(SIZE - 5))
    new = store.snapshot()
    for name in names:
        write(work / name, b"O" * SIZE)
    store.snapshot()
    return store, new.tree, names


def _check_old_or_new(store: CheckpointStore, tree: str, work: Path, names: list[str]) -> int:
    new = 0
    for name in names:
        data = (work / name).read_bytes()
        if data == b"O" * SIZE:
            continue
        assert atomicfs.blob_id(data) == _blob(store, tree, name), f"{name} is neither old nor new"
        new += 1
    return new


def _blob(store: CheckpointStore, tree: str, name: str) -> str:
    out = subprocess.run(
        ["git", "rev-parse", f"{tree}:{name}"], env=store._git.env, capture_output=True, check=True
    )
    return out.stdout.decode().strip()


def test_sigkill_in_the_middle_of_a_file_leaves_old_or_new_and_recovers(tmp_path, work):
    store, tree, names = _crash_setup(tmp_path, work)
    store.close()
    kill_after = int(3.5 * SIZE)  # inside the fourth file
    proc = subprocess.run(
        [sys.executable, "-c", _RESTORER, str(store.git_dir), str(work), tree, str(kill_after)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _check_old_or_new(store, tree, work, names) == 3
    leftovers = [p for p in os.listdir(work) if p.startswith(TEMP_PREFIX.decode())]
    assert len(leftovers) == 1 and 0 < os.path.getsize(work / leftovers[0]) < SIZE  # half

    again = CheckpointStore(store.git_dir, work, max_file_bytes=2 * MIB)
    try:
        interrupted = again.init()
        assert interrupted is not None and interrupted.tree == tree
        assert list(interrupted.paths) == names
        assert again.init() is None  # reported once
        assert not [p for p in os.listdir(work) if p.startswith(TEMP_PREFIX.decode())]
        again.restore(interrupted.tree, interrupted.paths, force=True)
        assert _check_old_or_new(again, tree, work, names) == FILES
    finally:
        again.close()


def test_kill_9_from_outside_mid_restore(tmp_path, work):
    store, tree, names = _crash_setup(tmp_path, work)
    store.close()
    first = work / names[0]
    first_inode = first.stat().st_ino
    proc = subprocess.Popen(
        [sys.executable, "-c", _RESTORER, str(store.git_dir), str(work), tree, "0"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 30
        while first.stat().st_ino == first_inode and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    done = _check_old_or_new(store, tree, work, names)
    assert 0 < done < FILES, f"the kill should land mid-way, {done} of {FILES} were done"

    again = CheckpointStore(store.git_dir, work, max_file_bytes=2 * MIB)
    try:
        interrupted = again.init()
        assert interrupted is not None
        assert not [p for p in os.listdir(work) if p.startswith(TEMP_PREFIX.decode())]
        again.restore(interrupted.tree, interrupted.paths, force=True)
        assert _check_old_or_new(again, tree, work, names) == FILES
    finally:
        again.close()


def test_stale_git_locks_from_a_killed_git_are_cleared(tmp_path, work):
    store = CheckpointStore(tmp_path / "s.git", work)
    write(work / "a", "1")
    store.snapshot()
    store.close()
    (store.git_dir / "index.lock").write_bytes(b"half an index")
    (store.git_dir / "refs" / "crushd").mkdir(parents=True, exist_ok=True)
    (store.git_dir / "refs" / "crushd" / "x.lock").write_text("0" * 40)
    again = CheckpointStore(store.git_dir, work)
    try:
        write(work / "a", "2")
        assert again.snapshot().updated == 1
        assert not (store.git_dir / "index.lock").exists()
    finally:
        again.close()


def slow_git(tmp_path: Path) -> tuple[Path, Path]:
    """A git whose ``ls-files`` (a snapshot's first step) hangs, writing its
    pid to the file returned first; every other command is the real git."""
    pids = tmp_path / "pids"
    wrapper = write(
        tmp_path / "slow-git",
        f'#!/bin/sh\nif [ "$1" = ls-files ]; then echo $$ >> {pids}; exec sleep 30; fi\n'
        'exec git "$@"\n',
        mode=0o755,
    )
    return pids, wrapper


def snapshot_until_git_hangs(
    store: CheckpointStore, pids: Path
) -> tuple[threading.Thread, list[BaseException]]:
    """Start ``store.snapshot()`` on a thread and return once the slow git
    hangs in it; the list receives what the snapshot raises."""
    errors: list[BaseException] = []

    def snapshot() -> None:
        try:
            store.snapshot()
        except BaseException as exc:  # the test looks at it
            errors.append(exc)

    pids.write_text("")
    thread = threading.Thread(target=snapshot)
    thread.start()
    wait_for(pids.read_text, 10, message="the snapshot never reached git")
    return thread, errors


def test_close_and_timeouts_kill_the_git_in_flight(tmp_path, work):
    pids, wrapper = slow_git(tmp_path)
    store = CheckpointStore(tmp_path / "s.git", work, git=str(wrapper), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(GitTimeout):
        store.snapshot()
    assert time.monotonic() - started < 5
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    store.close()

    store = CheckpointStore(tmp_path / "s.git", work, git=str(wrapper), timeout=60)
    thread, errors = snapshot_until_git_hangs(store, pids)
    store.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointClosed)
    with pytest.raises(CheckpointClosed):
        store.snapshot()


def test_a_diff_does_not_wait_for_a_slow_snapshot(tmp_path, work):
    pids, wrapper = slow_git(tmp_path)
    store = CheckpointStore(tmp_path / "s.git", work, git=str(wrapper))
    store.init()
    thread, errors = snapshot_until_git_hangs(store, pids)
    try:
        started = time.monotonic()
        assert store.stat(EMPTY_TREE, EMPTY_TREE) == []
        assert time.monotonic() - started < 2
    finally:
        store.close()
        thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], CheckpointClosed)


# -- disk ----------------------------------------------------------------------


def test_disk_stays_bounded_over_200_runs_of_a_50_mb_tree(tmp_path, work):
    for d in range(5):
        for f in range(10):
            write(work / f"data{d}/blob{f}.bin", os.urandom(MIB))
    write(work / "notes.txt", "start\n")
    store = CheckpointStore(tmp_path / "s.git", work, keep_days=365)
    try:
        first = store.snapshot()
        store.pin("runs/r000/0", first.tree)
        base = store.size_bytes()
        assert 50 * MIB <= base < 53 * MIB  # random data does not compress
        for i in range(1, 201):
            before = store.snapshot()
            write(work / "notes.txt", f"round {i}\n" * 40)
            after = store.snapshot()
            assert after.updated == 1
            store.pin(f"runs/r{i:03d}/0", before.tree)
            store.pin(f"runs/r{i:03d}/1", after.tree)
        grown = store.size_bytes() - base
        # Loose: per round one blob, one tree, two commits, two refs, 4 KiB blocks each.
        assert grown < 200 * 32 * 1024, grown
        pruned = store.prune()
        assert pruned.removed == ()
        packed = store.size_bytes()
        assert packed - 50 * MIB < 2 * MIB, packed  # 400 commits + 200 trees + 200 blobs, packed
        assert len(store.pins()) == 401
    finally:
        store.close()


def test_prune_drops_old_runs_then_the_oldest_past_the_cap(tmp_path, work):
    now = [1_000_000.0]
    store = CheckpointStore(
        tmp_path / "s.git", work, keep_days=7, clock=lambda: now[0], max_file_bytes=4 * MIB
    )
    try:
        for run in range(6):
            write(work / "payload.bin", os.urandom(MIB))
            snap = store.snapshot()
            store.pin(f"runs/r{run}/0", snap.tree)
            store.pin(f"runs/r{run}/1", snap.tree)
            now[0] += 86400 * 2  # two days per run
        full = store.size_bytes()
        assert full > 6 * MIB
        result = store.prune(protect={"runs/r0"})
        # r1, r2 are older than 7 days at now; r0 is protected; r5 is the newest.
        assert set(result.removed) == {"runs/r1/0", "runs/r1/1", "runs/r2/0", "runs/r2/1"}
        assert {p.group for p in store.pins()} == {"runs/r0", "runs/r3", "runs/r4", "runs/r5"}
        assert result.bytes_after < full - 1.5 * MIB

        store.max_bytes = int(2.5 * MIB)
        capped = store.prune(protect={"runs/r0"})
        assert {p.group for p in store.pins()} <= {"runs/r0", "runs/r4", "runs/r5"}
        assert "runs/r3/0" in capped.removed and "runs/r5/0" not in capped.removed
        assert capped.bytes_after < capped.bytes_before
        assert store.unpin("runs/r0") == 2
        assert {p.group for p in store.pins()} <= {"runs/r4", "runs/r5"}
        # The files in the workspace now are always kept (the index holds them).
        assert store.snapshot().updated == 0
    finally:
        store.close()


def test_journal_names_what_an_interrupted_restore_was(tmp_path, work):
    store = CheckpointStore(tmp_path / "s.git", work)
    write(work / "a", "1")
    snap = store.snapshot()
    store.close()
    journal = store.git_dir / "restore-journal.json"
    journal.write_text(
        json.dumps({"token": "ab12", "tree": snap.tree, "paths": ["a", "d/b"], "started": 1.0})
    )
    stray = write(work / "d" / (TEMP_PREFIX.decode() + "ab12-0.tmp"), "partial")
    other = write(work / "d" / (TEMP_PREFIX.decode() + "ffff-0.tmp"), "not this restore's")
    again = CheckpointStore(store.git_dir, work)
    try:
        found = again.init()
        assert found is not None and found.paths == ("a", "d/b")
        assert not stray.exists() and other.exists() and not journal.exists()
    finally:
        again.close()

"""Durable state of the Batch API: files on disk under `--batch-dir`, everything else in SQLite.

Layout of the batch directory:

    batches.sqlite   the `files`, `batches` and `lines` tables (WAL journal)
    files/<id>.jsonl the bytes of each uploaded or produced file

A batch copies its input file's lines into `lines` when it is created. Each finished line
writes its output line into its row in one transaction, together with the batch's counts;
a row whose output is set is never run again, so after a kill -9 a restarted server runs
only the lines with no output. Output and error files are written from `lines` in line order
when the batch ends, so each custom_id appears exactly once in them.

WAL with synchronous=NORMAL: a commit survives the process being killed (the OS holds the
write); only a power cut may lose the last commits, and those lines then run again.

One connection guarded by a lock: the HTTP handlers (in worker threads) and the batch
runner's thread share it; every call is short. One server per directory: the store holds
an exclusive lock on `lock` in it while open (a second server would run the same lines).
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a runner has work on these

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL,
    expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
    failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
    output_file_id TEXT, error_file_id TEXT, total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0, failed INTEGER NOT NULL DEFAULT 0, metadata TEXT);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT NOT NULL, request TEXT NOT NULL,
    ok INTEGER, output TEXT, PRIMARY KEY (batch_id, line));
"""

_TIMES = ("created_at", "expires_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")


class BatchDirBusy(RuntimeError):
    """Another process has this batch directory open."""


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class BatchStore:
    """The files and batches of one batch directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        (self.dir / "files").mkdir(parents=True, exist_ok=True)
        self._lockfile = open(self.dir / "lock", "a")
        try:
            fcntl.flock(self._lockfile, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfile.close()
            raise BatchDirBusy(f"the batch directory {self.dir} is in use by another server") from None
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.dir / "batches.sqlite", check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()
        self._lockfile.close()  # releases the directory

    def _write(self, sql_args: Iterable[tuple[str, tuple]]) -> None:
        """Runs the statements in one transaction."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in sql_args:
                    self.db.execute(sql, args)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> Optional[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ files

    def path(self, file_id: str) -> Path:
        return self.dir / "files" / f"{file_id}.jsonl"

    def add_file(self, purpose: str, filename: str, src: Optional[Path] = None, data: bytes = b"") -> dict:
        """Stores a file (moved from `src`, or written from `data`) and returns its object."""
        file_id = new_id("file-")
        dst = self.path(file_id)
        if src is not None:
            os.replace(src, dst)
        else:
            tmp = dst.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        self._write([("INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                      (file_id, purpose, filename, dst.stat().st_size, int(time.time())))])
        return self.file(file_id)

    def file(self, file_id: str) -> Optional[dict]:
        row = self._one("SELECT * FROM files WHERE id = ?", (file_id,))
        if row is None:
            return None
        return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
                "filename": row["filename"], "purpose": row["purpose"], "status": "processed"}

    def files(self, purpose: Optional[str] = None) -> list[dict]:
        rows = self._all("SELECT id FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at, rowid",
                         (purpose, purpose))
        return [self.file(r["id"]) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        if self.file(file_id) is None:
            return False
        self._write([("DELETE FROM files WHERE id = ?", (file_id,))])
        self.path(file_id).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------------ batches

    def create_batch(self, endpoint: str, input_file_id: str, window_s: int, window: str,
                     metadata: Optional[dict], lines: list[tuple[int, str, str]]) -> dict:
        """A batch in_progress over `lines` (line number, custom_id, the line's JSON text)."""
        batch_id, now = new_id("batch_"), int(time.time())
        self._write(
            [("INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, created_at, "
              "expires_at, in_progress_at, total, metadata) VALUES (?, ?, ?, ?, 'in_progress', ?, ?, ?, ?, ?)",
              (batch_id, endpoint, input_file_id, window, now, now + window_s, now, len(lines),
               json.dumps(metadata) if metadata is not None else None))]
            + [("INSERT INTO lines (batch_id, line, custom_id, request) VALUES (?, ?, ?, ?)",
                (batch_id, n, cid, text)) for n, cid, text in lines])
        return self.batch(batch_id)

    def batch(self, batch_id: str) -> Optional[dict]:
        """The batch object as OpenAI returns it."""
        row = self._one("SELECT * FROM batches WHERE id = ?", (batch_id,))
        if row is None:
            return None
        out: dict[str, Any] = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": None,
                               "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
                               "status": row["status"], "output_file_id": row["output_file_id"],
                               "error_file_id": row["error_file_id"]}
        out.update({t: row[t] for t in _TIMES})
        out["request_counts"] = {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}
        out["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
        return out

    def batches(self, after: Optional[str], limit: int) -> tuple[list[dict], bool]:
        """Newest first, those created before `after` (OpenAI's cursor); (page, has_more)."""
        if after is not None:
            rows = self._all("SELECT id FROM batches WHERE rowid < (SELECT rowid FROM batches WHERE id = ?) "
                             "ORDER BY rowid DESC LIMIT ?", (after, limit + 1))
        else:
            rows = self._all("SELECT id FROM batches ORDER BY rowid DESC LIMIT ?", (limit + 1,))
        return [self.batch(r["id"]) for r in rows[:limit]], len(rows) > limit

    def active(self) -> list[str]:
        """Batches a runner has work on, oldest first."""
        marks = ",".join("?" * len(ACTIVE))
        return [r["id"] for r in self._all(f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY rowid", ACTIVE)]

    def set_status(self, batch_id: str, status: str, when: Optional[str] = None, only_from: tuple = ()) -> bool:
        """Moves a batch to `status` (stamping `when`); with `only_from`, only from those statuses."""
        sql = f"UPDATE batches SET status = ?{f', {when} = ?' if when else ''} WHERE id = ?"
        args: tuple = (status, int(time.time()), batch_id) if when else (status, batch_id)
        if only_from:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            args += tuple(only_from)
        with self.lock:
            return self.db.execute(sql, args).rowcount > 0

    # ------------------------------------------------------------------ lines

    def pending(self, batch_id: str, skip: set[int], limit: int) -> list[tuple[int, str, str]]:
        """Up to `limit` lines with no output yet, not in `skip`: (line, custom_id, request text)."""
        rows = self._all("SELECT line, custom_id, request FROM lines WHERE batch_id = ? AND ok IS NULL "
                         "ORDER BY line LIMIT ?", (batch_id, limit + len(skip)))
        return [(r["line"], r["custom_id"], r["request"]) for r in rows if r["line"] not in skip][:limit]

    def record(self, batch_id: str, results: list[tuple[int, bool, dict]]) -> None:
        """Finished lines (line, ok, output line), with the batch's counts, in one transaction; a
        line that has its output already keeps it."""
        stmts = []
        for line, ok, output in results:
            stmts.append(("UPDATE lines SET ok = ?, output = ? WHERE batch_id = ? AND line = ? AND ok IS NULL",
                          (int(ok), json.dumps(output, ensure_ascii=False, separators=(",", ":")), batch_id, line)))
        stmts.append(("UPDATE batches SET completed = (SELECT COUNT(*) FROM lines WHERE batch_id = ? AND ok = 1), "
                      "failed = (SELECT COUNT(*) FROM lines WHERE batch_id = ? AND ok = 0) WHERE id = ?",
                      (batch_id, batch_id, batch_id)))
        self._write(stmts)

    def left(self, batch_id: str) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM lines WHERE batch_id = ? AND ok IS NULL", (batch_id,))
        return row["n"]

    def finalize(self, batch_id: str, status: str, when: str) -> dict:
        """Writes the output file (lines that succeeded) and the error file (the others), each in
        line order and each only when not empty, then sets `status`."""
        ids: dict[str, Optional[str]] = {"output_file_id": None, "error_file_id": None}
        for ok, key, purpose in ((1, "output_file_id", "batch_output"), (0, "error_file_id", "batch_output")):
            tmp = self.dir / "files" / f"{batch_id}.{ok}.tmp"
            n = 0
            with open(tmp, "w", encoding="utf-8") as f:
                for row in self._all("SELECT output FROM lines WHERE batch_id = ? AND ok = ? ORDER BY line",
                                     (batch_id, ok)):
                    f.write(row["output"] + "\n")
                    n += 1
            if n:
                ids[key] = self.add_file(purpose, f"{batch_id}_{'output' if ok else 'error'}.jsonl", src=tmp)["id"]
            else:
                tmp.unlink()
        self._write([(f"UPDATE batches SET status = ?, {when} = ?, output_file_id = ?, error_file_id = ? "
                      "WHERE id = ?", (status, int(time.time()), ids["output_file_id"], ids["error_file_id"],
                                       batch_id))])
        return self.batch(batch_id)

"""peewee models and schema migrations.

Several databases are open at once and used from many threads, so no
model is bound to a global database: :func:`registry_models` builds a fresh
model set for each registry.  The workspace databases are queried in plain
SQL (see :class:`crushd.store.WorkspaceStore`); their schema is the
migrations below.

The schema is created and changed only by the numbered migrations below,
applied at open and recorded in ``PRAGMA user_version``.  A migration is
never edited once released; a change is a new migration.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import peewee as pw
from playhouse.migrate import SchemaMigrator, migrate

from crushd.errors import SchemaTooNew

Migration = Callable[[pw.Database], None]


def _sql(*statements: str) -> Migration:
    def apply(db: pw.Database) -> None:
        for statement in statements:
            db.execute_sql(statement)

    return apply


def _add_usage_columns(db: pw.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    with migrator.migration_context():
        migrate(
            migrator.add_column("run", "prompt_tokens", pw.IntegerField(default=0)),
            migrator.add_column("run", "completion_tokens", pw.IntegerField(default=0)),
            migrator.add_column("session", "prompt_tokens", pw.IntegerField(default=0)),
            migrator.add_column("session", "completion_tokens", pw.IntegerField(default=0)),
        )


def _add_run_kind_and_model(db: pw.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    with migrator.migration_context():
        migrate(
            migrator.add_column("run", "kind", pw.CharField(default="prompt")),
            migrator.add_column("run", "model", pw.CharField(null=True)),
        )


def _add_cache_and_cost_columns(db: pw.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    with migrator.migration_context():
        migrate(
            *(
                migrator.add_column(table, name, field)
                for table in ("run", "session")
                for name, field in (
                    ("cache_read_tokens", pw.IntegerField(default=0)),
                    ("cache_write_tokens", pw.IntegerField(default=0)),
                    ("cost_usd", pw.FloatField(null=True)),
                )
            )
        )


def _add_context_columns(db: pw.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    with migrator.migration_context():
        migrate(
            migrator.add_column("session", "context_tokens", pw.IntegerField(default=0)),
            migrator.add_column("session", "summary_id", pw.CharField(null=True)),
            migrator.add_column("session", "summary_keep_pk", pw.IntegerField(null=True)),
        )


def _add_checkpoint_tables(db: pw.Database) -> None:
    migrator = SchemaMigrator.from_database(db)
    with migrator.migration_context():
        migrate(migrator.add_column("message", "reverted_by", pw.CharField(null=True)))
    _sql(
        """CREATE TABLE checkpoint_run (
            run_id TEXT PRIMARY KEY REFERENCES run (id) ON DELETE CASCADE,
            session_id TEXT NOT NULL REFERENCES session (id) ON DELETE CASCADE,
            pin_group TEXT NOT NULL,
            before_tree TEXT NOT NULL,
            after_tree TEXT NOT NULL,
            note TEXT NOT NULL,
            truncated INTEGER NOT NULL,
            expired INTEGER NOT NULL,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE checkpoint_step (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES run (id) ON DELETE CASCADE,
            session_id TEXT NOT NULL REFERENCES session (id) ON DELETE CASCADE,
            tool_call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            before_tree TEXT NOT NULL,
            after_tree TEXT NOT NULL,
            paths TEXT NOT NULL,
            created_at TEXT NOT NULL)""",
        "CREATE INDEX checkpoint_step_run ON checkpoint_step (run_id, pk)",
        "CREATE INDEX checkpoint_step_session ON checkpoint_step (session_id, pk)",
        """CREATE TABLE checkpoint_revert (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES session (id) ON DELETE CASCADE,
            run_id TEXT,
            message_id TEXT,
            from_pk INTEGER,
            paths TEXT NOT NULL,
            target_tree TEXT NOT NULL,
            expected_tree TEXT,
            before_tree TEXT,
            after_tree TEXT,
            undo_before_tree TEXT,
            undo_after_tree TEXT,
            message_ids TEXT NOT NULL,
            result TEXT,
            undo_result TEXT,
            forced INTEGER NOT NULL,
            state TEXT NOT NULL,
            error TEXT,
            pin_group TEXT NOT NULL,
            expired INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            undone_at TEXT)""",
        "CREATE INDEX checkpoint_revert_session ON checkpoint_revert (session_id, pk)",
        "CREATE INDEX message_reverted ON message (reverted_by)",
    )(db)


WORKSPACE_MIGRATIONS: list[Migration] = [
    # 1: sessions, messages with JSON parts, runs, key/value meta.
    _sql(
        """CREATE TABLE session (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            title TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE message (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES session (id) ON DELETE CASCADE,
            run_id TEXT,
            role TEXT NOT NULL,
            parts TEXT NOT NULL,
            model TEXT,
            provider TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX message_session ON message (session_id, pk)",
        "CREATE INDEX message_run ON message (run_id)",
        """CREATE TABLE run (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL REFERENCES session (id) ON DELETE CASCADE,
            prompt TEXT NOT NULL,
            status TEXT NOT NULL,
            error TEXT,
            message_id TEXT,
            text TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT)""",
        "CREATE INDEX run_session ON run (session_id, pk)",
        "CREATE INDEX run_status ON run (status, pk)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # 2: token usage per run and per session.
    _add_usage_columns,
    # 3: what a run is (a prompt; later a compaction) and the configured
    #    model it used; runs from before have kind "prompt" and no model.
    _add_run_kind_and_model,
    # 4: prompt-cache tokens and the cost in USD, per run and per session;
    #    null cost: no prices (or nothing counted yet).
    _add_cache_and_cost_columns,
    # 5: compaction: the prompt tokens of the session's last model request,
    #    the summary in force and the first message kept after it.
    _add_context_columns,
    # 6: checkpoints: the trees of each run and of each tool call that can
    #    change files, the reverts, and the revert a message is reverted by.
    _add_checkpoint_tables,
]

REGISTRY_MIGRATIONS: list[Migration] = [
    _sql(
        """CREATE TABLE workspace (
            pk INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            path TEXT NOT NULL UNIQUE,
            yolo INTEGER NOT NULL DEFAULT 0,
            registered INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL)""",
    ),
]


def apply_migrations(db: pw.Database, migrations: list[Migration]) -> int:
    """Bring ``db`` up to ``len(migrations)``; return the version it had.

    Each migration runs in its own transaction together with the bump of
    ``user_version``, so a crash mid-migration leaves the old version intact.
    """
    (version,) = db.execute_sql("PRAGMA user_version").fetchone()
    if version > len(migrations):
        raise SchemaTooNew(
            f"database {db.database} has schema version {version}, newer than this "
            f"crushd understands ({len(migrations)}); upgrade crushd"
        )
    if version == len(migrations):
        return version
    # Table rebuilds (DROP + RENAME) must not cascade: foreign keys can only be
    # switched off outside a transaction.
    db.execute_sql("PRAGMA foreign_keys = OFF")
    try:
        for number in range(version + 1, len(migrations) + 1):
            with db.atomic("IMMEDIATE"):
                (current,) = db.execute_sql("PRAGMA user_version").fetchone()
                if current >= number:
                    continue
                migrations[number - 1](db)
                if db.execute_sql("PRAGMA foreign_key_check").fetchall():
                    raise RuntimeError(f"migration {number} broke a foreign key")
                db.execute_sql(f"PRAGMA user_version = {number}")
    finally:
        db.execute_sql("PRAGMA foreign_keys = ON")
    return version


def registry_models(db: pw.Database) -> SimpleNamespace:
    class Workspace(pw.Model):
        pk = pw.AutoField()
        id = pw.CharField(unique=True)
        path = pw.TextField(unique=True)
        yolo = pw.BooleanField(default=False)
        registered = pw.BooleanField(default=True)
        created_at = pw.TextField()

        class Meta:
            database = db
            legacy_table_names = False

    return SimpleNamespace(Workspace=Workspace)

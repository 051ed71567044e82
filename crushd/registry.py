"""The registry: which workspaces crushd knows (``registry.db``).

Its own database in the data directory, apart from the workspaces' ones
(``workspaces/<id>/workspace.db``, each opened by its workspace): the server
reads it at start to know which workspaces to open.  Queried through peewee
models built for this database
alone (:func:`crushd.models.registry_models`; no model is bound to a global
database): a handful of calls per registration, not per run, so the query
builder's cost does not matter here, and the queries themselves are not
SQLite's — only the connection and transaction under them are
(:class:`crushd.sqlite.SqliteStore`).

Nothing probes the registry, so any write it accepts marks it available
again (``recover_on_write``).  Every public method is thread-safe and blocks
only on the connection lock (bounded); records are plain dicts in the
API's JSON shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crushd.common import new_id, utcnow
from crushd.models import REGISTRY_MIGRATIONS, registry_models
from crushd.sqlite import SqliteStore


class RegistryStore(SqliteStore):
    """The list of registered workspaces (``registry.db``)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, REGISTRY_MIGRATIONS)
        self.m = registry_models(self.db)

    @staticmethod
    def _dict(row: Any) -> dict[str, Any]:
        return {
            "id": row.id,
            "path": row.path,
            "yolo": bool(row.yolo),
            "created_at": row.created_at,
            "registered": bool(row.registered),
        }

    def registered(self) -> list[dict[str, Any]]:
        W = self.m.Workspace
        with self._use():
            return [self._dict(r) for r in W.select().where(W.registered == True).order_by(W.pk)]  # noqa: E712

    def get(self, workspace_id: str) -> dict[str, Any] | None:
        W = self.m.Workspace
        with self._use():
            row = W.get_or_none(W.id == workspace_id)
            return self._dict(row) if row else None

    def register(self, path: str, yolo: bool | None) -> tuple[dict[str, Any], str]:
        """Register ``path``; return the record and one of ``created``,
        ``restored`` (known but unregistered: same id) or ``existing``."""
        W = self.m.Workspace
        with self._use(write=True):
            row = W.get_or_none(W.path == path)
            if row is None:
                row = W.create(
                    id=new_id(), path=path, yolo=bool(yolo), registered=True, created_at=utcnow()
                )
                return self._dict(row), "created"
            if row.registered:
                return self._dict(row), "existing"
            row.registered = True
            if yolo is not None:
                row.yolo = yolo
            row.save()
            return self._dict(row), "restored"

    def unregister(self, workspace_id: str, purge: bool) -> None:
        W = self.m.Workspace
        with self._use(write=True):
            if purge:
                W.delete().where(W.id == workspace_id).execute()
            else:
                W.update(registered=False).where(W.id == workspace_id).execute()

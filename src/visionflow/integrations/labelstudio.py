"""Label Studio's REST API, as much as `visionflow annotate` needs (the only module that talks to it).

Why the API directly and not FiftyOne's annotation backend: the loop's truth is our manifest and
the user's annotation files, not a FiftyOne dataset, so corrections are read into the canonical
sample record by the same Label Studio reader ingest uses (visionflow.formats.labelstudio); the
tasks carry our current labels and the model's prediction as two *predictions* (the annotator
starts from the current labels and sees the model's view beside them); and FiftyOne's
`load_annotations` deletes labels it received nothing for when a `from_name` does not match
(docs/relabel.md), which must never happen to a user's labels. Only the standard library is used
(urllib), so nothing is added to the environment; the server may be any Label Studio >= 1.8.

Authentication: `Authorization: Token <key>` (the legacy token of Account & Settings, or
`--user-token` at `label-studio start`); a personal access token (a JWT refresh token) is
exchanged for an access token first (`/api/token/refresh`). The key comes from the environment
(LABEL_STUDIO_API_KEY), never from params.yaml or the command line.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

from visionflow.core.errors import UserError

TIMEOUT_S = 60.0


class LabelStudio:
    def __init__(self, url: str, api_key: str):
        if not api_key:
            raise UserError("LABEL_STUDIO_API_KEY is not set: copy the access token from Label Studio's "
                            "Account & Settings page (or the --user-token the server was started with) into it")
        self.url = url.rstrip("/")
        self._auth = f"Token {api_key}"
        if api_key.count(".") == 2:  # a personal access token: a JWT refresh token
            access = self._call("POST", "/api/token/refresh", {"refresh": api_key}, auth=False)
            self._auth = f"Bearer {access['access']}"

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True,
              query: Optional[dict[str, Any]] = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        req.add_header("Accept", "application/json")
        if auth:
            req.add_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                text = resp.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:400]
            if exc.code in (401, 403):
                raise UserError(f"Label Studio at {self.url} refused {method} {path} ({exc.code}): {detail}; "
                                "check LABEL_STUDIO_API_KEY (Account & Settings -> access token)") from None
            raise UserError(f"Label Studio at {self.url}: {method} {path} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"Label Studio at {self.url} did not answer {method} {path} ({reason}); is the server "
                            "running? Start it with `label-studio start` (docs/relabel.md) or pass --url") from None
        return json.loads(text) if text else None

    # --- what annotate uses ----------------------------------------------------------------------

    def version(self) -> str:
        return str((self._call("GET", "/api/version") or {}).get("release", "unknown"))

    def create_project(self, title: str, label_config: str, description: str, model_version: str) -> int:
        """A project whose annotators start from the predictions of `model_version` (our current
        labels): Label Studio's "use predictions to prelabel tasks"."""
        project = self._call("POST", "/api/projects", {
            "title": title[:50], "description": description, "label_config": label_config,
            "show_collab_predictions": True, "model_version": model_version,
            "show_instruction": True, "expert_instruction": description,
        })
        return int(project["id"])

    def add_local_storage(self, project: int, folder: str, title: str) -> int:
        """Let the project serve files under `folder` (absolute, inside the server's
        LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) as /data/local-files/?d=... URLs. Not synced:
        the tasks are imported with their data, the storage only grants access."""
        storage = self._call("POST", "/api/storages/localfiles", {
            "project": project, "path": folder, "title": title[:256], "use_blob_urls": False,
            "regex_filter": "", "presign": False,
        })
        return int(storage["id"])

    def import_tasks(self, project: int, tasks: list[dict[str, Any]]) -> int:
        res = self._call("POST", f"/api/projects/{project}/import", tasks,
                         query={"commit_to_project": "true", "return_task_ids": "true"})
        return int(res.get("task_count", len(tasks)))

    def export_tasks(self, project: int) -> list[dict[str, Any]]:
        """Every task of the project in Label Studio's JSON export format (annotations and predictions)."""
        tasks = self._call("GET", f"/api/projects/{project}/export",
                           query={"exportType": "JSON", "download_all_tasks": "true"})
        if not isinstance(tasks, list):
            raise UserError(f"Label Studio at {self.url}: project {project}'s export is not a list of tasks")
        return tasks

    def project_url(self, project: int) -> str:
        return f"{self.url}/projects/{project}/data"

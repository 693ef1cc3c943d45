"""A local, in-memory Hugging Face Hub endpoint for upload tests (stdlib ``http.server`` in a thread, 127.0.0.1).

It implements exactly the requests ``huggingface_hub`` (2.4) makes for ``create_repo``, ``create_branch`` and
``upload_folder``, read from its source (``hf_api.py``, ``_commit_api.py``, ``_upload_pipeline.py``, ``lfs.py``):

* ``POST /api/repos/create`` -- ``{"name", "organization", "visibility"?}``; 409 (with ``url``) when it exists;
  a new repo gets ``main`` holding the default ``.gitattributes``, like the Hub;
* ``POST /api/models/{repo}/branch/{branch}`` -- ``{"startingPoint"?}``; 409 when it exists;
* ``POST /api/validate-yaml`` -- the client sends ``README.md`` before hashing; the front matter must be a YAML
  mapping, ``base_model`` Hub id(s), ``base_model_relation`` one of the Hub's values, ``tags`` a list (400 else);
* ``POST /api/models/{repo}/preupload/{rev}`` -- upload mode per file: with ``lfs_policy="gitattributes"`` the
  Hub's default rules (``*.safetensors``, ``*.onnx``, ``*.onnx_data``, ``*.data``, ``*.bin`` ... or >= 10 MiB ->
  ``lfs``), with ``"regular"`` every file inline;
* ``POST /{repo}.git/info/lfs/objects/batch`` -- basic transfer (``PUT`` of the whole file), or multipart
  (``chunk_size`` + numbered part URLs, then a completion ``POST`` to ``href``) for objects larger than
  ``multipart_chunk``; each object gets a ``verify`` action. Objects already stored get no actions;
* ``PUT /lfs/{oid}``, ``PUT /lfs/{oid}/part/{n}`` (answers an ``ETag``), ``POST /lfs/{oid}/complete``,
  ``POST /lfs/{oid}/verify`` -- the SHA-256 and size of every object are checked;
* ``POST /api/models/{repo}/commit/{rev}`` -- NDJSON: a ``header`` line, then ``file`` (base64 content),
  ``lfsFile`` (an uploaded object, by oid) and ``deletedFile`` lines; ``?create_pr=1`` commits to a new
  ``refs/pr/N``;
* ``GET /api/agent-harnesses`` -- the client's AI-agent registry (fetched from ``HF_ENDPOINT`` at most once a
  day, cached under ``HF_HOME``; used by its terminal display): an empty registry.

Unknown revisions answer 404 ``RevisionNotFound`` and unknown repos 404 ``RepoNotFound``, as the Hub does. Any
other request is answered 404 and recorded in :attr:`LocalHub.unknown`, so a test sees a client call this server
does not emulate. Every request is recorded in :attr:`LocalHub.requests` (method, path, Authorization header).
``fail_commits=True`` answers commits with 403 and a body echoing the Authorization header (a server that leaks
the token back), to check that errors are scrubbed. Not emulated: the Xet storage protocol (``hf_xet`` uploads LFS
files through it when installed; tests either disable Xet or use ``lfs_policy="regular"``), pull requests opened
through the discussions API (the Xet pipeline's ``create_pr``), remote oids in preupload answers (every file is
always re-uploaded).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = ("*.safetensors", "*.onnx", "*.onnx_data", "*.data", "*.bin", "*.pt", "*.gguf", "*.pb", "*.zip")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
RELATIONS = ("adapter", "merge", "quantized", "finetune")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class _Reply(Exception):
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


@dataclass
class Repo:
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # ref -> {path: content}
    commits: list[dict[str, Any]] = field(default_factory=list)
    n_prs: int = 0


class LocalHub:
    """``with LocalHub() as hub:`` -- ``hub.url`` is the endpoint; ``hub.repos`` holds what arrived."""

    def __init__(self, lfs_policy: str = "gitattributes", multipart_chunk: int | None = None) -> None:
        if lfs_policy not in ("gitattributes", "regular"):
            raise ValueError(f"lfs_policy must be 'gitattributes' or 'regular', got {lfs_policy!r}")
        self.lfs_policy = lfs_policy
        self.multipart_chunk = multipart_chunk
        self.fail_commits = False
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # oid -> content (uploaded and checked)
        self.parts: dict[str, dict[int, bytes]] = {}
        self.requests: list[dict[str, Any]] = []
        self.unknown: list[str] = []
        self.lfs_puts: list[str] = []  # oids uploaded through PUT (basic) or completion (multipart)
        self.verified: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                hub._handle(self)

            def do_POST(self) -> None:
                hub._handle(self)

            def do_PUT(self) -> None:
                hub._handle(self)

            def do_DELETE(self) -> None:
                hub._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        return dict(self.repos[repo_id].refs[ref])

    # -- HTTP plumbing -------------------------------------------------------------------------------------------
    @staticmethod
    def _read_body(h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        body = self._read_body(h)
        split = urlsplit(h.path)
        segs = [unquote(s) for s in split.path.strip("/").split("/")]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        with self._lock:
            self.requests.append({"method": h.command, "path": split.path, "auth": h.headers.get("Authorization")})
            try:
                status, payload, headers = 200, self._route(h.command, segs, query, body, h), {}
            except _Reply as r:
                status, payload, headers = r.status, r.body, r.headers
        data = payload if isinstance(payload, bytes) else json.dumps(payload if payload is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, segs: list[str], query: dict[str, str], body: bytes, h) -> Any:
        if method == "POST" and segs == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "GET" and segs == ["api", "agent-harnesses"]:  # the client's agent detection (daily, cached)
            return {"standardEnvVars": [], "harnesses": {}}
        if method == "POST" and segs == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if len(segs) >= 6 and segs[:2] == ["api", "models"] and method == "POST":
            repo_id, action, rest = f"{segs[2]}/{segs[3]}", segs[4], "/".join(segs[5:])
            if action == "branch":
                return self._create_branch(repo_id, rest, json.loads(body or b"{}"))
            if action == "preupload":
                return self._preupload(repo_id, rest, json.loads(body), query)
            if action == "commit":
                return self._commit(repo_id, rest, body, query, h.headers.get("Authorization"))
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}", json.loads(body))
        if segs[:1] == ["lfs"] and len(segs) >= 2:
            return self._lfs_object(method, segs[1], segs[2:], body)
        self.unknown.append(f"{method} /{'/'.join(segs)}")
        raise _Reply(404, {"error": f"local hub: {method} {h.path} is not emulated"})

    # -- endpoints -----------------------------------------------------------------------------------------------
    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise _Reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return self.repos[repo_id]

    def _ref(self, repo: Repo, rev: str) -> dict[str, bytes]:
        if rev not in repo.refs:
            raise _Reply(404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"})
        return repo.refs[rev]

    def _create_repo(self, p: dict[str, Any]) -> Any:
        repo_id = f"{p.get('organization')}/{p['name']}"
        if p.get("organization") is None or p.get("type", "model") != "model":
            raise _Reply(400, {"error": "local hub: only ORG/NAME model repos"})
        if repo_id in self.repos:
            raise _Reply(409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
        self.repos[repo_id] = Repo(
            private=p.get("visibility") == "private", refs={"main": {".gitattributes": GITATTRIBUTES}}
        )
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _create_branch(self, repo_id: str, branch: str, p: dict[str, Any]) -> Any:
        repo = self._repo(repo_id)
        if branch in repo.refs:
            raise _Reply(409, {"error": f"Reference {branch} already exists"})
        repo.refs[branch] = dict(self._ref(repo, p.get("startingPoint", "main")))
        return {}

    def _validate_yaml(self, p: dict[str, Any]) -> Any:
        m = re.match(r"^---\s*\n(.*?)\n---\s*\n", p.get("content", ""), re.S)
        errors = []
        meta = {}
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                errors.append(f"invalid YAML: {e}")
            if not errors and not isinstance(meta, dict):
                errors.append("metadata must be a YAML mapping")
        if not errors and isinstance(meta, dict):
            base = meta.get("base_model")
            bases = base if isinstance(base, list) else [] if base is None else [base]
            if not all(isinstance(b, str) and _HUB_ID.match(b) for b in bases):
                errors.append(f"base_model must be Hub model ids, got {base!r}")
            if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
                errors.append(f"base_model_relation must be one of {RELATIONS}")
            if "tags" in meta and not (
                isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])
            ):
                errors.append("tags must be a list of strings")
        if errors:
            raise _Reply(400, {"errors": [{"message": e} for e in errors], "error": "; ".join(errors)})
        return {"errors": [], "warnings": []}

    def _mode(self, path: str, size: int) -> str:
        if self.lfs_policy == "regular":
            return "regular"
        name = path.rsplit("/", 1)[-1]
        return "lfs" if size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(name, pat) for pat in LFS_PATTERNS) else "regular"

    def _preupload(self, repo_id: str, rev: str, p: dict[str, Any], query: dict[str, str]) -> Any:
        repo = self._repo(repo_id)
        self._ref(repo, "main" if query.get("create_pr") == "1" else rev)
        files = [
            {"path": f["path"], "uploadMode": self._mode(f["path"], int(f["size"])), "shouldIgnore": False, "oid": None}
            for f in p["files"]
        ]
        return {"files": files, "commitOid": "0" * 40}

    def _lfs_batch(self, repo_id: str, p: dict[str, Any]) -> Any:
        self._repo(repo_id)
        if p.get("operation") != "upload" or p.get("hash_algo", "sha256") != "sha256":
            raise _Reply(400, {"error": "local hub: only sha256 uploads"})
        objects = []
        for o in p["objects"]:
            oid, size = o["oid"], int(o["size"])
            obj: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs:
                verify = {"href": f"{self.url}/lfs/{oid}/verify", "header": {}}
                chunk = self.multipart_chunk
                if chunk and size > chunk:
                    header = {"chunk_size": str(chunk)}
                    header.update(
                        {f"{i + 1:05d}": f"{self.url}/lfs/{oid}/part/{i + 1}" for i in range(-(-size // chunk))}
                    )
                    upload = {"href": f"{self.url}/lfs/{oid}/complete", "header": header}
                else:
                    upload = {"href": f"{self.url}/lfs/{oid}", "header": {}}
                obj["actions"] = {"upload": upload, "verify": verify}
            objects.append(obj)
        return {"transfer": "basic", "objects": objects}

    def _store(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _Reply(400, {"error": f"local hub: content does not hash to {oid}"})
        self.lfs[oid] = data
        self.lfs_puts.append(oid)

    def _lfs_object(self, method: str, oid: str, rest: list[str], body: bytes) -> Any:
        if method == "PUT" and not rest:
            self._store(oid, body)
            return b""
        if method == "PUT" and len(rest) == 2 and rest[0] == "part":
            self.parts.setdefault(oid, {})[int(rest[1])] = body
            raise _Reply(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if method == "POST" and rest == ["complete"]:
            p = json.loads(body)
            parts = self.parts.pop(oid, {})
            numbers = [q["partNumber"] for q in p["parts"]]
            if p["oid"] != oid or numbers != sorted(parts) or not all(q["etag"] for q in p["parts"]):
                raise _Reply(400, {"error": "local hub: bad multipart completion"})
            self._store(oid, b"".join(parts[n] for n in numbers))
            return {}
        if method == "POST" and rest == ["verify"]:
            p = json.loads(body)
            if p["oid"] != oid or oid not in self.lfs or len(self.lfs[oid]) != int(p["size"]):
                raise _Reply(404, {"error": "local hub: object not uploaded"})
            self.verified.append(oid)
            return {}
        self.unknown.append(f"{method} /lfs/{oid}/{'/'.join(rest)}")
        raise _Reply(404, {"error": "local hub: unknown LFS request"})

    def _commit(self, repo_id: str, rev: str, body: bytes, query: dict[str, str], auth: str | None) -> Any:
        repo = self._repo(repo_id)
        if self.fail_commits:
            raise _Reply(403, {"error": f"local hub: commits are refused (you sent Authorization: {auth})"})
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _Reply(400, {"error": "local hub: the first NDJSON line must be the header"})
        create_pr = query.get("create_pr") == "1"
        files = dict(self._ref(repo, "main" if create_pr else rev))
        for line in lines[1:]:
            key, v = line["key"], line["value"]
            if key == "file":
                if v.get("encoding") != "base64":
                    raise _Reply(400, {"error": "local hub: regular files must be base64"})
                files[v["path"]] = base64.b64decode(v["content"])
            elif key == "lfsFile":
                data = self.lfs.get(v["oid"])
                if data is None or ("size" in v and len(data) != int(v["size"])):
                    raise _Reply(422, {"error": f"local hub: LFS object {v['oid']} was not uploaded"})
                files[v["path"]] = data
            elif key == "deletedFile":
                files.pop(v["path"], None)
            else:
                raise _Reply(400, {"error": f"local hub: unsupported commit line {key!r}"})
        oid = hashlib.sha1(json.dumps(lines).encode() + str(len(repo.commits)).encode()).hexdigest()
        pr_url = None
        if create_pr:
            repo.n_prs += 1
            rev = f"refs/pr/{repo.n_prs}"
            pr_url = f"{self.url}/{repo_id}/discussions/{repo.n_prs}"
        repo.refs[rev] = files
        repo.commits.append({"oid": oid, "ref": rev, "header": lines[0]["value"], "n_lines": len(lines) - 1})
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr_url}

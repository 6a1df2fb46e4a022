"""Who may call what: bearer tokens from a file of hashes, and the role each RPC needs.

The token file (`--auth-tokens`, TOML) holds only SHA-256 hashes of tokens:

    [[token]]
    name = "crawler-prod"
    sha256 = "<hex sha256 of the token string>"
    projects = ["acme"]          # or ["*"] for every project
    roles = ["report"]           # any of: report, read, admin

A call carries its token as `authorization: Bearer <token>`. Roles: `report`
starts, reports to and finishes operations; `read` reads and watches them;
`admin` may do everything, cancelling and deleting included.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import hashlib
import json
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headway_server.domain.errors import HeadwayError
from headway_server.domain.model import OperationFilter


class Unauthenticated(HeadwayError):
    """Missing, malformed or unknown credentials."""


class PermissionDenied(HeadwayError):
    """A known principal without the role (or project) the call needs."""


class AuthConfigError(ValueError):
    """The token file cannot be used; the message names the line and the reason."""


class Role(enum.Enum):
    REPORT = "report"
    READ = "read"
    ADMIN = "admin"


# The role each ProgressTracker RPC needs (admin may call every one).
METHOD_ROLES: Mapping[str, Role] = {
    "StartOperation": Role.REPORT,
    "UpdateOperation": Role.REPORT,
    "ReportProgress": Role.REPORT,
    "BatchUpdateOperations": Role.REPORT,
    "CompleteOperation": Role.REPORT,
    "FailOperation": Role.REPORT,
    "ReportLogs": Role.REPORT,
    "GetOperation": Role.READ,
    "ListOperations": Role.READ,
    "WatchOperation": Role.READ,
    "WatchOperations": Role.READ,
    "ListLogs": Role.READ,
    "GetTimeline": Role.READ,
    "GetStats": Role.READ,
    "CancelOperation": Role.ADMIN,
    "DeleteOperation": Role.ADMIN,
}

ALL_PROJECTS = "*"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "hw_"


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    # None: every project.
    projects: frozenset[str] | None
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return Role.ADMIN in self.roles or role in self.roles

    def sees(self, project: str) -> bool:
        return self.projects is None or project in self.projects


# The principal of the call being served (set per call, in the call's task).
current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "headway_principal", default=None
)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_block(name: str, token: str, projects: Sequence[str], roles: Sequence[str]) -> str:
    """The [[token]] entry for `token`, to paste into the token file."""

    # JSON strings are TOML basic strings: quotes and backslashes come escaped.
    return (
        "[[token]]\n"
        f"name = {json.dumps(name)}\n"
        f'sha256 = "{token_hash(token)}"\n'
        f"projects = [{', '.join(json.dumps(p) for p in projects)}]\n"
        f"roles = [{', '.join(json.dumps(r) for r in roles)}]\n"
    )


class TokenTable:
    """Principals by token hash, loaded from a token file."""

    def __init__(
        self,
        principals: Mapping[str, Principal],
        clients: Mapping[str, Principal] | None = None,
    ) -> None:
        self._by_hash = dict(principals)
        # Client certificate subject (a SAN or the CN) -> principal (mTLS).
        self._by_subject = dict(clients or {})
        # Bearer tokens that are JWTs are checked by this (see JwtVerifier).
        self.jwt: JwtVerifier | None = None

    def __len__(self) -> int:
        return len(self._by_hash)

    @classmethod
    def load(cls, path: str | Path) -> TokenTable:
        """Reads and checks a token file.

        Raises:
            AuthConfigError: unreadable, not TOML, or an entry is wrong; the
                message names the file, the line and the reason.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise AuthConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AuthConfigError(f"{path}: not valid TOML: {exc}") from exc
        unknown = set(data) - {"token", "client"}
        if unknown:
            raise AuthConfigError(f"{path}: unknown table(s) {sorted(unknown)}")
        entries = data.get("token", [])
        if not isinstance(entries, list):
            raise AuthConfigError(f"{path}: 'token' must be an array of tables ([[token]])")
        clients = _clients(data.get("client", []), path, text.splitlines())
        text_lines = text.splitlines()
        headers = [i for i, line in enumerate(text_lines) if line.strip() == "[[token]]"]
        principals: dict[str, Principal] = {}
        names: set[str] = set()
        for i, entry in enumerate(entries):
            header = headers[i] if i < len(headers) else None
            where = f"{path}:{header + 1 if header is not None else '?'}: token #{i + 1}"
            try:
                principal, digest = _entry(entry)
            except _Problem as problem:
                line = _line_of(text_lines, header, problem.key)
                at = f"{path}:{line}: token #{i + 1}" if line else where
                raise AuthConfigError(f"{at}: {problem}") from None
            if digest in principals:
                raise AuthConfigError(f"{where}: the same sha256 as another token")
            if principal.name in names:
                raise AuthConfigError(f"{where}: the name {principal.name!r} is used twice")
            names.add(principal.name)
            principals[digest] = principal
        return cls(principals, clients)

    def authenticate(
        self,
        metadata: Sequence[tuple[str, Any]] | None,
        peer: Mapping[str, Sequence[bytes]] | None = None,
    ) -> Principal:
        """The principal a call's `authorization` header names, else the one
        its client certificate's subject names (`peer`: grpc's auth context).

        Raises:
            Unauthenticated: no header, not a bearer token, an unknown token,
                or (without a header) an unknown certificate subject.
        """
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        if header is None:
            subjects = [
                s.decode(errors="replace")
                for key in ("x509_subject_alternative_name", "x509_common_name")
                for s in (peer or {}).get(key, ())
            ]
            for subject in subjects:
                principal = self._by_subject.get(subject)
                if principal is not None:
                    return principal
            if subjects:
                raise Unauthenticated("client certificate subject unknown")
            raise Unauthenticated("credentials required: send 'authorization: Bearer <token>'")
        scheme, _, token = str(header).partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed credentials: expected 'Bearer <token>'")
        if self.jwt is not None and looks_like_jwt(token.strip()):
            return self.jwt.principal(token.strip())
        principal = self._by_hash.get(token_hash(token.strip()))
        if principal is None:
            raise Unauthenticated("token unknown")
        return principal


def _clients(entries: Any, path: Path, lines: Sequence[str]) -> dict[str, Principal]:
    """[[client]] entries: certificate subjects (mTLS) with projects and roles."""
    if not isinstance(entries, list):
        raise AuthConfigError(f"{path}: 'client' must be an array of tables ([[client]])")
    headers = [i for i, line in enumerate(lines) if line.strip() == "[[client]]"]
    clients: dict[str, Principal] = {}
    for i, entry in enumerate(entries):
        header = headers[i] if i < len(headers) else None
        try:
            if not isinstance(entry, dict):
                raise _Problem("", "must be a table")
            subject = entry.get("subject")
            if not isinstance(subject, str) or not subject.strip():
                raise _Problem("subject", "'subject' must be a certificate's SAN or CN")
            rest = {k: v for k, v in entry.items() if k != "subject"}
            principal, _ = _entry({**rest, "name": subject, "sha256": "0" * 64})
        except _Problem as problem:
            line = _line_of(lines, header, problem.key) or "?"
            raise AuthConfigError(f"{path}:{line}: client #{i + 1}: {problem}") from None
        if subject in clients:
            raise AuthConfigError(f"{path}: client subject {subject!r} is listed twice")
        clients[subject] = principal
    return clients


class _Problem(ValueError):
    """What is wrong with one key of an entry."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def _line_of(lines: Sequence[str], header: int | None, key: str) -> int | None:
    """The 1-based line of `key = ...` in the entry starting at `header`."""
    if header is None:
        return None
    for i in range(header + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped.startswith("["):
            break
        if stripped.split("=", 1)[0].strip() == key:
            return i + 1
    return header + 1


def _entry(entry: Any) -> tuple[Principal, str]:
    if not isinstance(entry, dict):
        raise _Problem("", "must be a table")
    unknown = sorted(set(entry) - {"name", "sha256", "projects", "roles"})
    if unknown:
        raise _Problem(unknown[0], f"unknown key(s) {unknown}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _Problem("name", "'name' must be a non-empty string")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _HEX64.match(digest.lower()):
        raise _Problem("sha256", "'sha256' must be 64 hex digits (the token's hash)")
    projects = entry.get("projects")
    if (
        not isinstance(projects, list)
        or not projects
        or not all(isinstance(p, str) and p for p in projects)
    ):
        raise _Problem("projects", "'projects' must be a non-empty list of names, or ['*']")
    roles = entry.get("roles")
    valid = {r.value for r in Role}
    if not isinstance(roles, list) or not roles or not all(r in valid for r in roles):
        raise _Problem("roles", f"'roles' must list some of {sorted(valid)}")
    scope = None if ALL_PROJECTS in projects else frozenset(projects)
    return Principal(name, scope, frozenset(Role(r) for r in roles)), digest.lower()


def authorize(principal: Principal, method: str) -> None:
    """Raises PermissionDenied unless `principal` has the role `method` needs."""
    role = METHOD_ROLES.get(method)
    if role is not None and not principal.may(role):
        raise PermissionDenied(f"role {role.value} required for {method}")


def visible(project: str) -> bool:
    """Whether the caller of the current call may see `project` (any caller
    may when no authentication is configured)."""
    principal = current.get()
    return principal is None or principal.sees(project)


def require_project(project: str) -> None:
    """Raises PermissionDenied unless the current caller may use `project`."""
    if not visible(project):
        raise PermissionDenied(f"project {project!r} is not one this token may use")


def scoped(where: OperationFilter) -> OperationFilter:
    """`where` narrowed to the current caller's projects: a filter naming a
    project the caller may not use is PermissionDenied; one naming none sees
    only the caller's projects."""
    principal = current.get()
    if principal is None or principal.projects is None:
        return where
    if where.project:
        require_project(where.project)
        return where
    if len(principal.projects) == 1:
        # One project: the filter the watch hub indexes by.
        return dataclasses.replace(where, project=next(iter(principal.projects)))
    return dataclasses.replace(where, projects=principal.projects)


# Asymmetric algorithms only, pinned by the key's type: a token cannot choose
# "none" or an HMAC keyed with the public key.
_ALGORITHMS_BY_KEY = {
    "RSAPublicKey": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"],
    "EllipticCurvePublicKey": ["ES256", "ES384", "ES512"],
    "Ed25519PublicKey": ["EdDSA"],
    "Ed448PublicKey": ["EdDSA"],
}


class JwtVerifier:
    """Bearer tokens that are JWTs signed by a configured key: `--auth-jwt-key`
    (a PEM public key or a JWKS file), with the issuer and audience they must
    name. Claims: `projects` (names, or ["*"]), `roles`, `exp` (required) and
    `sub` (the principal's name in logs)."""

    def __init__(self, key_file: str, *, issuer: str, audience: str) -> None:
        import jwt  # only a server configured for JWTs needs it

        self._jwt = jwt
        self.issuer = issuer
        self.audience = audience
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise AuthConfigError(f"{key_file}: cannot read: {exc.strerror}") from exc
        # kid -> (key, algorithms); "" for a single PEM key.
        self._keys: dict[str, tuple[Any, list[str]]] = {}
        try:
            if text.lstrip().startswith("{"):
                for jwk in jwt.PyJWKSet.from_json(text).keys:
                    self._keys[jwk.key_id or ""] = (jwk.key, self._algorithms(jwk.key, key_file))
            else:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                key = load_pem_public_key(text.encode())
                self._keys[""] = (key, self._algorithms(key, key_file))
        except (ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as exc:
            raise AuthConfigError(f"{key_file}: not a PEM public key or JWKS: {exc}") from exc
        if not self._keys:
            raise AuthConfigError(f"{key_file}: no keys")

    @staticmethod
    def _algorithms(key: Any, source: str) -> list[str]:
        from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

        kinds = {
            "RSAPublicKey": rsa.RSAPublicKey,
            "EllipticCurvePublicKey": ec.EllipticCurvePublicKey,
            "Ed25519PublicKey": ed25519.Ed25519PublicKey,
            "Ed448PublicKey": ed448.Ed448PublicKey,
        }
        for name, kind in kinds.items():
            if isinstance(key, kind):
                return _ALGORITHMS_BY_KEY[name]
        raise AuthConfigError(f"{source}: only asymmetric public keys are accepted")

    def principal(self, token: str) -> Principal:
        jwt = self._jwt
        try:
            kid = jwt.get_unverified_header(token).get("kid") or ""
            key, algorithms = self._keys.get(kid) or self._keys.get("") or (None, [])
            if key is None:
                raise Unauthenticated("token signed by an unknown key")
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"token invalid: {exc}") from None
        projects, roles = claims.get("projects"), claims.get("roles")
        valid = {r.value for r in Role}
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            raise Unauthenticated("token invalid: claim 'projects' must list project names")
        if not isinstance(roles, list) or not roles or not all(r in valid for r in roles):
            raise Unauthenticated(f"token invalid: claim 'roles' must list some of {sorted(valid)}")
        scope = None if ALL_PROJECTS in projects else frozenset(projects)
        name = str(claims.get("sub") or "jwt")
        return Principal(name, scope, frozenset(Role(r) for r in roles))


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and not token.startswith(TOKEN_PREFIX)


def load(
    tokens_file: str = "", *, jwt_key: str = "", jwt_issuer: str = "", jwt_audience: str = ""
) -> TokenTable | None:
    """What calls are checked against: the token file's table and, with a JWT
    key, a verifier for JWT bearer tokens; None when neither is configured.

    Raises:
        AuthConfigError: a file cannot be used (its line and the reason).
    """
    if not tokens_file and not jwt_key:
        return None
    table = TokenTable.load(tokens_file) if tokens_file else TokenTable({})
    if jwt_key:
        table.jwt = JwtVerifier(jwt_key, issuer=jwt_issuer, audience=jwt_audience)
    return table

"""The REST routes the front serves: an explicit table, and nothing else.

Every other path, and every other method on these paths, is answered by the front (404, 405), never passed to
MLServer: a route MLServer adds in an upgrade (as 1.7 added `generate` and `infer_stream`) stays closed until it
is added here with its checks. Templates are MLServer's own, so request metrics keep their `path` labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ml_serving.server import INFER_ROUTE, INVOCATIONS_ROUTE, VERSION_INFER_ROUTE


class Answer(StrEnum):
    """What the front does for a route (the name of its handler in front.Front)."""

    INFER = "infer"
    INVOCATIONS = "invocations"
    READY = "ready"  # the served model can predict: /v2/health/ready and the model's ready routes
    LIVE = "live"
    SERVER_METADATA = "server_metadata"
    MODEL_METADATA = "model_metadata"
    INDEX = "index"  # the repository index: the one served model
    READ_ONLY = "read_only"  # the repository's load and unload: refused, 403
    PING = "ping"  # MLflow's scoring server's health routes
    VERSION = "version"


@dataclass(frozen=True)
class Route:
    template: str
    methods: frozenset[str]
    answer: Answer
    counted: bool = True  # in the REST request metrics (MLServer skips its health routes)

    @property
    def takes_body(self) -> bool:
        return "POST" in self.methods


GET, POST = frozenset({"GET", "HEAD"}), frozenset({"POST"})
ROUTES = (
    Route(INFER_ROUTE, POST, Answer.INFER),
    Route(VERSION_INFER_ROUTE, POST, Answer.INFER),
    Route(INVOCATIONS_ROUTE, POST, Answer.INVOCATIONS),
    Route("/v2/health/live", GET, Answer.LIVE, counted=False),
    Route("/v2/health/ready", GET, Answer.READY, counted=False),
    Route("/v2/models/{model_name}/ready", GET, Answer.READY),
    Route("/v2/models/{model_name}/versions/{model_version}/ready", GET, Answer.READY),
    Route("/v2", GET, Answer.SERVER_METADATA),
    Route("/v2/models/{model_name}", GET, Answer.MODEL_METADATA),
    Route("/v2/models/{model_name}/versions/{model_version}", GET, Answer.MODEL_METADATA),
    Route("/v2/repository/index", POST, Answer.INDEX),
    Route("/v2/repository/models/{model_name}/load", POST, Answer.READ_ONLY),
    Route("/v2/repository/models/{model_name}/unload", POST, Answer.READ_ONLY),
    Route("/ping", GET, Answer.PING),
    Route("/health", GET, Answer.PING),
    Route("/version", GET, Answer.VERSION),
)


@dataclass(frozen=True)
class Match:
    route: Route | None  # None: no route has this path
    params: dict[str, str]
    allowed: frozenset[str] = frozenset()  # the methods the path takes, when the method is not one of them


def _parts(template: str) -> tuple[str, ...]:
    return tuple(template.split("/"))


_BY_LENGTH: dict[int, list[tuple[tuple[str, ...], Route]]] = {}
for _route in ROUTES:
    _parts_of = _parts(_route.template)
    _BY_LENGTH.setdefault(len(_parts_of), []).append((_parts_of, _route))


def match(method: str, path: str) -> Match:
    """The route serving `method path`, with its path parameters; a path of no route, or a method it does not
    take (then `allowed` says which it does)."""
    parts = path.split("/")
    allowed: set[str] = set()
    for template, route in _BY_LENGTH.get(len(parts), ()):
        params = {}
        for want, got in zip(template, parts, strict=True):
            if want.startswith("{"):
                if not got:
                    break
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            if method in route.methods:
                return Match(route, params)
            allowed |= route.methods
    return Match(None, {}, frozenset(allowed))

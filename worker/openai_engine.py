"""An engine that calls an OpenAI-compatible completions server (vLLM, KServe, NIM, llm-d, ...) instead of loading a
model: `spec.model.endpoint`.

One request per prompt (each prompt has its own seed, and one seed for a batch would sample alike), sent from a bounded
thread pool; 429, 5xx and dropped connections are retried with exponential backoff (Retry-After honoured); 401, 403
and 404 are not retriable and become one-line ModelErrors that name the field to fix. Only the standard library is
used, so the worker image needs nothing new.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from genrun.worker.engine_types import Completion, ModelError, Params

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec

log = logging.getLogger("genrun.engine")

API_KEY_ENV = "OPENAI_API_KEY"  # = genrun.contract.api.API_KEY_ENV (the worker does not import the operator here)
RETRIABLE = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class EndpointError(Exception):
    """A request failed after its retries (retriable causes only: the shard Job's own retry takes over)."""


class OpenAIEngine:
    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 300.0,
        max_retries: int = 6,
        backoff: float = 0.5,
        sleep: Callable[[float], None] | None = None,
        check: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.max_concurrency = max(1, max_concurrency)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._sleep = sleep if sleep is not None else time.sleep
        if check:
            self._check_model()

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"{self.url}{path}"
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(where, data=data, headers=headers, method=method)
            wait = self.backoff * 2**attempt * (1 + random.random() / 2)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    out: dict[str, Any] = json.loads(resp.read())
                    return out
            except urllib.error.HTTPError as exc:
                detail = _error_text(exc)
                if exc.code not in RETRIABLE:
                    raise ModelError(self._fatal(exc.code, detail)) from None
                why = f"HTTP {exc.code} {detail}"
                after = exc.headers.get("Retry-After") if exc.headers else None
                if after and after.strip().isdigit():
                    wait = max(wait, min(float(after), 60.0))
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                why = str(getattr(exc, "reason", exc))
            except json.JSONDecodeError:
                raise ModelError(f"spec.model.endpoint.url: {where} did not answer with JSON") from None
            if attempt == self.max_retries:
                raise EndpointError(f"{where}: {why} (gave up after {self.max_retries} retries)")
            log.warning("%s: %s; retrying in %.1fs", where, why, wait)
            self._sleep(wait)
        raise AssertionError("unreachable")

    def _fatal(self, code: int, detail: str) -> str:
        if code in (401, 403):
            return (
                f"spec.model.endpoint: the server at {self.url} refused the API key (HTTP {code}); put the key under "
                f"{API_KEY_ENV} in the Secret named by spec.model.endpoint.apiKeySecret: {detail}"
            )
        if code == 404:
            return (
                f"spec.model.endpoint: {self.url} has no model {self.model!r} or no OpenAI API at that path (HTTP 404); "
                f"check spec.model.endpoint.model and that url ends with the API prefix such as /v1: {detail}"
            )
        return f"spec.model.endpoint: the server at {self.url} refused the request (HTTP {code}): {detail}"

    def _check_model(self) -> None:
        """Fail before sampling when the server is wrong for good (bad key, wrong path, model not served)."""
        models = self._request("GET", "/models").get("data") or []
        ids = [str(m.get("id")) for m in models if isinstance(m, dict)]
        if ids and self.model not in ids:
            raise ModelError(
                f"spec.model.endpoint.model: the server at {self.url} serves {', '.join(ids[:5])}, not {self.model!r}"
            )

    # -- Engine protocol ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            return list(pool.map(self._one, prompts, params))

    def _one(self, prompt: str, p: Params) -> list[Completion]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_tokens,
            "seed": p.seed,
            "logprobs": 0,  # the sampled tokens' log-probabilities, no alternatives
        }
        if p.stop:
            body["stop"] = list(p.stop)
        # vLLM's extensions: sent only when they do something, so that strict servers accept the neutral case.
        if p.repetition_penalty != 1.0:
            body["repetition_penalty"] = p.repetition_penalty
        if p.min_p:
            body["min_p"] = p.min_p
        out = self._request("POST", "/completions", body)
        return parse_choices(out, p.n)


def parse_choices(out: dict[str, Any], n: int) -> list[Completion]:
    """Completions from a /completions answer, in choice order; log-probability None when the server gave none."""
    choices = sorted(out.get("choices") or [], key=lambda ch: int(ch.get("index", 0)))
    usage = out.get("usage") or {}
    completions = []
    for ch in choices:
        lp = ch.get("logprobs") or {}
        token_lps = [x for x in (lp.get("token_logprobs") or []) if isinstance(x, int | float)]
        tokens = len(lp.get("tokens") or []) or len(token_lps)
        if not tokens:  # no per-token data: the request's completion tokens shared by its choices
            tokens = max(1, round(int(usage.get("completion_tokens") or 0) / max(1, len(choices))))
        finish = "length" if ch.get("finish_reason") == "length" else "stop"
        completions.append(Completion(str(ch.get("text", "")), tokens, sum(token_lps) if token_lps else None, finish))
    if len(completions) != n:
        raise EndpointError(f"the server answered {len(completions)} choice(s) for n={n}")
    return completions


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = exc.read().decode("utf-8", "replace")
        msg = json.loads(body).get("error", body) if body.lstrip().startswith("{") else body
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
    except (OSError, ValueError, AttributeError):
        msg = exc.reason
    return " ".join(str(msg).split())[:300] or str(exc.reason)


def from_spec(spec: GenerationRunSpec) -> OpenAIEngine:
    ep = spec.model.endpoint
    if ep is None:
        raise ModelError("spec.model.endpoint: not set; name the server (url, model, apiKeySecret)")
    return OpenAIEngine(
        ep.url, ep.model or spec.model.name, max_concurrency=ep.max_concurrency, timeout=float(ep.timeout_seconds)
    )

"""The OpenAI-compatible engine's HTTP layer against a STAND-IN server: a stdlib http.server on 127.0.0.1 that answers
in the OpenAI completions format (scripted failures, recorded requests). The real vLLM OpenAI server is exercised by
tests/integration/test_openai_vllm.py (slow)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from genrun.contract import api, errors
from genrun.contract import records as rec
from genrun.operator.manifests import _env
from genrun.operator.planner import make_round
from genrun.operator.policy import base_sampling
from genrun.worker.cli import main as worker_main
from genrun.worker.engine import ModelError, Params, make_engine
from genrun.worker.openai_engine import EndpointError, OpenAIEngine


class StandIn:
    """A stand-in OpenAI server: `fail` is a queue of HTTP codes answered before successes; `key` is required."""

    def __init__(self) -> None:
        self.fail: list[int] = []
        self.key = ""
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.lock = threading.Lock()
        self.delay = 0.0
        self.logprobs = True


@pytest.fixture
def server() -> Iterator[tuple[StandIn, str]]:
    state = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _gate(self) -> bool:
            if state.key and self.headers.get("Authorization") != f"Bearer {state.key}":
                self._send(401, {"error": {"message": "Invalid API key", "type": "auth"}})
                return False
            with state.lock:
                code = state.fail.pop(0) if state.fail else 0
            if code:
                self._send(code, {"error": {"message": f"scripted {code}"}}, {"Retry-After": "0"})
                return False
            return True

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._send(404, {"error": {"message": "no such route"}})
            elif self._gate():
                self._send(200, {"object": "list", "data": [{"id": "served-model", "object": "model"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path != "/v1/completions":
                self._send(404, {"error": {"message": "no such route"}})
                return
            if not self._gate():
                return
            if body["model"] != "served-model":
                self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist."}})
                return
            with state.lock:
                state.requests.append(body)
                state.in_flight += 1
                state.most_in_flight = max(state.most_in_flight, state.in_flight)
            time.sleep(state.delay)
            choices = []
            for i in range(body["n"]):
                words = [f"w{body['seed']}", f"c{i}", "end"]
                lp = {"tokens": words, "token_logprobs": [-0.5, -1.0, -1.5]} if state.logprobs else None
                choices.append({"index": i, "text": " ".join(words), "logprobs": lp, "finish_reason": "length"})
            with state.lock:
                state.in_flight -= 1
            self._send(200, {"choices": choices[::-1], "usage": {"completion_tokens": 3 * body["n"]}})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


def params(seed: int, n: int = 1, rp: float = 1.0) -> Params:
    return Params(n, 0.7, 0.9, rp, 0.0, 64, ("\n\n",), seed)


def engine(url: str, **kw: Any) -> OpenAIEngine:
    return OpenAIEngine(url, "served-model", sleep=lambda s: None, **kw)


def test_completions_carry_text_tokens_logprob_and_finish_reason(server: tuple[StandIn, str]) -> None:
    state, url = server
    outs = engine(url).generate(["a", "b"], [params(1, n=2), params(2, rp=1.2)])
    assert [[c.text for c in o] for o in outs] == [["w1 c0 end", "w1 c1 end"], ["w2 c0 end"]]  # choice order
    first = outs[0][0]
    assert (first.tokens, first.logprob, first.finish_reason) == (3, -3.0, "length")
    assert first.mean_logprob == pytest.approx(-1.0)
    by_seed = {r["seed"]: r for r in state.requests}
    assert by_seed[1]["prompt"] == "a" and by_seed[1]["stop"] == ["\n\n"] and by_seed[1]["logprobs"] == 0
    assert "repetition_penalty" not in by_seed[1] and by_seed[2]["repetition_penalty"] == 1.2


def test_no_logprobs_from_the_server_means_none(server: tuple[StandIn, str]) -> None:
    state, url = server
    state.logprobs = False
    (out,) = engine(url).generate(["a"], [params(1, n=1)])
    assert out[0].logprob is None and out[0].mean_logprob is None and out[0].tokens == 3


def test_requests_run_concurrently_but_bounded(server: tuple[StandIn, str]) -> None:
    state, url = server
    state.delay = 0.05
    outs = engine(url, max_concurrency=4).generate([f"p{i}" for i in range(16)], [params(i) for i in range(16)])
    assert [o[0].text.split()[0] for o in outs] == [f"w{i}" for i in range(16)]  # answers in prompt order
    assert 1 < state.most_in_flight <= 4


def test_429_and_5xx_are_retried(server: tuple[StandIn, str]) -> None:
    state, url = server
    eng = engine(url)
    state.fail = [429, 503, 500]
    (out,) = eng.generate(["a"], [params(7)])
    assert out[0].text == "w7 c0 end" and state.fail == []


def test_retries_give_up_with_a_message(server: tuple[StandIn, str]) -> None:
    state, url = server
    eng = engine(url, max_retries=2)
    state.fail = [503] * 5
    with pytest.raises(EndpointError, match=r"HTTP 503 scripted 503 \(gave up after 2 retries\)"):
        eng.generate(["a"], [params(7)])


def test_bad_key_is_one_clear_line(server: tuple[StandIn, str]) -> None:
    state, url = server
    state.key = "right"
    with pytest.raises(ModelError) as err:
        engine(url, api_key="wrong")
    msg = str(err.value)
    assert "HTTP 401" in msg and "apiKeySecret" in msg and "OPENAI_API_KEY" in msg and "\n" not in msg
    assert engine(url, api_key="right").generate(["a"], [params(1)])[0][0].text == "w1 c0 end"


def test_key_comes_from_the_environment(server: tuple[StandIn, str], monkeypatch: pytest.MonkeyPatch) -> None:
    state, url = server
    state.key = "from-env"
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert engine(url).generate(["a"], [params(1)])[0][0].text == "w1 c0 end"


def test_wrong_model_or_path_is_one_clear_line(server: tuple[StandIn, str]) -> None:
    _, url = server
    with pytest.raises(ModelError, match=r"serves served-model, not 'other'"):
        OpenAIEngine(url, "other")
    with pytest.raises(ModelError, match=r"HTTP 404.*ends with the API prefix such as /v1"):
        OpenAIEngine(url.removesuffix("/v1"), "served-model")
    eng = OpenAIEngine(url, "other", check=False)
    with pytest.raises(ModelError, match="The model `other` does not exist"):
        eng.generate(["a"], [params(1)])


def test_unreachable_server_is_retried_then_reported() -> None:
    with pytest.raises(EndpointError, match=r"127\.0\.0\.1:9/v1/models.*gave up after 1 retries"):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", max_retries=1, sleep=lambda s: None)


def _spec(endpoint: dict[str, Any] | None) -> api.GenerationRunSpec:
    model: dict[str, Any] = {"name": "served-model"}
    if endpoint is not None:
        model["endpoint"] = endpoint
    return api.parse_spec(
        {"model": model, "target": {"uniqueExamples": 10}, "output": {"path": "/out"}, "worker": {"gpus": 0}}
    )


def test_the_spec_selects_the_endpoint_engine(server: tuple[StandIn, str]) -> None:
    _, url = server
    spec = _spec({"url": url, "maxConcurrency": 3})
    eng = make_engine("vllm", spec, 0)  # a shard Job runs --engine vllm: the spec's endpoint wins
    assert isinstance(eng, OpenAIEngine) and (eng.model, eng.max_concurrency, eng.timeout) == ("served-model", 3, 300)
    with pytest.raises(ModelError, match=r"no spec\.model\.endpoint"):
        make_engine("endpoint", _spec(None), 0)


def test_endpoint_fields_are_checked_with_field_names() -> None:
    with pytest.raises(api.SpecError, match=r"spec\.model\.endpoint\.url"):
        _spec({"url": "ftp://x"})
    with pytest.raises(api.SpecError, match=r"spec\.model\.endpoint\.apiKeySecret"):
        _spec({"url": "http://x:8000/v1", "apiKeySecret": "Not_A/Secret"})
    with pytest.raises(api.SpecError, match=r"spec\.model\.endpoint\.url: is required"):
        _spec({"model": "m"})


def test_jobs_get_the_key_from_the_secret_by_reference() -> None:
    spec = _spec({"url": "http://vllm:8000/v1", "apiKeySecret": "inference-key"})
    env = {e["name"]: e for e in _env(spec, llm_key=True)}
    assert env["OPENAI_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "inference-key", "key": "OPENAI_API_KEY"}}
    assert "OPENAI_API_KEY" not in {e["name"] for e in _env(_spec({"url": "http://vllm:8000/v1"}), llm_key=True)}


def _job(tmp_path: Path, endpoint: dict[str, Any]) -> Path:
    raw = {
        "model": {"name": "served-model", "endpoint": endpoint},
        "target": {"uniqueExamples": 10},
        "output": {"path": str(tmp_path / "out")},
        "shards": {"examplesPerShard": 3},
        "worker": {"gpus": 0},
    }
    spec = api.parse_spec(raw)
    shard = make_round(spec, 1, 1, base_sampling(spec), {}, "").shards[0]
    path = tmp_path / "job.json"
    path.write_text(rec.to_json(rec.JobSpec("shard", "r", "default", raw, 1, shard)))
    return path


def test_worker_generate_through_the_endpoint(
    server: tuple[StandIn, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard Job (`genrun worker generate`) with spec.model.endpoint: rows from the server; a bad key is one line
    and the non-retriable model exit code; an unreachable server is one line and a retriable exit."""
    state, url = server
    assert worker_main(["generate", "--job", str(_job(tmp_path, {"url": url}))]) == errors.EXIT_OK
    assert state.requests and (tmp_path / "out" / rec.shard_manifest_key(1, 0)).exists()
    state.key = "right"
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    (tmp_path / "out").rename(tmp_path / "out1")
    assert worker_main(["generate", "--job", str(_job(tmp_path, {"url": url}))]) == errors.EXIT_MODEL
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HTTP 401" in err[0]
    monkeypatch.setattr("genrun.worker.openai_engine.time.sleep", lambda s: None)
    job = _job(tmp_path, {"url": "http://127.0.0.1:9/v1"})
    assert worker_main(["generate", "--job", str(job)]) == errors.EXIT_FAILED
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gave up after" in err[0]

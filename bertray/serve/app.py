"""The Ray Serve deployment: one model per replica, requests batched dynamically.

With batching on, `@serve.batch` collects the requests that arrive within `batch_wait_timeout_s`
of each other (at most `max_batch_size`) and their texts go through one call of the inner loop
(`bertray.predict.inference`: sorted by length, padding skipped), so under load a forward pass
carries many requests instead of one. The model runs on the replica's event loop, one batch at a
time: requests that arrive meanwhile wait in Serve's queue and all join the next batch. Running
it in a worker thread instead measured worse on CPU (requests then trickled in between the
GIL switches of a busy thread: batches of 1-2 at 32 concurrent clients, against up to 32 here).
With batching off each request is its own forward pass.

`build_app` is the application builder `serve deploy` / `serve run` import
(`bertray.serve.app:build_app`, with the settings as `args`, clusters/serve/predict.yaml).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ray import serve

from bertray.serve.api import PredictRequest, PredictResponse, build_api, check_request
from bertray.serve.settings import ServeSettings

DEPLOYMENT_NAME = "Predictor"


@dataclass
class Job:
    """One request's inputs, checked: its kind ("texts", "pairs", "question") and rows of texts."""

    kind: str
    rows: list[tuple[str, ...]]


@dataclass
class BatchStats:
    """Sizes of the batches a replica ran, as counts per size (what /stats returns)."""

    requests_per_batch: collections.Counter = field(default_factory=collections.Counter)
    sequences_per_forward: collections.Counter = field(default_factory=collections.Counter)
    requests: int = 0
    model_seconds: float = 0.0           # time spent in the inner loop: the replica's busy time

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "batches": sum(self.requests_per_batch.values()),
                "model_seconds": round(self.model_seconds, 4),
                "requests_per_batch": {str(k): v for k, v in sorted(self.requests_per_batch.items())},
                "sequences_per_forward": {str(k): v for k, v in sorted(self.sequences_per_forward.items())}}


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
@serve.ingress()
class Predictor:
    def __init__(self, settings: Mapping[str, Any]) -> None:
        from bertray.predict.model import load_model

        self.settings = ServeSettings.from_args(settings)
        self.loaded = load_model(self.settings.model, device=self.settings.device,
                                 max_seq_len=self.settings.max_seq_len, cache_dir=self.settings.cache_dir,
                                 threads=self.settings.threads)
        self.stats = BatchStats()
        self.run_batch.set_max_batch_size(self.settings.max_batch_size)
        self.run_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_api(self, self.settings)

    async def predict(self, request: PredictRequest) -> PredictResponse:
        kind, rows = check_request(request, self.settings, self.loaded.spec)
        job = Job(kind, rows)
        if self.settings.batching:
            predictions = await self.run_batch(job)
        else:
            predictions = self.compute([job])[0]
        return PredictResponse(predictions=predictions, model=self.settings.model)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def run_batch(self, jobs: list[Job]) -> list[list[dict]]:
        return self.compute(jobs)

    def compute(self, jobs: list[Job]) -> list[list[dict]]:
        """Predictions of every job (the JSON objects of the model's kind, `bertray.predict.outputs`),
        one inner-loop call per kind of input in the batch."""
        spec = self.loaded.spec
        out: list[list[dict] | None] = [None] * len(jobs)
        started = time.perf_counter()
        self.stats.requests += len(jobs)
        self.stats.requests_per_batch[len(jobs)] += 1
        for kind in ("texts", "pairs", "question"):
            chosen = [i for i, job in enumerate(jobs) if job.kind == kind]
            if not chosen:
                continue
            rows = [row for i in chosen for row in jobs[i].rows]
            columns = list(zip(*rows))
            sizes: list[int] = []
            result = spec.run(self.loaded, columns, batch_size=self.settings.forward_batch_size, batch_sizes=sizes)
            answers = spec.answers(self.loaded, result)
            for size in sizes:
                self.stats.sequences_per_forward[size] += 1
            at = 0
            for i in chosen:
                n = len(jobs[i].rows)
                out[i] = answers[at:at + n]
                at += n
        self.stats.model_seconds += time.perf_counter() - started
        return out

    def health(self) -> dict[str, Any]:
        health = {"status": "ok", "model": self.settings.model, "kind": self.loaded.kind,
                  "labels": list(self.loaded.labels), "batching": self.settings.batching}
        if self.loaded.threshold is not None:
            health["threshold"] = self.loaded.threshold
        return health

    def check_health(self) -> None:
        """Serve's periodic replica check: a replica without its model is restarted."""
        if self.loaded is None:
            raise RuntimeError("the model is not loaded")


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The application of the settings `args` (a Serve config's `args`, or `ServeSettings.to_args()`);
    invalid settings fail here, at deploy time, with the key named."""
    settings = ServeSettings.from_args(args)
    return Predictor.bind(settings.to_args())

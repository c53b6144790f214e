"""Prometheus metrics, one registry per application (no process-global state).

Request counts and latencies are measured in the API process, and so is its memory (the
process collector). Job counts by status, job durations, verdict counts and per-phase
durations are read from the database at scrape time, so they cover every worker process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import func, select

from app.models import JobStatus, Verification, as_utc
from app.runtime import Runtime

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
# findlady_core.report.VERDICTS and findlady_core.progress.PHASES, written out: the API's
# metrics must not import the core (torch) at scrape time
VERDICTS = ("match", "match_modified", "no_match", "inconclusive")
PHASES = ("load", "null", "resync", "integrity", "watermark", "write")


class _JobCollector:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Metric]:
        with self.runtime.sessions() as session:
            counts = dict(session.execute(select(Verification.status, func.count()).group_by(Verification.status)).all())
            rows = session.execute(
                select(Verification.status, Verification.started_at, Verification.finished_at)
                .where(Verification.finished_at.is_not(None), Verification.started_at.is_not(None))
                .order_by(Verification.finished_at.desc())
                .limit(10_000)
            ).all()
        jobs = GaugeMetricFamily("findlady_jobs", "Verification jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], float(counts.get(status, 0)))
        yield jobs
        hist = HistogramMetricFamily(
            "findlady_job_duration_seconds",
            "Duration of the last attempt of finished jobs (newest 10,000)",
            labels=["status"],
        )
        for status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            durations = [
                (as_utc(f) - as_utc(s)).total_seconds() for st, s, f in rows if st == status  # type: ignore[operator]
            ]
            buckets = [(str(b), float(sum(d <= b for d in durations))) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", float(len(durations))))
            hist.add_metric([status], buckets, sum_value=float(sum(durations)))
        yield hist
        yield from self._verdicts_and_phases()

    def _verdicts_and_phases(self) -> Iterator[Metric]:
        """Verdict counts and per-phase durations of succeeded jobs (columns copied from the
        report when it is stored: no report is read here)."""
        with self.runtime.sessions() as session:
            verdicts = dict(session.execute(select(Verification.verdict, func.count())
                                            .where(Verification.verdict.is_not(None))
                                            .group_by(Verification.verdict)).all())
            timings = list(session.scalars(select(Verification.timings).where(Verification.timings.is_not(None))
                                           .order_by(Verification.finished_at.desc()).limit(10_000)))
        counts = GaugeMetricFamily("findlady_verdicts", "Succeeded verification jobs by verdict", labels=["verdict"])
        for verdict in VERDICTS:
            counts.add_metric([verdict], float(verdicts.get(verdict, 0)))
        yield counts
        hist = HistogramMetricFamily("findlady_job_phase_duration_seconds",
                                     "Seconds per phase of succeeded jobs (newest 10,000; null: 0 when stored)",
                                     labels=["phase"])
        for phase in PHASES:
            seconds = [float(t[phase]) for t in timings if isinstance(t, dict) and isinstance(t.get(phase), (int, float))]
            if not seconds:
                continue
            buckets = [(str(b), float(sum(x <= b for x in seconds))) for b in PHASE_BUCKETS]
            buckets.append(("+Inf", float(len(seconds))))
            hist.add_metric([phase], buckets, sum_value=float(sum(seconds)))
        yield hist


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "findlady_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "findlady_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.registry.register(_JobCollector(runtime))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""What sites send into a running job: model requests, uploads, secure-aggregation messages, declines, evaluation
reports. Each is validated against the open round before it changes anything; a refusal changes no state."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from common import failpoints
from common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from common.metrics import ScoreHistogram
from common.proto.cohort.v1 import cohort_pb2 as pb
from common.serde import EncodedTensors, Limits, Spec, specs_from_manifest
from coordinator.config import JobConfig
from coordinator.round.aggregation import UpdateSpool, check_finite_file, l2_norm_file
from coordinator.round.job_state import ActiveRound, Evaluation
from coordinator.round.machine import Event, SiteLost, UploadAccepted
from coordinator.round.privacy import JobPrivacy
from coordinator.state.store import Store

MAX_SAMPLES = 1_000_000_000
MAX_METRICS = 32


class Intake:
    """Mixed into :class:`coordinator.round.runner.JobRunner`; these are the runner attributes it uses."""

    job_id: str
    spec: JobConfig
    store: Store
    limits: Limits
    privacy: JobPrivacy
    global_model: EncodedTensors
    global_specs: tuple[Spec, ...]
    _round: ActiveRound | None
    _eval: Evaluation | None
    _spawn: Callable[[Coroutine[Any, Any, None]], None]
    _apply: Callable[[ActiveRound, Event], Coroutine[Any, Any, None]]
    _apply_locked: Callable[[ActiveRound, Event], None]

    def model_for(self, job_id: str, version: str) -> EncodedTensors:
        if job_id != self.job_id:
            raise NotFound(f"job {job_id!r} is not the running job ({self.job_id})")
        if version != self.global_model.version:
            raise NotFound(
                f"model {version[:19]}... is not the current global model "
                f"({self.global_model.version[:19]}...); wait for the next task"
            )
        return self.global_model

    def _round_for(self, site: str, h: pb.UpdateHeader) -> ActiveRound:
        if h.job_id != self.job_id:
            raise FailedPrecondition(f"update is for job {h.job_id!r}, but the running job is {self.job_id!r}")
        rnd = self._round
        if rnd is None or rnd.number != h.round or rnd.attempt != h.attempt:
            current = f"round {rnd.number} attempt {rnd.attempt}" if rnd else "no round"
            raise FailedPrecondition(f"update is for round {h.round} attempt {h.attempt}, but {current} is open")
        if site not in rnd.state.cohort:
            raise PermissionDenied(f"site {site!r} is not in the cohort of round {rnd.number}")
        if h.base_model_version != rnd.base.version:
            raise FailedPrecondition("update was computed against another model version than this round's")
        return rnd

    def _check_header(self, rnd: ActiveRound, h: pb.UpdateHeader) -> tuple[Spec, ...]:
        specs = specs_from_manifest(h.manifest, self.limits)
        if rnd.secagg is not None:
            if not rnd.uploads_open:
                raise FailedPrecondition("masked inputs are taken once the keys are shared; wait for the shares")
            if specs != (rnd.secagg.masked_spec,):
                raise InvalidArgument(
                    f"this round uses secure aggregation: upload one tensor {rnd.secagg.masked_spec.name!r} of "
                    f"{rnd.secagg.masked_spec.shape[0]} bytes (uint8)"
                )
        elif specs != self.global_specs:
            expected = {s.name: s for s in self.global_specs}
            for s in specs:
                if s.name not in expected:
                    raise InvalidArgument(f"update has tensor {s.name!r}, which the model does not have")
                if s != expected[s.name]:
                    raise InvalidArgument(
                        f"tensor {s.name!r} has dtype/shape {s.dtype}/{list(s.shape)}; the model "
                        f"needs {expected[s.name].dtype}/{list(expected[s.name].shape)}"
                    )
            raise InvalidArgument("update tensors are missing or out of order compared with the model")
        if not 1 <= h.num_samples <= MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be between 1 and {MAX_SAMPLES}")
        if len(h.metrics) > MAX_METRICS or any(len(k) > 64 or not math.isfinite(v) for k, v in h.metrics.items()):
            raise InvalidArgument(f"metrics: at most {MAX_METRICS} finite values with names of 64 characters or less")
        if not math.isfinite(h.train_seconds) or h.train_seconds < 0:
            raise InvalidArgument("train_seconds must be a finite, non-negative number")
        return specs

    async def receive_upload(
        self, site: str, header: pb.UpdateHeader, chunks: AsyncIterator[pb.UpdateChunk]
    ) -> pb.UploadReply:
        rnd = self._round_for(site, header)
        specs = self._check_header(rnd, header)
        previous = rnd.accepted.get(site)
        if previous is not None:
            if previous == header.manifest.sha256:
                return pb.UploadReply(accepted=True, duplicate=True, update_sha256=previous)
            raise AlreadyExists(f"site {site!r} already uploaded a different update for round {rnd.number}")
        refusal = rnd.state.refusal(site)
        if refusal is not None:
            raise FailedPrecondition(refusal)
        if site in rnd.in_flight:
            raise FailedPrecondition(f"an upload from site {site!r} for this round is already in progress")
        rnd.in_flight.add(site)
        spool = UpdateSpool(
            rnd.spool_dir / f"{site}.update",
            specs,
            header.manifest.total_bytes,
            header.manifest.sha256,
            self.limits.max_chunk_bytes,
        )
        try:
            async for msg in chunks:
                if msg.WhichOneof("kind") != "data":
                    raise InvalidArgument("only data chunks may follow the upload header")
                if not rnd.state.open:
                    raise FailedPrecondition(f"round {rnd.number} closed while this upload was in flight")
                spool.write(msg.data)
            if not rnd.state.open:
                raise FailedPrecondition(f"round {rnd.number} closed while this upload was in flight")
            path = spool.finish()
        except BaseException:
            spool.discard()
            raise
        finally:
            rnd.in_flight.discard(site)
        try:
            if rnd.secagg is None:
                await asyncio.to_thread(check_finite_file, path)
            if rnd.secagg is None and self.privacy.site_level:
                norm = await asyncio.to_thread(l2_norm_file, path)
                bound = rnd.task.privacy.clip_norm
                if norm > bound * (1 + 1e-4):
                    raise InvalidArgument(f"update L2 norm {norm:.6g} exceeds the job's clip norm {bound:g}")
            async with rnd.lock:
                refusal = rnd.state.refusal(site)
                if refusal is not None:
                    raise FailedPrecondition(refusal)
                if rnd.secagg is not None:
                    await asyncio.to_thread(rnd.secagg.fold_masked_file, site, path)
                # A plaintext update stays in the spool, verified, and is folded when the round closes (job._fold).
                self.store.record_upload(
                    self.job_id,
                    rnd.number,
                    rnd.attempt,
                    site,
                    sha256=header.manifest.sha256,
                    num_samples=header.num_samples,
                    metrics=dict(header.metrics),
                    train_seconds=header.train_seconds,
                )
                self._accepted(rnd, site, header.manifest.sha256, header.num_samples, dict(header.metrics))
                self._apply_locked(rnd, UploadAccepted(site))
                failpoints.hit("coordinator.upload_accepted", round=rnd.number)
        except BaseException:
            if site not in rnd.accepted:
                path.unlink(missing_ok=True)
            raise
        return pb.UploadReply(accepted=True, duplicate=False, update_sha256=header.manifest.sha256)

    def _accepted(self, rnd: ActiveRound, site: str, sha256: str, num_samples: int, metrics: dict[str, float]) -> None:
        """Book an accepted upload into the open round (also used when a restart takes one back from the spool)."""
        rnd.accepted[site] = sha256
        # DP-FedAvg weighs every site the same; plain FedAvg by sample count.
        rnd.weights[site] = 1.0 if self.privacy.site_level else float(num_samples)
        if "clip_bit" in metrics:
            rnd.clip_bits.append(1 if metrics["clip_bit"] > 0 else -1)
        if "dp_epsilon" in metrics:
            self.privacy.record_site(site, metrics["dp_epsilon"])
        if "loss" in metrics:
            rnd.loss_sum += metrics["loss"] * num_samples
            rnd.weight_sum += num_samples

    def receive_decline(self, site: str, req: pb.DeclineRequest) -> None:
        rnd = self._round
        if rnd is None or rnd.number != req.round or rnd.attempt != req.attempt:
            raise FailedPrecondition(f"round {req.round} attempt {req.attempt} is not open")
        if site not in rnd.state.cohort:
            raise PermissionDenied(f"site {site!r} is not in the cohort of round {rnd.number}")
        self.store.audit("site_declined", site, job_id=self.job_id, round=rnd.number, reason=req.reason[:500])
        self._spawn(self._apply(rnd, SiteLost(site)))
        if rnd.secagg is not None:
            rnd.secagg.site_lost(site)

    def receive_secagg(self, site: str, msg: pb.SecAggMessage) -> None:
        rnd = self._round
        if rnd is None or rnd.secagg is None:
            raise FailedPrecondition("no secure-aggregation round is open")
        try:
            rnd.secagg.receive(site, msg)
        except Exception as exc:
            self.store.audit("secagg_refused", site, job_id=self.job_id, round=rnd.number, reason=str(exc)[:500])
            raise
        if msg.WhichOneof("stage") == "abort_reason":
            self.store.audit(
                "secagg_site_abort", site, job_id=self.job_id, round=rnd.number, reason=msg.abort_reason[:500]
            )

    def receive_evaluation(self, site: str, report: pb.EvaluationReport) -> None:
        if report.job_id != self.job_id:
            raise FailedPrecondition(f"report is for job {report.job_id!r}, the running job is {self.job_id!r}")
        ev = self._eval
        if ev is None or ev.number != report.round or ev.split != report.split:
            raise FailedPrecondition("no evaluation of that round and split is open")
        if report.model_version != ev.version:
            raise FailedPrecondition("report is for another model version than the one being evaluated")
        if site in ev.reports:
            raise AlreadyExists(f"site {site!r} already reported this evaluation")
        if site not in ev.expected:
            raise PermissionDenied(f"site {site!r} was not asked for this evaluation")
        values = (report.loss, report.accuracy, report.eval_seconds)
        if not all(math.isfinite(v) for v in values) or not 0 <= report.accuracy <= 1:
            raise InvalidArgument("loss, accuracy and eval_seconds must be finite; accuracy within [0, 1]")
        if report.num_samples > MAX_SAMPLES:
            raise InvalidArgument(f"num_samples must be at most {MAX_SAMPLES}")
        scores = None
        if report.score_histogram:
            scores = ScoreHistogram.from_flat(report.score_histogram)
            if sum(scores.flat()) != report.num_samples:
                raise InvalidArgument("the score histogram must count every evaluated record exactly once")
        self.store.record_evaluation(
            self.job_id,
            report.round,
            report.split,
            site,
            report.model_version,
            report.num_samples,
            report.loss,
            report.accuracy,
        )
        ev.reports[site] = (report.num_samples, report.loss, report.accuracy)
        if scores is not None:
            ev.add_scores(scores)
        ev.check_done()

"""One way to ask for a plan: ``plan(request) -> Plan``, over the memory engine (``memory/``).

What is asked decides which planner answers:

========================  ===============================================  ==========================
request                   asks                                             answers with
========================  ===============================================  ==========================
:class:`ModelRequest`     training a model spec on an input spec           ``planner.PlanResult``
:class:`RunRequest`       the training run a ``TrainConfig`` describes     ``planner.PlanResult``
:class:`PipelineRequest`  every stage of a pipeline or study               ``pipeline.PipelineResult``
:class:`InferenceRequest` a forward-only pass                              ``inference.InferencePlan``
:class:`DistributedRequest` a step shared by several devices (per rank)    ``distributed.DistributedPlan``
:class:`BatchSizeRequest` the largest batch that fits, confirmed by steps  ``search.BatchSizeResult``
                          (``inference=True``: by forward passes)          (``InferenceBatchSearch``)
========================  ===============================================  ==========================

``options`` are the keyword arguments of the planner that answers (documented there), so a
request names what is planned and the options how.

Example:
    >>> from tightfit.plan import ModelRequest, plan
    >>> result = plan(ModelRequest("builtin:digits-cnn", "1x8x8", {"batch_size": 32}))

``plan/`` imports neither ``study/`` nor ``training/``: a study hands :func:`plan` a
:class:`PipelineRequest` (its stages as a ``PipelineConfig``), the trainer a :class:`RunRequest`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelRequest:
    """Training ``model`` (a spec such as ``builtin:digits-cnn``) on ``inputs`` (``1x8x8``, ``tokens:512``)."""

    model: str
    inputs: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunRequest:
    """The run a ``TrainConfig`` describes; ``options``: ``device``, ``memory``, ``margin``, ``measure``."""

    config: Any
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineRequest:
    """Every stage of a pipeline (``plan.pipeline.PipelineConfig``; a study builds one from its stages)."""

    config: Any
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class InferenceRequest:
    """A forward-only pass of ``model`` on ``inputs``."""

    model: str
    inputs: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DistributedRequest:
    """A training step shared by ``options["devices"]`` devices of one kind: each rank's peak."""

    model: str
    inputs: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchSizeRequest:
    """The largest batch of ``model`` (a built module) whose step fits, found by real steps;
    ``batch_factory(batch_size, device)`` makes a batch. ``inference``: forward passes only."""

    model: Any
    batch_factory: Callable[[int, Any], Any]
    inference: bool = False
    options: dict[str, Any] = field(default_factory=dict)


Request = ModelRequest | RunRequest | PipelineRequest | InferenceRequest | DistributedRequest | BatchSizeRequest
Plan = Any  # PlanResult, PipelineResult, InferencePlan, DistributedPlan, BatchSizeResult or InferenceBatchSearch


def plan(request: Request) -> Plan:
    """Answer ``request`` with the planner for its kind (see the module's table).

    Raises:
        ConfigError: a bad option, naming it (from the planner that answers).
        TypeError: ``request`` is not one of the request types.
    """
    if isinstance(request, ModelRequest):
        from tightfit.plan.planner import plan as plan_model

        return plan_model(request.model, request.inputs, **request.options)
    if isinstance(request, RunRequest):
        from tightfit.plan.run_plan import plan_run

        return plan_run(request.config, **request.options)
    if isinstance(request, PipelineRequest):
        from tightfit.plan.pipeline import plan_pipeline

        return plan_pipeline(request.config, **request.options)
    if isinstance(request, InferenceRequest):
        from tightfit.plan.inference import plan_inference

        return plan_inference(request.model, request.inputs, **request.options)
    if isinstance(request, DistributedRequest):
        from tightfit.plan.distributed import plan_distributed

        return plan_distributed(request.model, request.inputs, **request.options)
    if isinstance(request, BatchSizeRequest):
        if request.inference:
            from tightfit.plan.inference import find_inference_batch_size

            return find_inference_batch_size(request.model, request.batch_factory, **request.options)
        from tightfit.plan.search import find_batch_size

        return find_batch_size(request.model, request.batch_factory, **request.options)
    raise TypeError(f"plan: {type(request).__name__} is not a plan request (ModelRequest, RunRequest, ...)")

"""What every flow does first: route our log lines to the run, and settle what a crashed earlier
attempt of the same run left behind."""

from __future__ import annotations

import logging

from tasks.logs import route_stage_logs

log = logging.getLogger(__name__)


def begin_flow_run() -> None:
    """Call first thing in every flow. On a retried run (a Crashed run retried after its worker
    died), the task runs and subflow runs of the dead attempt still read Running: they are marked
    Crashed, so the UI shows what happened and nothing waits on them."""
    route_stage_logs()
    from prefect.runtime import flow_run

    if not flow_run.get_id() or (flow_run.get_run_count() or 0) <= 1:
        return
    try:
        settled = settle_dead_attempt(flow_run.get_id())
    except Exception as e:  # noqa: BLE001  (tidying the UI must never fail the run)
        log.warning("could not settle the earlier attempt's runs: %s", e)
        return
    if settled:
        log.info("marked %d task/subflow run(s) of the crashed earlier attempt Crashed", settled)


def settle_dead_attempt(flow_run_id: str) -> int:
    """Mark every non-final task run and subflow run under ``flow_run_id`` Crashed (call before
    the new attempt starts any); returns how many."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.states import Crashed

    message = "its attempt's process died (the run was retried)"
    count = 0
    with get_client(sync_client=True) as client:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children if c.id not in ids]
            ids += frontier
            for child in children:
                if child.state and not child.state.is_final():
                    client.set_flow_run_state(child.id, Crashed(message=message), force=True)
                    count += 1
        for task in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=200):
            if task.state and not task.state.is_final():
                client.set_task_run_state(task.id, Crashed(message=message), force=True)
                count += 1
    return count

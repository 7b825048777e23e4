"""Before any data is prepared or any slice requested: can every node read the run
directory and the model where the driver does? One small task per live node answers;
hosts that join later (an autoscaled slice) check the same at their worker's start."""

from __future__ import annotations

import ray

from raysft.storage.credentials import Credentials
from raysft.storage.shared_storage import what_this_host_misses

ANSWER_TIMEOUT_S = 300


def check_every_node(marker: tuple[str, str], model: str) -> None:
    """Raises ValueError with the first node's one-line problem."""
    from ray.exceptions import NodeDiedError, TaskUnschedulableError, WorkerCrashedError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:  # the driver's own node: it has just written the marker
        return
    credentials = Credentials.of_driver()
    look = ray.remote(num_cpus=0, max_retries=0)(credentials.around(what_this_host_misses))
    answers = [
        look.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            runtime_env=credentials.runtime_env(),
        ).remote(marker, model)
        for node in nodes
    ]
    ready, pending = ray.wait(answers, num_returns=len(answers), timeout=ANSWER_TIMEOUT_S)
    if pending:
        print(f"raysft: warning: not every node answered the storage check in {ANSWER_TIMEOUT_S} s; "
              "each worker checks again when it starts")
    for answer in ready:
        try:
            problem = ray.get(answer)
        except (TaskUnschedulableError, NodeDiedError, WorkerCrashedError):
            continue  # the autoscaler removed the node meanwhile: it runs nothing of this run
        if problem:
            raise ValueError(problem)

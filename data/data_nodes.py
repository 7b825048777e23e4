"""Which nodes prepare data: by default every node but TPU hosts. A TPU host's CPUs feed
its chips; data work there would also make the autoscaler bring a whole slice up before
training needs it. Ray labels TPU hosts with their pod type, and a CPU node has no such
label, which a not-in selector matches (for the scheduler and the autoscaler alike)."""

from __future__ import annotations

import ray

TPU_POD_LABEL = "ray.io/tpu-pod-type"


def off_tpu_hosts(pod_types: list[str] = ()) -> dict[str, str] | None:
    """A label selector for the nodes that are not TPU hosts of the pod types the cluster
    has now or the run will ask for (`pod_types`, e.g. ["v4-16"]); None without any."""
    labelled = {node.get("Labels", {}).get(TPU_POD_LABEL) for node in ray.nodes() if node["Alive"]}
    pods = sorted((labelled - {None}) | set(pod_types))
    return {TPU_POD_LABEL: f"!in({','.join(pods)})"} if pods else None


def cpus_matching(selector: dict[str, str] | None) -> float:
    """CPUs of the live nodes `selector` lets data work run on."""
    if not selector:
        return ray.cluster_resources().get("CPU", 0)
    excluded = set(selector[TPU_POD_LABEL].removeprefix("!in(").removesuffix(")").split(","))
    return sum(
        node["Resources"].get("CPU", 0) for node in ray.nodes()
        if node["Alive"] and node.get("Labels", {}).get(TPU_POD_LABEL) not in excluded
    )


def task_options(selector: dict[str, str] | None) -> dict:
    """Options for the preparation's own tasks (Ray Data's take the context's selector)."""
    return {"label_selector": selector} if selector else {}

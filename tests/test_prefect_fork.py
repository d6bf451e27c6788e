"""Processes forked after Prefect's services started (a train stage's DataLoader workers under
`visionflow run`) exit cleanly.

Prefect 3.8's log and event services register a drain with threading's exit hooks; a forked
child inherits the hook, not the service, and the drain fails an assertion as the child exits
(exit code 1; on the main thread torch then reports "DataLoader worker exited unexpectedly").
visionflow.integrations.prefect drops the inherited hooks in forked children. Each case runs in a
fresh interpreter with a real Prefect queue service started, as the flow's are."""
import subprocess
import sys

SCRIPT = """
import multiprocessing as mp, sys, time
if sys.argv[1] == "with-visionflow":
    import visionflow.integrations.prefect  # noqa: F401  (registers the after-fork hook)
from prefect._internal.concurrency.services import QueueService

class Echo(QueueService[int]):
    async def _handle(self, item):
        pass

Echo.instance().send(1)  # started on Prefect's global loop, its drain registered for exit
time.sleep(0.2)
if sys.argv[2] == "process":
    p = mp.get_context("fork").Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    print("exit code", p.exitcode)
else:  # a DataLoader with two workers, iterated to the end on the main thread (SIGCHLD watched)
    import torch
    loader = torch.utils.data.DataLoader(list(range(16)), batch_size=4, num_workers=2)
    print("batches", len(list(loader)))
"""


def _run(mode: str, case: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode, case], capture_output=True, text=True, timeout=300)


def test_a_process_forked_after_a_prefect_service_started_exits_with_0():
    out = _run("with-visionflow", "process")
    assert out.returncode == 0 and "exit code 0" in out.stdout, out.stdout + out.stderr[-3000:]
    # without the hook, Prefect's inherited drain fails in the child: what the hook is for
    bare = _run("prefect-only", "process")
    assert "exit code 1" in bare.stdout, ("the child exited cleanly without visionflow's hook: Prefect fixed its "
                                          "after-fork drain, and _no_inherited_service_drains can go\n"
                                          + bare.stdout + bare.stderr[-3000:])


def test_dataloader_workers_forked_after_a_prefect_service_started_finish_without_error():
    out = _run("with-visionflow", "loader")
    assert out.returncode == 0 and "batches 4" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "exited unexpectedly" not in out.stderr, out.stderr[-3000:]

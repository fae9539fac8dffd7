"""A sweep on a Ray cluster of separate hosts with no shared folder, one host lost mid-trial.

The hosts are network namespaces on this machine, joined by a bridge on 10.200.0.0/24 (the
addresses exist inside the namespaces only): a Ray head (no CPUs, so trials run on workers)
in lenetlab-head, where the driver runs too, and worker nodes in lenetlab-worker and then
lenetlab-worker2, each in its own mount namespace where the run folder's parent is an empty
tmpfs (the run folder's path does not exist there) and its own hostname. The test kills the
first worker's raylet once the long trial's first checkpoint has come back into the run
folder, then starts the second worker; the sweep must finish with each trial recorded once,
the long trial resumed from its checkpoint on the new host, and metrics.csv equal to the
local pool's for the same spec.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and Ray; skipped with the reason otherwise.
Run it with: python -m pytest -m hosts
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, lenetlab, metrics_text, strict_json

from lenetlab.records import TrainedOn

pytestmark = [pytest.mark.hosts, pytest.mark.ray, pytest.mark.slow]

HEAD, WORKERS = "lenetlab-head", ("lenetlab-worker", "lenetlab-worker2")
HEAD_IP, WORKER_IPS = "10.200.0.1", ("10.200.0.2", "10.200.0.3")
PORT = 6379
LONG_EPOCHS = 16

SPEC = f"""
name = "hosts"
seeds = 1
variant = "baseline"
[[configs]]
name = "long"
epochs = {LONG_EPOCHS}
[[configs]]
name = "short"
epochs = 1
"""
ARGS = ["--train-subset", "1000", "--threads", "1", "--workers", "1", "--quiet"]

# Ray notices a dead node by health checks from the head: every second, dead after 2 misses of
# 1 s (Ray's defaults: every 3 s, 5 misses of 10 s, about half a minute).
HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
          "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "2"}
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)


def netns_pids(ns: str) -> list[int]:
    done = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def remove_namespaces() -> None:
    """Kill every process in the test's namespaces (they were all started here), then delete them."""
    for ns in (HEAD, *WORKERS):
        for _ in range(50):
            pids = netns_pids(ns)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def hosts():
    """The namespaces and their bridge; on teardown, every process in them killed and the
    namespaces deleted, whatever happened."""
    missing = [tool for tool in ("ip", "unshare", "nsenter") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} command here: the hosts test makes namespaces with them")
    pytest.importorskip("ray")
    private = sh("unshare", "--mount", "--uts", "true", check=False)
    if private.returncode != 0:
        pytest.skip(f"cannot make mount namespaces here (unshare: {private.stderr.strip()}); "
                    f"the hosts test needs root or CAP_SYS_ADMIN")
    remove_namespaces()  # what a killed earlier run may have left
    made = sh("ip", "netns", "add", HEAD, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make network namespaces here (ip netns add: {made.stderr.strip()}); "
                    f"the hosts test needs root or CAP_NET_ADMIN")
    temp = Path(tempfile.mkdtemp(prefix="lnl-", dir="/tmp"))  # short: Ray's socket paths have a limit
    try:
        try:
            network()
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot make the hosts' network here ({' '.join(exc.cmd)}: {exc.stderr.strip()})")
        yield temp
    finally:
        remove_namespaces()
        shutil.rmtree(temp, ignore_errors=True)


def network() -> None:
    """A bridge in the head's namespace, a veth pair from it into each worker's: 10.200.0.0/24."""
    sh("ip", "-n", HEAD, "link", "set", "lo", "up")
    sh("ip", "-n", HEAD, "link", "add", "lnlbr0", "type", "bridge")
    sh("ip", "-n", HEAD, "addr", "add", f"{HEAD_IP}/24", "dev", "lnlbr0")
    sh("ip", "-n", HEAD, "link", "set", "lnlbr0", "up")
    # Ray finds its node's address by the route to a public one; no packet leaves the bridge.
    sh("ip", "-n", HEAD, "route", "add", "default", "dev", "lnlbr0")
    for i, (ns, ip) in enumerate(zip(WORKERS, WORKER_IPS)):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", HEAD, "link", "add", f"lnlw{i}", "type", "veth",
           "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", HEAD, "link", "set", f"lnlw{i}", "master", "lnlbr0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", HEAD_IP)


def ray_start(ns: str, temp: Path, *args: str, hidden: Path | None = None,
              hostname: str | None = None) -> None:
    """`ray start ARGS` as a host in namespace ns: with hidden, in a mount namespace of its own
    where hidden is an empty tmpfs; with hostname, under that name."""
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", *args, "--temp-dir", str(temp),
           "--object-store-memory", "200000000", "--disable-usage-stats"]
    cmd = ["ip", "netns", "exec", ns]
    if hidden is not None:
        script = (f"hostname {hostname} && mount -t tmpfs lenetlab-hidden {hidden} && exec \"$@\"")
        cmd += ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script, "sh"]
    done = subprocess.run([*cmd, *ray], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **RAY_ENV, **HEALTH})
    assert done.returncode == 0, done.stdout + done.stderr


def raylet(ns: str) -> int:
    found = [pid for pid in netns_pids(ns) if command_name(pid) == "raylet"]
    assert len(found) == 1, found
    return found[0]


def wait_until(condition, what: str, process: subprocess.Popen, timeout: float) -> float:
    """The time condition() first held; fails if process ends first or after timeout s."""
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended (exit {process.returncode}) before {what}:\n{out}\n{err}")
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)
    return time.time()


def node_death_logged(temp: Path) -> bool:
    """Whether the head's GCS has marked a node dead (as its log says: "... has been marked dead
    because the detector has missed too many heartbeats from it")."""
    return any("has been marked dead" in log.read_text(errors="replace")
               for log in temp.glob("head/session_*/logs/gcs_server.out"))


def test_a_sweep_survives_a_lost_host_without_a_shared_folder(hosts, tmp_path, data_dir):
    temp = hosts
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    out = tmp_path / "runs"  # hidden on the workers: an empty tmpfs there
    out.mkdir()
    run = out / "hosts"
    t0 = time.time()
    ray_start(HEAD, temp / "head", "--head", "--node-ip-address", HEAD_IP, "--port", str(PORT),
              "--num-cpus", "0", "--include-dashboard", "false")
    ray_start(WORKERS[0], temp / "w1", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address", WORKER_IPS[0],
              "--num-cpus", "1", hidden=out, hostname=WORKERS[0])
    cluster_s = time.time() - t0

    driver = subprocess.Popen(
        ["ip", "netns", "exec", HEAD, sys.executable, "-m", "lenetlab", "sweep", str(spec), *ARGS,
         "--engine", "ray", "--address", f"{HEAD_IP}:{PORT}", "--ray-retries", "2", "--out", str(out),
         "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV})
    try:
        checkpoint = run / "checkpoints" / "long__seed0.pt"
        first = wait_until(checkpoint.is_file, "the long trial's first checkpoint", driver, 180)
        # The worker does not see the run folder: the checkpoint came back through the sink.
        victim = raylet(WORKERS[0])
        seen = sh("nsenter", "-t", str(victim), "-m", "test", "-e", str(run), check=False)
        assert seen.returncode == 1, "the worker host sees the run folder"
        os.kill(victim, signal.SIGKILL)
        killed = time.time()
        import torch

        # The epoch the retry resumes from (or one before, if a last save was on its way).
        at_kill = torch.load(checkpoint, weights_only=True)["epoch"]
        assert at_kill < LONG_EPOCHS
        noticed = wait_until(lambda: node_death_logged(temp), "the dead node noticed by the head", driver, 60)
        ray_start(WORKERS[1], temp / "w2", "--address", f"{HEAD_IP}:{PORT}", "--node-ip-address",
                  WORKER_IPS[1], "--num-cpus", "1", hidden=out, hostname=WORKERS[1])
        joined = time.time()
        stdout, stderr = driver.communicate(timeout=240)
        finished = time.time()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.communicate()
    assert driver.returncode == 0, stdout + stderr

    # Each trial recorded once, done, by this run, the long one on the new host, resumed.
    plan = strict_json(run / "run.json")
    records = sorted((run / "trials").iterdir())
    assert [p.name for p in records] == ["long__seed0.json", "short__seed0.json"]
    results = {p.stem: strict_json(p) for p in records}
    for result in results.values():
        assert result["status"] == "done" and result["run_id"] == plan["run_id"]
        assert result["trained_on"]["host"] in WORKERS
    long = results["long__seed0"]
    assert long["trained_on"]["host"] == WORKERS[1]
    resumed_from = LONG_EPOCHS - len(long["epoch_threads"])  # epochs the lost host trained
    assert 1 <= resumed_from <= at_kill + 1, (resumed_from, at_kill)
    assert len(long["history"]) == 3 * LONG_EPOCHS
    sidecar = strict_json((run / long["weights"]).with_suffix(".json"))
    assert sidecar["machine"]["host"] == WORKERS[1]  # the trainer's, not the driver's
    assert sidecar["build"] == TrainedOn(**long["trained_on"]).build
    assert not list((run / "checkpoints").iterdir()), "checkpoints left after the trials finished"
    assert not (run / ".run-id").exists()
    summary = strict_json(run / "summary.json")
    assert all(len(c["builds"]) == 1 for c in summary["configs"])

    # The same numbers as the local pool's, for the same spec.
    local = lenetlab("sweep", spec, *ARGS, "--out", tmp_path / "local", "--data-dir", data_dir)
    assert local.returncode == 0, local.stderr
    assert metrics_text(tmp_path / "local" / "hosts") == metrics_text(run)

    print(json.dumps({"cluster_start_s": round(cluster_s, 1),
                      "first_checkpoint_s": round(first - t0, 1),
                      "resumed_from_epoch": resumed_from,
                      "dead_node_noticed_s": round(noticed - killed, 1),
                      "new_worker_joined_s": round(joined - killed, 1),
                      "finished_after_kill_s": round(finished - killed, 1)}))

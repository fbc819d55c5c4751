"""adb target: command construction, parsing of recorded outputs, and fault mapping.

The device is a fake ``adb`` executable placed first on PATH: it replays recorded outputs
from ``tests/data/bench/`` (see its README) and logs the argv it was called with. Our code
runs unchanged against it.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys

import pytest

from mobile_sd.bench import errors as E
from mobile_sd.bench.transports import adb_output as out
from mobile_sd.bench.transports.adb import PROPS, AdbTransport
from mobile_sd.bench.transports.executor_runner import executor_runner_argv

from tests.helpers.paths import DATA as _DATA  # noqa: E402
from tests.helpers import manifests

DATA = _DATA / "bench"
SERIAL = "R5CT32ABCDE"
WORK = "/data/local/tmp/mobile-sd"

FAKE_ADB = f"""#!{sys.executable} -S
import json, os, shutil, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as log:
    log.write(json.dumps(argv) + "\\n")
joined = " ".join(argv)
rule = next((r for r in json.load(open(os.environ["FAKE_ADB_SCENARIO"]))
             if r["match"] in joined), {{}})
data = os.environ["FAKE_ADB_DATA"]
for stream, key in ((sys.stdout, "stdout"), (sys.stderr, "stderr")):
    if rule.get(key + "_file"):
        stream.write(open(os.path.join(data, rule[key + "_file"])).read())
    stream.write(rule.get(key, ""))
    stream.flush()
time.sleep(rule.get("sleep", 0))
if rule.get("pull_file"):
    shutil.copyfile(os.path.join(data, rule["pull_file"]), argv[-1])
if "remote_rc" in rule:
    print("__MOBILE_SD_RC=%d" % rule["remote_rc"], flush=True)
sys.exit(rule.get("rc", 0))
"""

BASE_RULES = [
    {"match": "devices -l", "stdout_file": "adb_devices_l.txt"},
    *({"match": f"shell getprop {key}", "stdout_file": f"getprop/{key}.txt"}
      for key in PROPS.values()),
    {"match": "shell df", "stdout_file": "df_toybox.txt"},
    {"match": "toybox time -v true", "stderr_file": "toybox_time_v.txt"},
    {"match": "executor_runner --model_path", "remote_rc": 0,
     "stdout_file": "executor_runner_per_iteration.stdout",
     "stderr_file": "executor_runner_per_iteration.stderr"},
    {"match": " pull ", "pull_file": "tiny_xnnpack.etdp"},
]


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """Install the fake adb; returns (set_rules(extra, replace=False), read_log())."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "adb"
    script.write_text(FAKE_ADB)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    log, scenario = tmp_path / "adb.log", tmp_path / "scenario.json"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_SCENARIO", str(scenario))
    monkeypatch.setenv("FAKE_ADB_DATA", str(DATA))

    def set_rules(extra=(), drop=()):
        rules = [r for r in BASE_RULES if r["match"] not in drop]
        scenario.write_text(json.dumps(list(extra) + rules))

    def read_log():
        return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

    set_rules()
    return set_rules, read_log


@pytest.fixture
def pte_folder(tmp_path):
    """An export folder with two .pte components (bytes only: the fake device never runs them)."""
    folder = tmp_path / "export"
    folder.mkdir()
    comps = {}
    for name, shape in (("unet", [2, 4, 64, 64]), ("decoder", [1, 4, 64, 64])):
        path = folder / f"{name}.pte"
        path.write_bytes(b"PTE-" + name.encode())
        comps[name] = {"files": [{"path": path.name, "format": "pte", "backend": "xnnpack",
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}],
                       "inputs": [{"name": "x", "shape": shape, "dtype": "float32"}]}
    manifests.write(folder, {"recipe": {"name": "xnnpack-fp32"}, "components": comps,
                             "pipeline": {"steps": 8, "cfg": "batch2"}})
    runner = tmp_path / "executor_runner"
    # gflags keeps flag names as strings in the binary; the driver looks for them.
    runner.write_bytes(b"\x7fELF...model_path\x00num_executions\x00etdump_path\x00cpu_threads")
    return folder, runner


# ----------------------------------------------------------------------------- parsing
def test_parse_devices_l():
    rows = out.parse_devices((DATA / "adb_devices_l.txt").read_text())
    assert [(r["serial"], r["state"]) for r in rows] == [
        (SERIAL, "device"), ("emulator-5554", "offline"), ("0A261FDD4000X9", "unauthorized")]
    assert rows[0]["model"] == "SM_S918B" and rows[0]["transport_id"] == "3"
    assert out.parse_devices((DATA / "adb_devices_l_empty.txt").read_text()) == []


def test_parse_df_formats():
    assert out.parse_df_free_bytes((DATA / "df_toybox.txt").read_text()) == 135433744 * 1024
    assert out.parse_df_free_bytes((DATA / "df_toybox_full.txt").read_text()) == 2048 * 1024
    assert out.parse_df_free_bytes((DATA / "df_toolbox.txt").read_text()) == int(13.4 * 2**30)


def test_parse_executor_runner_outputs():
    new = out.parse_executor_runner((DATA / "executor_runner_per_iteration.stderr").read_text())
    assert new["load_ms"] == pytest.approx(1017.941)
    assert len(new["iteration_ms"]) == 12 and new["iteration_ms"][0] == pytest.approx(388.39)
    assert (new["num_executions"], new["total_ms"]) == (12, pytest.approx(4012.554))
    assert new["peak_rss_mb"] == pytest.approx(1185612 / 1024)
    old = out.parse_executor_runner((DATA / "executor_runner_total_only.stderr").read_text())
    assert old["iteration_ms"] == [] and old["load_ms"] is None
    assert (old["num_executions"], old["total_ms"]) == (12, pytest.approx(4096.332))


# ----------------------------------------------------------------------------- commands
def test_argv_construction():
    t = AdbTransport(SERIAL)
    assert t.adb_argv("push", "a.pte", f"{WORK}/a.pte") == [
        "adb", "-s", SERIAL, "push", "a.pte", f"{WORK}/a.pte"]
    assert t.shell_argv("getprop ro.product.model") == [
        "adb", "-s", SERIAL, "shell", "getprop ro.product.model"]
    assert executor_runner_argv(f"{WORK}/executor_runner", f"{WORK}/unet.pte", 12,
                                etdump=f"{WORK}/unet.etdp", threads=4) == [
        f"{WORK}/executor_runner", "--model_path", f"{WORK}/unet.pte",
        "--num_executions", "12", "--etdump_path", f"{WORK}/unet.etdp", "--cpu_threads", "4"]


def test_full_run_commands_and_result(fake_adb, pte_folder, tmp_path):
    from mobile_sd.bench import run_bench

    set_rules, read_log = fake_adb
    folder, runner = pte_folder
    results = run_bench(folder, f"adb:{SERIAL}", 2, 10, tmp_path / "bench", runner)
    unet = results[0]
    assert unet["status"] == "ok" and unet["stats"]["n"] == 10
    assert unet["warmup_ms"] == pytest.approx([388.39, 331.148])
    assert unet["load_ms"] == pytest.approx(1017.941)
    assert unet["peak_rss_mb"] == pytest.approx(1185612 / 1024)
    assert unet["device"]["model"] == "SM-S918B" and unet["device"]["os"] == "Android 14"
    assert unet["device"]["abi"] == "arm64-v8a" and unet["device"]["soc"] == "SM8550"
    assert unet["op_table"] and unet["op_table"][0]["name"]  # from the pulled ETDump
    def run(name):
        return (f"cd {WORK} && toybox time -v {WORK}/executor_runner --model_path "
                f"{WORK}/{name}.pte --num_executions 12 --etdump_path {WORK}/{name}.etdp; "
                "echo __MOBILE_SD_RC=$?")

    df = ["-s", SERIAL, "shell", "df /data/local/tmp"]
    etdumps = tmp_path / "bench" / "etdump"
    per_component = [
        [df,
         ["-s", SERIAL, "push", str(folder / f"{n}.pte"), f"{WORK}/{n}.pte"],
         ["-s", SERIAL, "shell", run(n)],
         ["-s", SERIAL, "pull", f"{WORK}/{n}.etdp", str(etdumps / f"{n}-{n}-adb-{SERIAL}.etdp")],
         ["-s", SERIAL, "shell", f"rm -rf {WORK}/{n}.pte"],
         ["-s", SERIAL, "shell", f"rm -rf {WORK}/{n}.etdp"]] for n in ("unet", "decoder")]
    assert read_log() == [
        ["devices", "-l"],
        ["-s", SERIAL, "shell", f"mkdir -p {WORK}"],
        *(["-s", SERIAL, "shell", f"getprop {key}"] for key in PROPS.values()),
        df,  # device_info
        df,  # storage check before pushing the runner
        ["-s", SERIAL, "push", str(runner), f"{WORK}/executor_runner"],
        ["-s", SERIAL, "shell", f"chmod 755 {WORK}/executor_runner"],
        ["-s", SERIAL, "shell", "toybox time -v true"],
        *per_component[0], *per_component[1]]


# ----------------------------------------------------------------------------- faults
@pytest.mark.parametrize("serial, listing, error, words", [
    (SERIAL, "adb_devices_l_empty.txt", E.DeviceNotFoundError, ["R5CT32ABCDE", "plug it in"]),
    (None, "adb_devices_l_empty.txt", E.DeviceNotFoundError, ["no Android device"]),
    ("emulator-5554", "adb_devices_l.txt", E.DeviceNotFoundError, ["emulator-5554", "offline"]),
    ("0A261FDD4000X9", "adb_devices_l.txt", E.DeviceUnauthorizedError, ["0A261FDD4000X9",
                                                                        "Allow USB debugging"]),
])
def test_connect_faults(fake_adb, serial, listing, error, words):
    set_rules, _ = fake_adb
    set_rules([{"match": "devices -l", "stdout_file": listing}])
    with pytest.raises(error) as info:
        AdbTransport(serial).device_info()
    assert all(w in str(info.value) for w in words)


@pytest.mark.parametrize("stderr, error, words", [
    ("adb_device_not_found.stderr", E.DeviceLostError, [SERIAL, "went away"]),
    ("adb_no_devices.stderr", E.DeviceLostError, [SERIAL, "went away"]),
    ("adb_device_offline.stderr", E.DeviceLostError, [SERIAL, "offline"]),
    ("adb_unauthorized.stderr", E.DeviceUnauthorizedError, [SERIAL, "accept"]),
    ("adb_push_no_space.stderr", E.InsufficientStorageError, [SERIAL, "free space"]),
])
def test_push_faults(fake_adb, tmp_path, stderr, error, words):
    set_rules, _ = fake_adb
    set_rules([{"match": " push ", "stderr_file": stderr, "rc": 1}])
    (tmp_path / "unet.pte").write_bytes(b"x")
    with pytest.raises(error) as info:
        AdbTransport(SERIAL).push(tmp_path / "unet.pte", f"{WORK}/unet.pte")
    assert all(w in str(info.value) for w in words)


def test_storage_checked_before_push(fake_adb, tmp_path):
    set_rules, read_log = fake_adb
    set_rules([{"match": "shell df", "stdout_file": "df_toybox_full.txt"}])
    (tmp_path / "unet.pte").write_bytes(b"x" * (3 * 2**20))
    with pytest.raises(E.InsufficientStorageError, match=f"device {SERIAL} has 2 MiB free"):
        AdbTransport(SERIAL).push(tmp_path / "unet.pte", f"{WORK}/unet.pte")
    assert not any("push" in argv for argv in read_log())


def test_pull_missing_file(fake_adb, tmp_path):
    set_rules, _ = fake_adb
    set_rules([{"match": " pull ", "stderr_file": "adb_pull_missing.stderr", "rc": 1}])
    with pytest.raises(E.ArtifactMissingOnDeviceError,
                       match=f"unet.etdp is not on device {SERIAL}"):
        AdbTransport(SERIAL).pull(f"{WORK}/unet.etdp", tmp_path / "unet.etdp")


@pytest.mark.parametrize("rule, drop, error, words, partial", [
    ({"stderr_file": "executor_runner_segfault.stderr", "remote_rc": 11}, (),
     E.RunnerCrashError, ["SIGSEGV", SERIAL, "logcat"], 2),
    ({"stderr": "Segmentation fault \n", "remote_rc": 139}, ("toybox time -v true",),
     E.RunnerCrashError, ["SIGSEGV"], 0),
    ({"stderr_file": "executor_runner_missing_model.stderr", "remote_rc": 6}, (),
     E.ArtifactMissingOnDeviceError, ["unet.pte is not on device"], 0),
    ({"stderr_file": "runner_not_found.stderr", "remote_rc": 127}, (),
     E.ArtifactMissingOnDeviceError, ["executor_runner is not on device"], 0),
    ({"stderr_file": "executor_runner_segfault.stderr", "sleep": 30}, (),
     E.RunnerTimeoutError, ["did not finish within 1 s", SERIAL], 2),
])
def test_run_faults_keep_partial_results(fake_adb, pte_folder, tmp_path, rule, drop, error,
                                         words, partial):
    from mobile_sd.bench import run_bench

    set_rules, read_log = fake_adb
    set_rules([{"match": "executor_runner --model_path", **rule}], drop)
    folder, runner = pte_folder
    results = run_bench(folder, f"adb:{SERIAL}", 2, 10, tmp_path / "bench", runner,
                        timeout_s=1, profile_ops=False)
    unet = results[0]
    assert unet["status"] == "error" and unet["error"]["type"] == error.__name__
    assert all(w in unet["error"]["message"] for w in words), unet["error"]["message"]
    assert unet["partial"] is (partial > 0) and len(unet["iteration_ms"]) == partial
    assert results[1]["error"]["type"] == error.__name__  # the next component was still tried
    if error is E.RunnerTimeoutError:
        assert ["-s", SERIAL, "shell", f"pkill -f {WORK}/executor_runner"] in read_log()


def test_device_lost_mid_run_stops_the_session(fake_adb, pte_folder, tmp_path):
    from mobile_sd.bench import run_bench
    from mobile_sd.report.bench_report import load_results

    set_rules, _ = fake_adb
    set_rules([{"match": "executor_runner --model_path", "rc": 1,
                "stderr": (DATA / "executor_runner_segfault.stderr").read_text()
                + "adb: device offline\n"}])
    folder, runner = pte_folder
    results = run_bench(folder, f"adb:{SERIAL}", 2, 10, tmp_path / "bench", runner,
                        profile_ops=False)
    assert results[0]["error"]["type"] == "DeviceLostError" and results[0]["partial"]
    assert results[0]["iteration_ms"] == pytest.approx([327.53, 328.431])
    assert results[1]["status"] == "error" and results[1]["reason"].startswith("not run:")
    saved, _ = load_results(tmp_path / "bench" / "bench.jsonl")
    assert [r["partial"] for r in saved] == [True, False]


def test_adb_target_requires_runner(pte_folder, tmp_path):
    from mobile_sd.bench import run_bench
    from mobile_sd.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="docs/android_runner.md"):
        run_bench(pte_folder[0], "adb", 1, 1, tmp_path / "bench", None)

"""deploy/README.md, host side, run as written in a scratch folder.

The blocks of deploy/README.md that run as root on the host (they write /etc/mosquitto/edgefleet) are
skipped by tests/test_readme.py; this test runs them, in README order, with only the substitutions
listed in ``substitutions()`` (each one must still match its block, so a README change that makes one
stale fails here), then plays the Pi's part with the files the README copies to it:

1. section 1: CA + server certificate (openssl, as written);
2. section 2: ``builder keys init``, ``builder fleet add-device`` -> mosquitto.conf, passwd, acl,
   the builder's credentials and the device folder;
3. the Mosquitto start block: the symlink Debian's service reads, then ``mosquitto -c`` on it (in
   place of ``systemctl restart``) and SIGHUP (``systemctl reload``); the builder's credentials
   connect on the loopback listener;
4. ``builder serve --broker mqtts://... --ca-file ...`` (in the background, as written);
5. section 3: ``make dist`` in a copy of the checkout (nothing unignored left behind), and the
   ``scp`` lines as ``cp`` into a folder that stands for the Pi's file system;
6. the Pi: the wheel installed ``--no-deps`` into a fresh venv, ``agent --version``, then that
   venv's ``agent run --config`` on the copied device folder joins over TLS with its own password,
   and ``builder fleet status --json`` shows it online;
7. the ACL: the device's credentials cannot publish on another device's topics, nor a deployment.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent import protocol as proto
from tests.fleet.conftest import Mosquitto, store_status
from tests.support.broker import free_port, mosquitto_available
from tests.support.processes import wait_for
from tests.support.readme import PRELUDE, ROOT, ShellBlock, block_environment, shell_blocks

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)"),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")]

DOC = "deploy/README.md"
DEVICE = "pi-kitchen-01"
OTHER_DEVICE = "pi-hall-02"  # never registered: only its topics are used
VENV = Path(sys.prefix)
WHEEL = "edgefleet-0.1.0-py3-none-any.whl"
BLOCK_TIMEOUT_S = 180
# The host blocks, each found by a line only it has.
HOST_BLOCKS = {"certs": "openssl req -x509", "add-device": "builder fleet add-device",
               "start": "systemctl restart mosquitto", "serve": "builder serve --broker", "dist": "make dist"}


@dataclass(frozen=True)
class Scratch:
    """The scratch folder's layout: every path the walkthrough writes lies under ``root``."""
    root: Path

    @property
    def broker_dir(self) -> Path:  # /etc/mosquitto/edgefleet
        return self.root / "etc-mosquitto" / "edgefleet"

    @property
    def debian_conf(self) -> Path:  # /etc/mosquitto/mosquitto.conf, what Debian's mosquitto service reads
        return self.root / "etc-mosquitto" / "mosquitto.conf"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def data_dir(self) -> Path:  # the README's ~/.local/share/edgefleet (EDGEFLEET_HOME unset)
        return self.home / ".local" / "share" / "edgefleet"

    @property
    def pi(self) -> Path:  # stands for the Pi's / (scp pi@pi-kitchen-01.local:/tmp/ -> cp pi/tmp/)
        return self.root / "pi"

    @property
    def checkout(self) -> Path:
        return self.root / "checkout"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


@dataclass(frozen=True)
class Sub:
    block: str
    old: str
    new: str
    why: str


def substitutions(s: Scratch, port: int, tls_port: int, as_root: bool) -> list[Sub]:
    """Every change made to the README's host blocks, applied in this order; nothing else is changed."""
    etc = "/etc/mosquitto/edgefleet"
    scratch_etc = Sub("", etc, str(s.broker_dir), "the broker folder, in the scratch folder")
    tls_url = Sub("", "mqtts://builder.local:8883", f"mqtts://127.0.0.1:{tls_port}",
                  "devices and serve dial the TLS listener on loopback: builder.local does not resolve here, and "
                  "the certificate's IP:127.0.0.1 (below) is checked just as IP:192.168.1.10 is on a LAN; the "
                  "certificate keeps DNS:builder.local (so nothing is added to it, and the README's name stays)")
    subs = [
        Sub("certs", etc, scratch_etc.new, scratch_etc.why),
        Sub("certs", "IP:192.168.1.10", "IP:127.0.0.1", "the host's LAN address -> the address the agent dials here"),
    ]
    if not as_root:
        subs.append(Sub("certs", "chown root:mosquitto server.key", "true",
                        "needs root; started by a user, Mosquitto does not drop to its own user and reads the key "
                        "as that user"))
    subs += [
        Sub("add-device", "sudo ", "", "no sudo in a test: the folder is the test's own"),
        Sub("add-device", etc, scratch_etc.new, scratch_etc.why),
        Sub("add-device", "--broker-port 1883", f"--broker-port {port}", "a free port"),
        Sub("add-device", "--tls-port 8883", f"--tls-port {tls_port}", "a free port"),
        Sub("add-device", tls_url.old, tls_url.new, tls_url.why),
        Sub("start", etc, scratch_etc.new, scratch_etc.why),
        Sub("start", "/etc/mosquitto/mosquitto.conf", str(s.debian_conf), "Debian's config path, in the scratch folder"),
        Sub("start", "systemctl restart mosquitto", ":", "the test starts `mosquitto -c` on that path itself"),
        Sub("start", "systemctl reload mosquitto", ":", "the test sends that Mosquitto SIGHUP"),
        Sub("serve", tls_url.old, tls_url.new, tls_url.why),
        Sub("serve", etc, scratch_etc.new, scratch_etc.why),
        Sub("dist", "scp -rp ", "cp -rp ", "no Pi: copy into the folder that stands for its file system"),
        Sub("dist", "scp ", "cp ", "no Pi: copy into the folder that stands for its file system"),
        Sub("dist", "pi@pi-kitchen-01.local:", str(s.pi), "the Pi's / -> the scratch folder's pi/"),
    ]
    return subs


def host_blocks() -> dict[str, ShellBlock]:
    blocks = shell_blocks(DOC)
    found = {}
    for name, needle in HOST_BLOCKS.items():
        matching = [b for b in blocks if needle in b.code]
        assert len(matching) == 1, f"{DOC}: {len(matching)} shell blocks contain {needle!r} (want 1)"
        assert matching[0].skip_reason and "test_deploy_walkthrough" in matching[0].skip_reason, \
            f"{matching[0].where}: tests/test_readme.py skips this block and points here"
        found[name] = matching[0]
    return found


def substituted(blocks: dict[str, ShellBlock], subs: list[Sub]) -> dict[str, str]:
    code = {name: block.code for name, block in blocks.items()}
    for sub in subs:
        assert sub.old in code[sub.block], \
            f"{blocks[sub.block].where}: the substitution {sub.old!r} -> {sub.new!r} ({sub.why}) no longer matches"
        code[sub.block] = code[sub.block].replace(sub.old, sub.new)
    return code


def run_block(name: str, code: str, cwd: Path, env: dict[str, str], log_dir: Path) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", PRELUDE + code], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    (log_dir / f"{name}.log").write_text(f"{code}\n# ----\n{result.stdout}{result.stderr}", encoding="utf-8")
    assert result.returncode == 0, f"block {name!r} exited {result.returncode}:\n{code}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


class Background:
    """A block or command that runs until the test stops it (its whole process group)."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def copy_checkout(dest: Path) -> None:
    """The checkout as a fresh clone with this change would have it (tracked and untracked-unignored
    files), committed in its own repository, so `git status` there tells what `make dist` left behind.
    A copy, not the checkout itself: its dist/ and build/ are the developer's."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + args, cwd=dest, check=True, capture_output=True)


def install_wheel_on_the_pi(wheel: Path, venv: Path) -> None:
    """Section 4's ``pip install 'the.whl[agent]'``, offline: the wheel with ``--no-deps`` into a fresh
    venv, the ``[agent]`` dependencies taken from the test's own environment by a .pth file (appended
    to sys.path, so the wheel's ``agent`` package comes first; the test environment's own .pth files,
    such as an editable install of this checkout, are not processed)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "zz_test_agent_extra.pth").write_text("\n".join(deps) + "\n", encoding="utf-8")


def mqtt_client(port: int, username: str, password: str, client_id: str, ca_file: Path | None = None) -> tuple[mqtt.Client, list]:
    received: list[tuple[str, bytes]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    connected, result = threading.Event(), {}

    def on_connect(c, u, flags, rc, props) -> None:
        result["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    client.on_message = lambda c, u, m: received.append((m.topic, bytes(m.payload)))
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(10), f"{username}: no CONNACK from 127.0.0.1:{port}"
    assert not result["rc"].is_failure, f"{username} refused on 127.0.0.1:{port}: {result['rc']}"
    return client, received


@pytest.mark.timeout(600)  # about 15 s on a loaded 2-core machine
def test_deploy_readme_host_side_as_written_then_a_device_joins_over_tls(world_readable_dir: Path) -> None:
    # world_readable_dir: Mosquitto started as root drops to the mosquitto user, which must read the
    # broker folder (pytest's tmp_path is 0700).
    s = Scratch(world_readable_dir)
    for folder in (s.broker_dir.parent, s.home, s.pi / "tmp", s.checkout, s.logs):
        folder.mkdir(parents=True)
    port, tls_port = free_port(), free_port()
    as_root = os.geteuid() == 0
    code = substituted(host_blocks(), substitutions(s, port, tls_port, as_root))
    env = block_environment(s.home, VENV)
    env.setdefault("USER", getpass.getuser())  # section 2's `chown "$USER"` (unset in some CI containers)
    background: list[Background] = []
    broker: Mosquitto | None = None
    try:
        # 1. certificates; 2. keys, add-device
        run_block("certs", code["certs"], s.root, env, s.logs)
        run_block("add-device", code["add-device"], s.root, env, s.logs)
        device_folder = s.data_dir / "devices" / DEVICE
        for name in ("mosquitto.conf", "passwd", "acl"):
            assert (s.broker_dir / name).is_file(), f"add-device wrote no {name} in --broker-config-dir"
        for name in ("agent.toml", "password", "ca.pem", "signing_key.pub.pem"):
            assert (device_folder / name).is_file(), f"add-device wrote no {name} in the device folder"
        password = (device_folder / "password").read_text(encoding="utf-8").strip()
        assert password not in (s.broker_dir / "passwd").read_text(encoding="utf-8")  # hashes only

        # the Mosquitto start block: the symlink, then `mosquitto -c` on it and SIGHUP (the two systemctl lines)
        run_block("start", code["start"], s.root, env, s.logs)
        assert s.debian_conf.is_symlink() and s.debian_conf.resolve() == (s.broker_dir / "mosquitto.conf").resolve()
        broker = Mosquitto(s.debian_conf, [port, tls_port]).start()
        # the builder's credentials (add-device wrote them) on the loopback listener. Its CONNACK also
        # says Mosquitto's main loop runs: it sets its SIGHUP handler after it opens its ports, so a
        # SIGHUP as soon as they are open can end it (systemd waits for its readiness notification).
        creds = json.loads((s.data_dir / "broker-credentials.json").read_text(encoding="utf-8"))
        host, seen_by_host = mqtt_client(port, creds["username"], creds["password"], "walkthrough-host")
        broker.reload()
        assert broker.proc is not None and broker.proc.poll() is None, "mosquitto died on SIGHUP (reload)"
        host.subscribe(proto.all_devices_topic("up/#"), qos=1)
        host.subscribe(proto.all_devices_topic("down/#"), qos=1)

        # 4. builder serve against the TLS listener, as written (it runs until stopped)
        serve = Background(["bash", "-euo", "pipefail", "-c", PRELUDE + code["serve"]], s.root, env, s.logs / "serve.log")
        background.append(serve)
        wait_for(lambda: (s.data_dir / "serve.json").is_file() or serve.proc.poll() is not None, 60, "builder serve to start")
        assert serve.proc.poll() is None, f"builder serve exited {serve.proc.returncode}:\n{serve.tail()}"

        # 5. section 3 in a copy of the checkout: make dist, then the scp lines (as cp) to "the Pi"
        copy_checkout(s.checkout)
        out = run_block("dist", code["dist"], s.checkout, {**env, "EDGEFLEET_CHECKOUT": str(s.checkout)}, s.logs)
        assert f"dist/{WHEEL}" in out
        left = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=s.checkout,
                              capture_output=True, text=True, check=True).stdout
        assert not left, f"make dist left files git does not ignore:\n{left}"
        config = s.pi / "tmp" / "edgefleet-config"
        assert (s.pi / "tmp" / WHEEL).is_file() and (s.pi / "tmp" / "edgefleet-agent.service").is_file()
        assert (config / "password").stat().st_mode & 0o077 == 0, "scp -rp keeps the password file private"

        # 6. the Pi: the wheel into a fresh venv, its agent on the copied device folder. The only
        #    Pi-side changes to agent.toml: data_dir (/var/lib/edgefleet) into the scratch folder and
        #    test settings (a free inference port, fast reconnects).
        pi_venv = s.pi / "opt" / "edgefleet" / "venv"
        install_wheel_on_the_pi(s.pi / "tmp" / WHEEL, pi_venv)
        pi_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        version = subprocess.run([str(pi_venv / "bin" / "agent"), "--version"], cwd=s.pi, env=pi_env, capture_output=True,
                                 text=True, timeout=60)
        assert version.returncode == 0 and version.stdout.startswith("agent 0.1.0"), version.stdout + version.stderr
        where = subprocess.run([str(pi_venv / "bin" / "python"), "-c", "import agent; print(agent.__file__)"],
                               cwd=s.pi, env=pi_env, capture_output=True, text=True, check=True).stdout
        assert where.startswith(str(pi_venv)), f"the agent did not come from the wheel: {where}"
        toml = config / "agent.toml"
        text = toml.read_text(encoding="utf-8")
        assert f'broker_url = "mqtts://127.0.0.1:{tls_port}"' in text and 'password_file = "password"' in text, text
        assert 'data_dir = "/var/lib/edgefleet"' in text, text
        text = text.replace('data_dir = "/var/lib/edgefleet"', f'data_dir = "{s.pi / "var" / "lib" / "edgefleet"}"')
        toml.write_text(text + "http_port = 0\nreconnect_min_s = 0.2\nreconnect_max_s = 1.0\n", encoding="utf-8")
        agent = Background([str(pi_venv / "bin" / "agent"), "run", "--config", str(toml)], s.pi, pi_env,
                           s.logs / "agent.log")
        background.append(agent)
        wait_for(lambda: store_status(s.data_dir).get(DEVICE, {}).get("online") or agent.proc.poll() is not None,
                 90, "the agent online over TLS")
        assert agent.proc.poll() is None, f"agent run exited {agent.proc.returncode}:\n{agent.tail()}\n{serve.tail()}"
        status = subprocess.run([str(VENV / "bin" / "builder"), "fleet", "status", "--json"], cwd=s.root, env=env,
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        rows = {row["device_id"]: row for row in json.loads(status.stdout)}
        assert rows[DEVICE]["online"], rows

        # 7. the ACL: with its own password the device writes only its own up/ topics
        ca_file = config / "ca.pem"
        spy, _ = mqtt_client(tls_port, DEVICE, (config / "password").read_text(encoding="utf-8").strip(),
                             "walkthrough-device-probe", ca_file=ca_file)
        probes = {proto.device_topic(DEVICE, "up/walkthrough-probe"): b"own-up",
                  proto.device_topic(OTHER_DEVICE, "up/walkthrough-probe"): b"other-device-up",
                  proto.device_topic(OTHER_DEVICE, proto.Down.DESIRED): b"forged-desired-other",
                  proto.device_topic(DEVICE, proto.Down.DESIRED): b"forged-desired-own"}
        for topic, payload in probes.items():
            spy.publish(topic, payload, qos=1).wait_for_publish(10)
        wait_for(lambda: any(p == b"own-up" for _, p in seen_by_host), 10, "the device's own up/ message at the host")
        time.sleep(1.0)  # Mosquitto denies silently: give a forged message time to arrive if it would
        arrived = sorted(p for _, p in seen_by_host if p in probes.values())
        assert arrived == [b"own-up"], arrived
        for client in (spy, host):
            client.disconnect()
            client.loop_stop()
        assert agent.proc.poll() is None and serve.proc.poll() is None
    finally:
        for proc in reversed(background):
            proc.stop()
        if broker is not None:
            broker.stop()

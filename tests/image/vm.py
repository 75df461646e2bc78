"""Boot a Letterbox appliance image under qemu (TCG, no KVM here) and drive it from the host.

Used by the VM tests in tests/image/ (run by `make image-test`, never collected by `make test`; see
conftest.py there). Usage:

    from tests.image.vm import Vm, built_image

    image = built_image()                   # the raw disk image from $LETTERBOX_IMAGE (make image-test sets it)
    with Vm(image, tmp_path) as vm:         # copy-on-write overlay in tmp_path (4 GiB): the image is not changed
        vm.start()                          # qemu-system-x86_64, user networking, host forwards (BIOS; uefi=True: OVMF)
        seconds = vm.wait_for_wizard()      # until https answers the wizard; seconds since qemu started
        vm.wait_until_ready()               # until letterbox.service is active: the mail ports listen too
        vm.port(443)                        # the 127.0.0.1 port forwarded to the guest's 443 (also 25, 80, 993...)
        out = vm.run("letterbox --version") # a root shell command in the guest (qemu guest agent); raises on exit != 0
        vm.run("false", check=False).exit_code
        vm.write_file("/tmp/new.whl", data) # bytes into a guest file (guest agent)
        vm.reboot()                         # clean reboot from inside; then wait_for_wizard() again
        vm.shutdown()                       # clean poweroff (also done, or qemu killed, on leaving the `with`)
    vm.console_log()                        # the serial console so far (attach it to failures: vm.failure_report())

Every wait has a generous deadline and fails with the console log attached: this runs in CI on a busy
two-core machine, and a slow boot must not be mistaken for a broken one.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import http.client
import http.server
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support.ports import PORT_ATTEMPTS, free_ports

GUEST_PORTS = (22, 25, 80, 110, 143, 443, 465, 587, 993, 995)
BOOT_TIMEOUT = float(os.environ.get("LETTERBOX_VM_BOOT_TIMEOUT", "1500"))  # TCG on a busy shared machine
COMMAND_TIMEOUT = 900.0  # a letterbox CLI command imported for minutes in a guest at host load 15
# qemu's Westmere model (TCG): SSE4.2, POPCNT, AES-NI, no AVX; with AMD's vendor name, so that the guest's
# kernel does not isolate its page tables from user space against Meltdown (PTI: it does on every Intel CPU
# that does not say it is immune, and TCG cannot say so: no IA32_ARCH_CAPABILITIES). Under TCG each switch
# of page tables, two per system call, throws qemu's whole translated-address cache away: a first boot to
# the wizard took 85 s of qemu's CPU with PTI and 72 s without (BIOS, load 11). Hyperscan, and so the name
# of rspamd's precompiled public-suffix list, sees the same CPU either way (its features and the family
# and model it tunes for, not the vendor). Under KVM a guest learns from the host's CPU whether it is
# immune; qemu's `max` model under TCG (the tests' CPU before Westmere) is AMD's too.
CPU = os.environ.get("LETTERBOX_VM_CPU", "Westmere,vendor=AuthenticAMD")
OVERLAY_SIZE = "4G"  # bigger than the image: first boot grows the root file system into it
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")


@dataclass(frozen=True)
class DirectBoot:
    """Boot a kernel and initrd given by the host instead of the disk's boot loader (the Raspberry Pi
    image under `-M virt`: the Pi firmware itself cannot be emulated)."""

    kernel: Path
    initrd: Path
    append: str
    arch: str = "aarch64"
    cpu: str = "cortex-a72"


class VmError(AssertionError):
    """A VM step failed; the message ends with the tail of the serial console."""


@dataclass(frozen=True)
class Result:
    exit_code: int
    stdout: str
    stderr: str


def _end_with_parent() -> None:
    """In the child before exec: the kernel ends qemu when the process that started it goes, however it
    went (a pytest-xdist worker killed by an interrupted run left its machines running). prctl(2)."""
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, 15, 0, 0, 0)  # SIGTERM


def built_image() -> Path:
    path = os.environ.get("LETTERBOX_IMAGE", "")
    if not path or not Path(path).is_file():
        raise VmError(f"LETTERBOX_IMAGE={path!r} is not a built image: run `make image-test`")
    return Path(path)


def unverified_tls() -> ssl.SSLContext:
    """The box's first certificate is self-signed (made at first boot): the test checks it differs per
    box, it cannot be verified against anything."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Vm:
    def __init__(self, image: Path, workdir: Path, *, uefi: bool = False, memory_mb: int = 1024,
                 name: str = "vm", direct_boot: DirectBoot | None = None) -> None:
        self.image = image
        self.direct_boot = direct_boot
        self.dir = workdir / name
        self.uefi = uefi
        self.memory_mb = memory_mb
        self.ports = dict(zip(GUEST_PORTS, free_ports(len(GUEST_PORTS)), strict=True))
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.cpu_at_start = 0.0  # qemu's CPU seconds when this boot began (a reboot keeps the process)
        self.wizard_cpu = 0.0  # qemu's CPU seconds from this boot's start until the wizard answered
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = self.dir / "disk.qcow2"
        self.console = self.dir / "console.log"
        self.qga_socket = self.dir / "qga.sock"
        self.qmp_socket = self.dir / "qmp.sock"

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Vm:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def port(self, guest_port: int) -> int:
        return self.ports[guest_port]

    def command_line(self) -> list[str]:
        forwards = ",".join(f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items())
        if self.direct_boot is None:
            # A CPU without AVX2, as Proxmox's default (x86-64-v2-AES) and most hypervisors' defaults are:
            # the one the image's precompiled rspamd public-suffix list is for (image/lib/configure.sh
            # warm_rspamd_tld). With `-cpu max` (AVX2) rspamd compiled the list itself at the first
            # boot, minutes of emulated CPU.
            machine = ["qemu-system-x86_64", "-machine", "q35", "-cpu", CPU]
        else:
            boot = self.direct_boot
            machine = [f"qemu-system-{boot.arch}", "-machine", "virt", "-cpu", boot.cpu,
                       "-kernel", str(boot.kernel), "-initrd", str(boot.initrd), "-append", boot.append]
        cmd = [
            *machine, "-accel", "tcg,thread=multi", "-smp", "2", "-m", str(self.memory_mb), "-display", "none", "-no-user-config",
            "-nodefaults",  # no CD-ROM, VGA or parallel port for the guest to probe at every boot
            "-drive", f"file={self.disk},if=virtio,format=qcow2,discard=unmap",
            "-netdev", f"user,id=n0,{forwards}", "-device", "virtio-net-pci,netdev=n0",
            "-object", "rng-random,filename=/dev/urandom,id=rng0", "-device", "virtio-rng-pci,rng=rng0",
            "-chardev", f"socket,path={self.qga_socket},server=on,wait=off,id=qga0",
            "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            # append: a reboot starts qemu again (reboot()) and the console keeps the first boot's lines.
            "-chardev", f"file,id=serial0,path={self.console},append=on", "-serial", "chardev:serial0",
            # A reset of the guest ends qemu, and reboot() starts it again on the same disk: see there.
            "-no-reboot",
        ]
        if self.uefi:
            vars_copy = self.dir / "OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        return cmd

    def start(self) -> None:
        """Boot. The overlay is made on the first start only: a second start is the same machine."""
        if not self.disk.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.resolve()),
                            str(self.disk), OVERLAY_SIZE], check=True)
        self.console.touch()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.process = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            preexec_fn=_end_with_parent)
            self.started_at = time.monotonic()
            self.cpu_at_start = 0.0
            output = self._qemu_up()
            if output is None:
                return
            if "Could not set up host forwarding rule" not in output or attempt == PORT_ATTEMPTS:
                raise VmError(f"qemu exited with {self.process.returncode} at its start: {output}")
            # free_ports' ports are ephemeral ones: any process's outgoing connection may take one
            # between picking and qemu's bind (a fresh-clone CI lost both image VMs this way).
            self.process = None
            self.ports = dict(zip(GUEST_PORTS, free_ports(len(GUEST_PORTS)), strict=True))

    def _qemu_up(self, timeout: float = 120.0) -> str | None:
        """None once qemu's monitor answers (its host forwards are bound by then: netdevs are made before
        the machine), else the output of a qemu that exited first."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                assert self.process.stdout is not None
                output = self.process.stdout.read().decode(errors="replace")
                self.process.stdout.close()
                return output
            try:
                self._qmp("query-status")
                return None
            except (OSError, VmError):
                time.sleep(0.2)
        return None  # a slow monitor is not a failed start: the boot's own waits report a stuck qemu

    def cpu_seconds(self) -> float:
        """CPU time qemu has used so far, all its threads (both vCPUs, I/O): the work a boot takes
        whatever the host's load. On an idle two-core host the boot's wall time is at least half of it
        (two vCPU threads), and about all of it while one vCPU does the work (most of a boot)."""
        if self.process is None:
            return 0.0
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, proc(5)

    def stop(self) -> None:
        """Power off cleanly if the guest still answers, else end qemu."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(OSError, VmError):
                self._qmp("system_powerdown")
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def shutdown(self) -> None:
        self.stop()

    def reboot(self) -> None:
        """A reboot from inside the guest (what an admin or an update does): the guest's whole shutdown
        runs, then its reset ends qemu (-no-reboot) and qemu starts again on the same disk, so the boot
        that follows is a cold one of the same machine (nothing but the disk survives either way). Not
        qemu's own warm reset: under TCG with two vCPU threads (qemu 7.2) the machine reset by the guest
        hung in GRUB's `linux /vmlinuz` for over 10 minutes, qemu busy and reading nothing (a BIOS boot
        profile at load 10; the image test's reboot had taken 264 s where the first boot took 160 s).
        Done when the guest agent answers from a new boot (its boot_id changed): a web console that is
        merely slow to answer is not taken for a reboot. The time and qemu's CPU count from the
        `systemctl reboot`, the shutdown included."""
        before = self.boot_id()
        cpu_before = last_cpu = self.cpu_seconds()
        with contextlib.suppress(VmError, OSError):  # the agent may go down before it reports back
            self.run("systemctl reboot", check=False, timeout=30)
        started_at = time.monotonic()
        deadline = started_at + BOOT_TIMEOUT
        while self.process is not None and self.process.poll() is None:
            last_cpu = max(last_cpu, self.cpu_seconds())
            if time.monotonic() > deadline:
                raise VmError(self.failure_report("the guest did not shut down for its reboot"))
            time.sleep(0.5)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.start()
        self.started_at = started_at
        self.cpu_at_start = -(last_cpu - cpu_before)  # the shutdown's CPU, counted in wizard_cpu

        def rebooted() -> bool:
            try:
                return self.boot_id(timeout=30) not in ("", before)
            except (OSError, VmError, ValueError):
                return False
        self._wait(rebooted, BOOT_TIMEOUT, "the guest to come back from the reboot")

    def boot_id(self, timeout: float = COMMAND_TIMEOUT) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=timeout).stdout.strip()

    # --- waiting -----------------------------------------------------------------------------------
    def console_log(self) -> str:
        try:
            return self.console.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def failure_report(self, what: str) -> str:
        qemu_out = ""
        if self.process is not None and self.process.poll() is not None and self.process.stdout is not None:
            qemu_out = f"\nqemu exited with {self.process.returncode}: {self.process.stdout.read().decode(errors='replace')}"
        tail = self.console_log()[-12000:]
        return f"{what}{qemu_out}\n----- serial console of {self.dir.name} (last 12000 chars) -----\n{tail}"

    def _wait(self, ready: Any, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise VmError(self.failure_report(f"qemu stopped while waiting for {what}"))
            if ready():
                return time.monotonic() - self.started_at
            time.sleep(1.0)
        raise VmError(self.failure_report(f"timed out after {timeout:.0f} s waiting for {what}"))

    def https_answers(self, timeout: float = 30.0) -> bool:
        # 30 s, not 5: at load 22 the host saw the wizard 119 s after letterbox's READY=1 (the guest's
        # clock starts after firmware and GRUB, so not all of it is this): a first TLS handshake in a
        # starved guest may take longer than 5 s, and must not count as "not up yet".
        try:
            status, _, _ = self.https_get("/setup", timeout=timeout)
        except (OSError, http.client.HTTPException):
            return False
        return status in (200, 302, 303, 307)

    def wait_for_wizard(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from qemu's start (or the reboot) until the web console answers over HTTPS (and
        qemu's CPU seconds meanwhile in `wizard_cpu`)."""
        seconds = self._wait(self.https_answers, timeout, "the web console (https) to answer")
        self.wizard_cpu = self.cpu_seconds() - self.cpu_at_start
        return seconds

    def wait_until_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Seconds from qemu's start (or the reboot) until letterbox.service is active: READY=1, every
        port listens. The console answers before (`serve` starts it first), the mail ports only then."""
        def ready() -> bool:
            try:
                return self.run("systemctl is-active letterbox.service", check=False, timeout=60).stdout.strip() == "active"
            except VmError:
                return False
        return self._wait(ready, timeout, "letterbox.service to be active (READY=1)")

    # --- HTTP(S) through the forwards ----------------------------------------------------------------
    def http_get(self, path: str, *, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port(80), timeout=timeout)
        return _request(conn, path)

    def https_get(self, path: str, *, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port(443), timeout=timeout, context=unverified_tls())
        return _request(conn, path)

    def certificate(self, guest_port: int = 443) -> bytes:
        """The DER certificate the box presents on a TLS port."""
        with socket.create_connection(("127.0.0.1", self.port(guest_port)), timeout=30) as raw, \
                unverified_tls().wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    # --- commands in the guest (qemu guest agent) ---------------------------------------------------
    @contextlib.contextmanager
    def _agent(self, timeout: float) -> Iterator[_Channel]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.qga_socket))
            channel = _Channel(sock)
            channel.sync()
            yield channel
        finally:
            sock.close()

    def wait_for_agent(self, timeout: float = BOOT_TIMEOUT) -> float:
        def answers() -> bool:
            try:
                with self._agent(timeout=5.0):
                    return True
            except (OSError, VmError, ValueError):
                return False
        return self._wait(answers, timeout, "the qemu guest agent")

    def run(self, command: str, *, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            stdin: bytes | None = None) -> Result:
        """`sh -c COMMAND` as root in the guest; waits for the agent first (it starts with the guest)."""
        self.wait_for_agent()
        args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", command], "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        with self._agent(timeout=30.0) as agent:
            pid = agent.call("guest-exec", args)["pid"]
            deadline = time.monotonic() + timeout
            # Each poll is a call the guest answers (and did log, see the image's qemu-guest-agent drop-in):
            # from 50 ms, doubled up to 1 s. A flat 1 s made each of the tests' hundreds of short commands
            # (a cat, a systemctl show) take a second: minutes of a run.
            pause = 0.05
            while True:
                status = agent.call("guest-exec-status", {"pid": pid})
                if status.get("exited"):
                    break
                if time.monotonic() > deadline:
                    raise VmError(self.failure_report(f"`{command}` did not finish in {timeout:.0f} s"))
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
        result = Result(status.get("exitcode", -1), _b64(status.get("out-data")), _b64(status.get("err-data")))
        if check and result.exit_code != 0:
            raise VmError(f"`{command}` in the guest exited {result.exit_code}:\n{result.stdout}\n{result.stderr}")
        return result

    def write_file(self, path: str, data: bytes, *, chunk: int = 1 << 20) -> None:
        """DATA into the guest file PATH (made or truncated; root's): through the agent in chunks it
        accepts, or, from a megabyte on, fetched by the guest from the host (`_fetch_file`)."""
        if len(data) > chunk:
            try:
                self._fetch_file(path, data)
                return
            except VmError as exc:  # a guest without its network yet: slower, but there
                warnings.warn(f"{path} fetched by the guest failed, written through the agent: {exc}", stacklevel=2)
        self.wait_for_agent()
        with self._agent(timeout=60.0) as agent:
            handle = agent.call("guest-file-open", {"path": path, "mode": "wb"})
            try:
                for start in range(0, len(data), chunk):
                    piece = base64.b64encode(data[start:start + chunk]).decode()
                    agent.call("guest-file-write", {"handle": handle, "buf-b64": piece})
            finally:
                agent.call("guest-file-close", {"handle": handle})

    def _fetch_file(self, path: str, data: bytes) -> None:
        """The guest's python3 fetches DATA over its network from a one-shot HTTP server on the host's
        loopback (qemu's user networking shows the host's 127.0.0.1 to the guest as 10.0.2.2), under a
        random path. The agent's way parses every byte as JSON text in the emulated guest: a 17 MB update
        bundle took 28-43 s of the image test's update (load 10) that way."""
        token = base64.urlsafe_b64encode(os.urandom(18)).decode()

        class OneFile(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != f"/{token}":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise in the test output
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OneFile)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://10.0.2.2:{server.server_address[1]}/{token}"
            script = ("import shutil, sys, urllib.request\n"
                      "with urllib.request.urlopen(sys.argv[1], timeout=300) as r, open(sys.argv[2], 'wb') as f:\n"
                      "    shutil.copyfileobj(r, f)\n")
            self.run(f"python3 -c {shlex.quote(script)} {shlex.quote(url)} {shlex.quote(path)}")
            size = int(self.run(f"stat -c %s {shlex.quote(path)}").stdout)
            if size != len(data):
                raise VmError(f"{path} in the guest has {size} bytes, not {len(data)}")
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    # --- qemu monitor --------------------------------------------------------------------------------
    def _qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_socket))
            reader = sock.makefile("rb")
            reader.readline()  # greeting
            for message in ({"execute": "qmp_capabilities"}, {"execute": command}):
                sock.sendall(json.dumps(message).encode() + b"\n")
                while b'"return"' not in (line := reader.readline()) and b'"error"' not in line:
                    if not line:
                        raise VmError("qemu monitor closed")


class _Channel:
    """The guest agent's JSON protocol: a sync with a 0xFF marker first throws away replies meant for an
    earlier client (qemu keeps the virtio port open across connections)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def sync(self) -> None:
        token = int.from_bytes(os.urandom(4), "big") >> 1
        self.sock.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmError("guest agent closed")
            self.buffer += chunk
            if b"\xff" in self.buffer:
                self.buffer = self.buffer[self.buffer.rindex(b"\xff") + 1:]
                reply = self._reply()
                if reply == token:
                    return

    def _reply(self) -> Any:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmError("guest agent closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message = json.loads(line)
        if "error" in message:
            raise VmError(f"guest agent: {message['error']}")
        return message.get("return")

    def call(self, command: str, arguments: dict[str, Any]) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        return self._reply()


def wait_for_wizards(vms: list[Vm], timeout: float = BOOT_TIMEOUT) -> dict[Vm, float]:
    """VMs booting side by side: each one's seconds from its qemu start until its web console answered
    (polled together, so that a fast one is not timed by a slow one)."""
    answered: dict[Vm, float] = {}
    deadline = time.monotonic() + timeout
    while len(answered) < len(vms):
        for vm in vms:
            if vm in answered:
                continue
            if vm.process is not None and vm.process.poll() is not None:
                raise VmError(vm.failure_report("qemu stopped while waiting for the web console"))
            if vm.https_answers():
                answered[vm] = time.monotonic() - vm.started_at
                vm.wizard_cpu = vm.cpu_seconds() - vm.cpu_at_start
        if time.monotonic() > deadline:
            late = next(vm for vm in vms if vm not in answered)
            raise VmError(late.failure_report(f"timed out after {timeout:.0f} s waiting for the web console"))
        time.sleep(1.0)
    return answered


def _request(conn: http.client.HTTPConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _b64(text: str | None) -> str:
    return base64.b64decode(text).decode(errors="replace") if text else ""

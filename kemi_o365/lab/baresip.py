"""Debian's baresip 1.0.0 as a second, independent Microsoft side: a real SIP user agent (libre's TLS,
libsrtp SDES) that answers the SBC's INVITE, plays a tone and records what it hears.

Why a second peer: our Python `MicrosoftPeer` was written alongside the SBC, so both could share one
misreading of an RFC. baresip was not; if it establishes the call and hears CUCM's audio, the SBC's
TLS, SIP and SDES-SRTP are right by an outside measure.

What baresip 1.0.0 does (read from its source, tag v1.0.0, and libre 1.1.0, and seen in the lab):

* `sip_listen ADDR:PORT` binds UDP and TCP on PORT and TLS on PORT+1 (src/ua.c add_transp_af); there
  is no `sip_trans_def` in this version, and no way to switch UDP/TCP off (main.c calls
  `ua_init(..., true, true, true)`). So we listen on `port - 1` and TLS lands on `port`.
* Its TLS server never asks for a client certificate: ua.c only calls `tls_alloc` + `tls_add_ca`,
  never libre's `tls_set_verify_client`, so the SSL_CTX keeps OpenSSL's SSL_VERIFY_NONE (seen with
  `openssl s_client -msg`: no CertificateRequest under TLS 1.2 or 1.3). The SBC's certificate is
  therefore never sent to it (a TLS client only sends one when asked); mutual TLS toward Microsoft is
  covered by the Python peer, not here. The SBC still verifies baresip's against the lab CA.
* Responses and in-dialog handling stay on the connection the SBC opened (libre's sip_reply sends on
  the request's socket), so baresip needs no DNS for the SBC's Via/Record-Route names.
* `sip_certificate` is one PEM holding certificate and key (SSL_CTX_use_certificate_chain_file and
  SSL_CTX_use_PrivateKey_file on the same file).
* `mediaenc=srtp-mand` answers `m=audio P RTP/SAVP 0 ...` with one `a=crypto:<tag>
  AES_CM_128_HMAC_SHA1_80 inline:...` chosen from the offer (modules/srtp), and refuses plain RTP.
* Recording: in 1.0.0 `aufile` is only an audio *source*. The `sndfile` audio filter writes every
  decoded frame it receives to `<snd_path>/dump-<time>-dec.wav` (and what it sends to `...-enc.wav`)
  on the RTP receive path, with no audio player needed at all, so we load no player module.
* `aufile` ends the call when its WAV runs out ("end of file" closes the call), so the tone must be
  longer than any call the test places.
* Without `net_interface` baresip takes the default route's address for its SDP and RTP; giving it an
  IP address here (net.c accepts one) keeps media on loopback.
"""

from __future__ import annotations

import array
import ipaddress
import math
import socket
import struct
import subprocess
import sys
import time
import wave
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from kemi_o365.launch import stop_process_group

BARESIP_BINARY = "baresip"
MODULE_PATH = Path("/usr/lib/baresip/modules")
TONE_RATE = 8000  # PCMU's clock rate: aufile refuses a WAV whose rate differs from the codec's
STOP_GRACE_S = 5.0
# /proc/net/tcp socket state of a listening socket (include/net/tcp_states.h TCP_LISTEN).
_TCP_LISTEN = "0A"


class BaresipError(Exception):
    """baresip did not start; the message quotes its log."""


def write_tone_wav(path: Path, freq_hz: float, seconds: float, amplitude: float = 0.5) -> Path:
    """A mono 16-bit 8 kHz sine WAV, the format aufile needs for PCMU."""
    peak = 32767 * amplitude
    step = 2 * math.pi * freq_hz / TONE_RATE
    samples = array.array("h", (round(peak * math.sin(step * n)) for n in range(int(TONE_RATE * seconds))))
    if sys.byteorder == "big":
        samples.byteswap()  # WAV is little-endian
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(TONE_RATE)
        w.writeframes(samples.tobytes())
    return path


def read_wav(path: Path) -> tuple[int, list[int]]:
    """Sample rate and the samples of a mono 16-bit WAV (what sndfile writes)."""
    with wave.open(str(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected mono 16-bit, got {w.getnchannels()} ch {w.getsampwidth()} B")
        rate = w.getframerate()
        raw = w.readframes(w.getnframes())
    return rate, list(struct.unpack(f"<{len(raw) // 2}h", raw))


def _free(ip: str, kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _bindable(ip: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def free_tls_port(ip: str) -> int:
    """A port P for baresip's TLS listener: P free for TCP and P-1 free for UDP and TCP (see above)."""
    for _ in range(100):
        port = _free(ip, socket.SOCK_STREAM)
        if port > 1024 and all(
            _bindable(ip, port - 1, kind) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)
        ):
            return port
    raise RuntimeError(f"no port pair free on {ip} for baresip")


def tcp_listening(ip: str, port: int) -> bool:
    """True when some socket listens on ip:port, read from /proc so that we never connect to it.

    Why not connect: a probe connection would be a TLS handshake baresip logs as failed.
    """
    want = f"{socket.inet_aton(ip)[::-1].hex().upper()}:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] == want and f[3] == _TCP_LISTEN for f in (ln.split() for ln in lines) if len(f) > 3)


class BaresipPeer:
    """baresip answering calls for `user@domain` over TLS on host:port, with mandatory SDES SRTP.

    It plays a `tone_hz` sine and records the decoded audio it receives (`received_recording()`).
    Everything it writes stays in `workdir`; `stop()` ends it by its PID (own process group).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        cert: Path,
        key: Path,
        ca: Path,
        user: str,
        domain: str,
        workdir: Path,
        tone_hz: float = 1800.0,
        tone_seconds: float = 30.0,
        quit_after_s: int = 120,
        sip_trace: bool = True,
        binary: str = BARESIP_BINARY,
    ) -> None:
        if not _is_loopback(host):
            raise ValueError(f"baresip peer must listen on loopback, not {host}")
        if port < 2:
            raise ValueError("TLS port must leave room for sip_listen on port - 1")
        self.host, self.port = host, port
        self.cert, self.key, self.ca = cert, key, ca
        self.user, self.domain = user, domain
        self.workdir = workdir.resolve()
        self.tone_hz, self.tone_seconds = tone_hz, tone_seconds
        # baresip's own -t: a safety net that ends it even if nobody calls stop() (a crashed test).
        self.quit_after_s = quit_after_s
        self.sip_trace = sip_trace
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None  # baresip's exit status once stopped

    @property
    def config_dir(self) -> Path:
        return self.workdir / "conf"

    @property
    def recordings_dir(self) -> Path:
        return self.workdir / "recordings"

    @property
    def tone_file(self) -> Path:
        return self.workdir / f"tone-{self.tone_hz:g}Hz.wav"

    @property
    def log_file(self) -> Path:
        return self.workdir / "baresip.log"

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def config_text(self) -> str:
        pem = self.config_dir / "sip-cert.pem"
        lines = {
            "poll_method": "epoll",
            # TLS binds on this port + 1 (see the module docstring).
            "sip_listen": f"{self.host}:{self.port - 1}",
            "sip_certificate": str(pem),
            "sip_cafile": str(self.ca),
            "call_local_timeout": "30",
            "call_max_calls": "1",
            "audio_source": f"aufile,{self.tone_file}",
            "audio_alert": f"aufile,{self.tone_file}",
            "audio_buffer": "20-160",
            "jitter_buffer_delay": "1-10",
            "rtp_tos": "0",
            "rtp_stats": "no",
            # An IP address, not an interface name: SDP c= and RTP sockets use it (net.c).
            "net_interface": self.host,
            # Nothing here resolves names (the SBC is reached on the connection it opened), and a
            # loopback resolver keeps baresip from ever sending to the host's DNS server.
            "dns_server": "127.0.0.1:53",
            "module_path": str(MODULE_PATH),
            "snd_path": str(self.recordings_dir),
        }
        modules = ["g711.so", "aufile.so", "sndfile.so", "srtp.so"]
        out = [f"{k}\t{v}" for k, v in lines.items()]
        out += [f"module\t{m}" for m in modules]
        # account.so only reads the accounts file at start-up, hence module_tmp (loaded, then unloaded).
        out.append("module_tmp\taccount.so")
        return "\n".join(out) + "\n"

    def account_line(self) -> str:
        # regint=0: no REGISTER (there is no registrar; the SBC sends to the pinned address).
        return (
            f"<sip:{self.user}@{self.domain};transport=tls>"
            ";regint=0;answermode=auto;mediaenc=srtp-mand;audio_codecs=PCMU\n"
        )

    def write_config(self) -> None:
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.recordings_dir.mkdir(parents=True, exist_ok=True)
        pem = self.config_dir / "sip-cert.pem"
        pem.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        pem.chmod(0o600)
        (self.config_dir / "config").write_text(self.config_text())
        (self.config_dir / "accounts").write_text(self.account_line())
        # baresip writes a default contacts file if none exists; an empty one keeps it quiet.
        (self.config_dir / "contacts").write_text("")
        write_tone_wav(self.tone_file, self.tone_hz, self.tone_seconds)

    def command(self) -> list[str]:
        argv = [self.binary, "-4", "-f", str(self.config_dir), "-t", str(self.quit_after_s)]
        # -s: baresip logs every SIP message it sends and receives, so a test can read its SDP answer.
        return [*argv, "-s"] if self.sip_trace else argv

    def start(self, timeout: float = 5.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        with self.log_file.open("wb") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches baresip and nothing else
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BaresipError(f"baresip exited with code {self.proc.returncode}:\n{self.log()}")
            if tcp_listening(self.host, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise BaresipError(
            f"baresip not listening on {self.host}:{self.port} after {timeout:g}s:\n{self.log()}"
        )

    def stop(self) -> int | None:
        """Terminate baresip (SIGTERM, then SIGKILL) by its process group; return its exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        stop_process_group(proc, STOP_GRACE_S)
        self.returncode = proc.returncode
        return proc.returncode

    def received_recording(self) -> Path | None:
        """The WAV of what baresip decoded from the SBC (sndfile's `-dec.wav`), newest first."""
        return _newest(self.recordings_dir.glob("dump-*-dec.wav"))

    def sent_recording(self) -> Path | None:
        """The WAV of what baresip encoded toward the SBC (sndfile's `-enc.wav`)."""
        return _newest(self.recordings_dir.glob("dump-*-enc.wav"))

    def __enter__(self) -> BaresipPeer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _newest(paths: Iterable[Path]) -> Path | None:
    found = sorted(paths, key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

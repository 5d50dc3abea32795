"""tshark capturing loopback traffic into a file for a test: started and stopped by PID, bounded in time."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest


class LoopbackCapture:
    """tshark capturing on loopback into a file, started and stopped by PID, bounded in time."""

    def __init__(self, pcap: Path, ports: list[int]) -> None:
        bpf = " or ".join(f"port {p}" for p in ports)
        cmd = ["tshark", "-i", "lo", "-w", str(pcap), "-f", bpf, "-a", "duration:30"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.started = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # dumpcap says "Capturing on" once the interface is open; packets sent before would be lost.
        if not self.started.wait(15):
            self.stop()
            pytest.fail(f"tshark did not start capturing: {''.join(self.stderr)}")
        time.sleep(0.2)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if "Capturing on" in line:
                self.started.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # tshark finishes writing the file on SIGINT
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

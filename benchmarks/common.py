"""What the benchmark scripts share: where the data is, timing, memory and CPU
information. Import as `from benchmarks.common import ...` (scripts run as
`python -m benchmarks.<script>` from the repository root)."""
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DEELM_DATA", REPO.parent / "shared" / "data"))
STSB_TEST = DATA_DIR / "sts" / "STSBenchmark" / "test.jsonl"


def median(xs):
    return statistics.median(xs)


def timed(fn):
    """Wall seconds of one call of fn()."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def peak_rss_mb():
    """This process's peak RSS in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    """This process's current RSS in MiB, or None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_info():
    """lscpu's fields as a dict ({} when lscpu is not there)."""
    if not shutil.which("lscpu"):
        return {}
    try:
        out = subprocess.run(["lscpu", "-J"], capture_output=True, text=True, check=True).stdout
        return {e["field"].rstrip(":"): e["data"] for e in json.loads(out)["lscpu"]}
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return {}


def cpu_model():
    """The CPU's model name, from lscpu, else /proc/cpuinfo, else platform."""
    name = cpu_info().get("Model name")
    if name:
        return name
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def unique_sentences(path):
    """The distinct sentences of an STS jsonl file, in first-seen order."""
    seen = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            seen.setdefault(row["sentence1"], None)
            seen.setdefault(row["sentence2"], None)
    return list(seen)

"""The README's first command runs samples/quickstart.py: it must pass on the stack being tested."""

import subprocess
import sys
from pathlib import Path

SAMPLE = Path(__file__).parent.parent / "samples" / "quickstart.py"


def test_quickstart_trains_exports_serves_and_matches_peft(tmp_path):
    """Before: under transformers 5 it compared with PeftModel.generate, which puts the prompt in front again,
    and printed 'parity FAILED' with exit 1."""
    done = subprocess.run([sys.executable, str(SAMPLE), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "parity passed" in done.stdout
    assert (tmp_path / "artifact" / "spexport.json").is_file()
